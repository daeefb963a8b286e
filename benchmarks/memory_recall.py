"""Recall across calls with the Titans neural memory: test-time updates on vs off; ONE JSON object.

    python benchmarks/memory_recall.py                  # ~2-4 minutes on one shared CPU core
    python benchmarks/memory_recall.py --steps 100 --eval_episodes 256

Task: an episode has `facts` random key -> value pairs (keys distinct, from `num_keys` symbols;
values from `num_values` symbols). Call 1 receives the facts, one token per fact
(`embed_key[k] + embed_value[v]`); call 2, a separate `apply`, receives every key once in a new
random order with the value replaced by an "unknown" symbol and must output the value. Nothing
but the `memory` collection connects the calls, so the facts are outside any attention window.

Model: embeddings -> `NeuralMemory` -> residual -> LayerNorm -> linear head over values. It is
trained end to end (AdamW) through the inner updates of both calls, with the memory state
returned by call 1 (`mutable=["memory"]`) passed to call 2. Evaluation on fresh episodes:
- `updates_on`: call 1 writes the facts by test-time gradient steps; call 2 reads that state;
- `updates_off`: both calls with `update_memory=False` (the memory stays at its learned
  initial weights);
- `not_carried`: call 1 updates, but call 2 starts from the learned initial weights again
  (no `memory` passed), i.e. what a model without persistent memory sees.
Chance accuracy is 1 / num_values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nexus_jax.layers.memory import NeuralMemory


class RecallModel(nn.Module):
  """`keys, values [B, T] int -> (logits [B, T, num_values], aux)`; value `num_values` = unknown."""

  num_keys: int
  num_values: int
  embed_dim: int
  num_heads: int
  depth: int
  chunk_size: int

  @nn.compact
  def __call__(self, keys, values, update_memory: bool = True):
    x = nn.Embed(self.num_keys, self.embed_dim, name="key_embed")(keys) + nn.Embed(
        self.num_values + 1, self.embed_dim, name="value_embed"
    )(values)
    y, aux = NeuralMemory(
        num_heads=self.num_heads, depth=self.depth, chunk_size=self.chunk_size, name="memory"
    )(x, update_memory=update_memory)
    return nn.Dense(self.num_values, name="head")(nn.LayerNorm()(x + y)), aux


def episodes(rng: np.random.Generator, batch: int, facts: int, num_keys: int, num_values: int):
  """Fact keys/values `[batch, facts]`, query keys and answers `[batch, facts]` (int32)."""
  keys = np.argsort(rng.random((batch, num_keys)), axis=1)[:, :facts]  # distinct per episode
  values = rng.integers(0, num_values, (batch, facts))
  order = np.argsort(rng.random((batch, facts)), axis=1)
  query_keys = np.take_along_axis(keys, order, 1)
  answers = np.take_along_axis(values, order, 1)
  return tuple(a.astype(np.int32) for a in (keys, values, query_keys, answers))


def two_calls(model, params, batch, num_values, update=True, carry=True):
  """Call 1 on the facts, call 2 on the queries; returns (logits [B, F, V], aux 1, aux 2)."""
  keys, values, query_keys, _ = batch
  (_, aux_facts), state = model.apply(
      {"params": params}, keys, values, update_memory=update, mutable=["memory"]
  )
  variables = {"params": params, **(state if carry else {})}
  unknown = jnp.full(query_keys.shape, num_values, jnp.int32)
  (logits, aux_queries), _ = model.apply(
      variables, query_keys, unknown, update_memory=update, mutable=["memory"]
  )
  return logits, aux_facts, aux_queries


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--facts", type=int, default=8)
  parser.add_argument("--num_keys", type=int, default=64)
  parser.add_argument("--num_values", type=int, default=16)
  parser.add_argument("--embed_dim", type=int, default=64)
  parser.add_argument("--num_heads", type=int, default=2)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--chunk_size", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--eval_episodes", type=int, default=1024)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  model = RecallModel(
      args.num_keys, args.num_values, args.embed_dim, args.num_heads, args.depth, args.chunk_size
  )
  rng = np.random.default_rng(args.seed)
  sample = episodes(rng, args.batch, args.facts, args.num_keys, args.num_values)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(args.seed), sample[0], sample[1])["params"])
  optimizer = optax.adamw(args.learning_rate, weight_decay=1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(params, batch):
    logits, _, _ = two_calls(model, params, batch, args.num_values)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[3]).mean()

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  losses = []
  for _ in range(args.steps):
    batch = episodes(rng, args.batch, args.facts, args.num_keys, args.num_values)
    params, opt_state, loss = train_step(params, opt_state, batch)
    losses.append(float(loss))
  train_s = time.perf_counter() - start

  @jax.jit
  def evaluate(params, batch):
    out = {}
    for name, update, carry in (
        ("updates_on", True, True),
        ("updates_off", False, True),
        ("not_carried", True, False),
    ):
      logits, aux_facts, aux_queries = two_calls(
          model, params, batch, args.num_values, update, carry
      )
      out[name] = jnp.mean(jnp.argmax(logits, -1) == batch[3])
      if name == "updates_on":  # what the data-dependent gates learned
        out["lr_facts"] = jnp.mean(aux_facts["lr"])
        out["lr_queries"] = jnp.mean(aux_queries["lr"])
        out["inner_loss_before_facts"] = jnp.mean(aux_facts["loss_before"])
        out["inner_loss_after_facts"] = jnp.mean(aux_facts["loss_after"])
    return out

  eval_rng = np.random.default_rng(args.seed + 1)
  totals: dict[str, float] = {}
  n_batches = max(1, args.eval_episodes // args.batch)
  for _ in range(n_batches):
    batch = episodes(eval_rng, args.batch, args.facts, args.num_keys, args.num_values)
    for k, v in evaluate(params, batch).items():
      totals[k] = totals.get(k, 0.0) + float(v) / n_batches

  print(
      json.dumps(
          {
              "benchmark": "memory_recall",
              "machine": {
                  "platform": platform.platform(),
                  "cpu_count": os.cpu_count(),
                  "device": str(jax.devices()[0]),
                  "note": "shared CPU, about one effective core",
              },
              "versions": {
                  "jax": jax.__version__,
                  "flax": flax.__version__,
                  "optax": optax.__version__,
              },
              "config": vars(args),
              "train": {
                  "seconds": round(train_s, 1),
                  "first_loss": round(losses[0], 4),
                  "final_loss_mean_last_20": round(float(np.mean(losses[-20:])), 4),
              },
              "recall_accuracy": {
                  k: round(totals[k], 4) for k in ("updates_on", "updates_off", "not_carried")
              },
              "gates_and_inner_loss": {
                  k: round(totals[k], 4)
                  for k in (
                      "lr_facts",
                      "lr_queries",
                      "inner_loss_before_facts",
                      "inner_loss_after_facts",
                  )
              },
              "chance": round(1 / args.num_values, 4),
              "eval_episodes": n_batches * args.batch,
          }
      )
  )


if __name__ == "__main__":
  main()
