"""Relation composition: infer ancestor(a, c) from parent facts, with vs without the symbolic
reasoner; prints ONE JSON object.

    python benchmarks/symbolic_ancestor.py             # ~3-6 minutes on one shared CPU core
    python benchmarks/symbolic_ancestor.py --steps 200

Data (seeded): random forests over `entities` nodes. Nodes are visited in a random order; each
is a root with probability `root_prob`, otherwise its parent is one of the (up to) 3 previously
visited nodes, which makes long chains. Every graph draws fresh entity names from `vocab`
symbols, so nothing about a particular name can be memorised. Entity i is one token:
`embed_name[name_i] + embed_parent[name of i's parent or "none"]`. The label for every ordered
pair (a, c), a != c, is ancestor(a, c): c is reachable from a by parent edges.

Models (identical but for one layer): name/parent embeddings -> `layers` TransformerBlocks (no
positions: the entities are a set) -> [SymbolicReasoner] -> bilinear pair scorer; with the
reasoner, the pair scorer also adds a learned weight times the log-odds of each derived relation
(its pairwise conclusions, from aux), besides reading the projected hidden states. Trained with
binary cross-entropy (AdamW). Reported on fresh graphs: accuracy over all pairs, F1 of the
positive class, and recall of true ancestors by their distance in hops.
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

from nexus_jax.layers.blocks import TransformerBlock
from nexus_jax.layers.symbolic import SymbolicReasoner


def forests(rng, batch, n, vocab, root_prob):
  """names, parents `[batch, n]` int32 (parent = vocab for roots), hops `[batch, n, n]` int32
  (distance from a up to ancestor c, 0 if c is not an ancestor of a)."""
  names = np.argsort(rng.random((batch, vocab)), axis=1)[:, :n].astype(np.int32)
  parents = np.full((batch, n), vocab, np.int32)
  hops = np.zeros((batch, n, n), np.int32)
  for b in range(batch):
    order = rng.permutation(n)
    parent_of = {}
    for i, node in enumerate(order):
      if i > 0 and rng.random() >= root_prob:
        parent_of[node] = order[i - rng.integers(1, min(3, i) + 1)]
        parents[b, node] = names[b, parent_of[node]]
    for node in range(n):
      cur, dist = node, 0
      while cur in parent_of:
        cur, dist = parent_of[cur], dist + 1
        hops[b, node, cur] = dist
  return names, parents, hops


class AncestorModel(nn.Module):
  """`names, parents [B, N]` -> pair logits `[B, N, N]` (a, c): is c an ancestor of a."""

  vocab: int
  embed_dim: int
  layers: int
  symbolic: bool
  closure_steps: int

  @nn.compact
  def __call__(self, names, parents):
    x = nn.Embed(self.vocab, self.embed_dim, name="name_embed")(names) + nn.Embed(
        self.vocab + 1, self.embed_dim, name="parent_embed"
    )(parents)
    for i in range(self.layers):
      x, _ = TransformerBlock(4, 2 * self.embed_dim, rotary_fraction=0.0, name=f"block_{i}")(x)
    derived = None
    if self.symbolic:
      x, aux = SymbolicReasoner(
          num_relations=2,
          num_predicates=4,
          num_derived=2,
          steps=self.closure_steps,
          name="reasoner",
      )(x)
      derived = aux["derived_relations"]  # [B, Q, N, N], the module's pairwise conclusions
    a = nn.Dense(self.embed_dim, name="pair_a")(x)
    c = nn.Dense(self.embed_dim, name="pair_c")(x)
    bias = self.param("pair_bias", nn.initializers.zeros, ())
    logits = jnp.einsum("bie,bje->bij", a, c) / np.sqrt(self.embed_dim) + bias
    if derived is not None:  # the pair head also reads the derived relations (as log-odds)
      log_odds = jnp.log(derived + 1e-4) - jnp.log1p(1e-4 - derived)
      weight = self.param("derived_weight", nn.initializers.ones, (derived.shape[1],))
      logits = logits + jnp.einsum("q,bqij->bij", weight, log_odds)
    return logits


def train_and_eval(args, symbolic: bool) -> dict:
  model = AncestorModel(args.vocab, args.embed_dim, args.layers, symbolic, args.closure_steps)
  rng = np.random.default_rng(args.seed)
  names, parents, _ = forests(rng, args.batch, args.entities, args.vocab, args.root_prob)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(args.seed), names, parents)["params"])
  optimizer = optax.adamw(args.learning_rate, weight_decay=1e-4)
  opt_state = optimizer.init(params)
  off_diagonal = 1.0 - jnp.eye(args.entities)

  def loss_fn(params, names, parents, labels):
    logits = model.apply({"params": params}, names, parents)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(bce * off_diagonal) / (labels.shape[0] * jnp.sum(off_diagonal))

  @jax.jit
  def step(params, opt_state, names, parents, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, names, parents, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  losses = []
  for _ in range(args.steps):
    names, parents, hops = forests(rng, args.batch, args.entities, args.vocab, args.root_prob)
    params, opt_state, loss = step(params, opt_state, names, parents, (hops > 0).astype(np.float32))
    losses.append(float(loss))
  train_s = time.perf_counter() - start

  predict = jax.jit(lambda p, n, q: model.apply({"params": p}, n, q) > 0)
  eval_rng = np.random.default_rng(args.seed + 1)
  correct = total = tp = fp = fn = 0
  hop_hits, hop_counts = np.zeros(64), np.zeros(64)
  off = np.asarray(off_diagonal, bool)
  for _ in range(max(1, args.eval_graphs // args.batch)):
    names, parents, hops = forests(eval_rng, args.batch, args.entities, args.vocab, args.root_prob)
    pred = np.asarray(predict(params, names, parents))
    truth = hops > 0
    correct += int(np.sum((pred == truth) & off))
    total += int(np.sum(np.broadcast_to(off, truth.shape)))
    tp += int(np.sum(pred & truth))
    fp += int(np.sum(pred & ~truth & off))
    fn += int(np.sum(~pred & truth))
    np.add.at(hop_counts, hops[truth], 1)
    np.add.at(hop_hits, hops[truth & pred], 1)
  recall_by_hops = {}
  for label, lo, hi in (("1", 1, 1), ("2", 2, 2), ("3", 3, 3), ("4-5", 4, 5), ("6+", 6, 63)):
    count = hop_counts[lo : hi + 1].sum()
    if count:
      recall_by_hops[label] = round(float(hop_hits[lo : hi + 1].sum() / count), 4)
  return {
      "accuracy": round(correct / total, 4),
      "f1": round(2 * tp / max(1, 2 * tp + fp + fn), 4),
      "recall_by_hops": recall_by_hops,
      "positives_by_hops": {str(h): int(c) for h, c in enumerate(hop_counts) if c and h},
      "train_seconds": round(train_s, 1),
      "final_loss_mean_last_20": round(float(np.mean(losses[-20:])), 4),
      "params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--entities", type=int, default=16)
  parser.add_argument("--vocab", type=int, default=64)
  parser.add_argument("--root_prob", type=float, default=0.1)
  parser.add_argument("--embed_dim", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--closure_steps", type=int, default=4, help="paths up to 2^steps hops")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--eval_graphs", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  results = {
      name: train_and_eval(args, symbolic)
      for name, symbolic in (("with_symbolic", True), ("without_symbolic", False))
  }
  print(
      json.dumps(
          {
              "benchmark": "symbolic_ancestor",
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
              "results": results,
          }
      )
  )


if __name__ == "__main__":
  main()
