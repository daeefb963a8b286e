"""Dynamic experts (top-p routing) vs top-k routing: bits/byte against experts used per byte.

    python benchmarks/moe_top_p.py [--steps 250] [--top_p 0.3,0.5,0.8]

Trains byte-level MoE `LanguageModel`s on the standard library's .py sources (the LM experiment's
training split), on the same batches from the same initialisation: top-1 (Switch gating: the
router probability), top-2 (Mixtral), and top-p routing (Huang et al. 2024: experts in descending
probability until their mass reaches p, at most `num_experts`) for each p. Reports test
bits/byte, the mean number of experts per byte on the test bytes, and the analytic expert FLOPs
per byte and layer (experts used x 2 x 3 x embed x mlp for SwiGLU): the compute of a grouped
matmul that skips empty rows (`ragged_dot` on GPU/TPU). XLA's compiled cost analysis is no
measure here: it counts the body of the CPU path's tiled scan once, and top-p's buffer is static
(`top_k` rows per byte) whatever the mass. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from benchmarks.lm_training import lm_optimizer, make_train_step  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.models.lm import LanguageModel  # noqa: E402
from nexus_jax.models.seq_objectives import token_cross_entropy  # noqa: E402


def make_model(args, top_k: int, top_p: float | None) -> LanguageModel:
  return LanguageModel(
      vocab_size=256,
      num_layers=args.layers,
      embed_dim=args.dim,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=args.mlp_dim,
      num_experts=args.experts,
      moe_top_k=top_k,
      moe_top_p=top_p,
  )


def sum_aux(sown) -> jax.Array:
  return sum(jnp.sum(v) for v in jax.tree.leaves(sown.get("aux_loss", {})))


def train(model, windows, steps: int, batch: int, seed: int):
  """AdamW on the given windows with the sown aux losses; returns (params, last-20 bits/byte)."""
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), windows[:1, :-1]))["params"]
  tx = lm_optimizer(steps)

  def loss_fn(p, tokens):
    (logits, _), sown = model.apply({"params": p}, tokens[:, :-1], mutable=["aux_loss"])
    task = token_cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))[0]
    return task + sum_aux(sown), task

  step = jax.jit(make_train_step(loss_fn, tx))

  opt, losses = tx.init(params), []
  for i in range(steps):
    params, opt, task = step(params, opt, windows[i * batch : (i + 1) * batch])
    losses.append(float(task))
  return params, float(np.mean(losses[-20:]) / np.log(2))


def evaluate(model, params, test_windows, batch: int) -> dict:
  """Test bits/byte and mean experts per byte (averaged over MoE layers) on all test windows."""

  @jax.jit
  def one(tokens):
    logits, aux = model.apply({"params": params}, tokens[:, :-1])
    nats = token_cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))[0]
    return nats, jnp.mean(aux["moe"]["experts_per_token"])

  nats, experts = zip(
      *(one(test_windows[i : i + batch]) for i in range(0, len(test_windows), batch))
  )
  return {
      "test_bits_per_byte": float(np.mean(nats) / np.log(2)),
      "experts_per_byte": float(np.mean(experts)),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=250)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--dim", type=int, default=96)
  ap.add_argument("--mlp_dim", type=int, default=128)
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top_p", default="0.3,0.5,0.8")
  ap.add_argument("--test_windows", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  splits, _ = text.load_text_splits()
  train_windows = jnp.asarray(
      text.random_windows(splits["train"], args.seq + 1, args.steps * args.batch, args.seed).astype(
          np.int32
      )
  )
  test_windows = jnp.asarray(
      text.windows(splits["test"], args.seq + 1, args.test_windows).astype(np.int32)
  )
  variants = [("top-1", 1, None), ("top-2", 2, None)] + [
      (f"top-p {p}", args.experts, float(p)) for p in args.top_p.split(",")
  ]
  expert_flops = 2 * 3 * args.dim * args.mlp_dim  # SwiGLU expert: three [D, F] matmuls
  rows = []
  for name, top_k, top_p in variants:
    model = make_model(args, top_k, top_p)
    t0 = time.perf_counter()
    params, train_bpb = train(model, train_windows, args.steps, args.batch, args.seed)
    row = {
        "routing": name,
        "top_k": top_k,
        "top_p": top_p,
        "train_bits_per_byte_last20": train_bpb,
        "train_seconds": time.perf_counter() - t0,
        **evaluate(model, params, test_windows, args.batch),
    }
    row["analytic_expert_flops_per_byte_per_layer"] = row["experts_per_byte"] * expert_flops
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  print(
      json.dumps(
          {
              "benchmark": "moe_top_p",
              "machine": machine_info(),
              "config": vars(args),
              "results": rows,
          },
          indent=1,
      )
  )


if __name__ == "__main__":
  main()
