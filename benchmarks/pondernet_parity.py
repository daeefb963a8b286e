"""PonderNet on parity (Banino et al. 2021, sec. 3.1), against a fixed-depth run of the same step.

Inputs are `--dim`-long vectors with a random number k of entries set to +-1 (random positions
and signs), the rest 0; the label is the parity of the number of +1 entries; the difficulty is k.
Training draws k from 1..`--train_max_nonzero`; the test set draws k from the same range
(interpolation) and, for extrapolation, from `--train_max_nonzero + 1 .. --dim` (never trained on).

The step is a GRU cell `h_{n+1} = GRU(h_n, x)` re-reading the input (PonderNet's parity model), the
head a `Dense(1)` logit, applied by `PonderNet` for up to `--max_steps` steps. Runs:
- `ponder_prior_<p>` for each `--priors`: expected BCE over the halting distribution plus
  `beta * KL(p || geometric(p))`; evaluated at the threshold-0.5 halting step.
- `fixed_depth`: the same module trained on the last step's loss only, evaluated at step N
  (what always spending `max_steps` steps gives).

  python benchmarks/pondernet_parity.py       # 4 runs x 6000 steps, ~8 min on 2 shared CPU cores
  python benchmarks/pondernet_parity.py --train_steps 12000 --priors 0.5 0.8   # ~10 min
  python benchmarks/pondernet_parity.py --train_steps 300 --priors 0.5 --fixed_depth 0  # smoke

Prints one JSON object: machine, versions, config, and per run: test accuracy, mean halting step
(in- and out-of-range), accuracy and mean halting step per difficulty k, wall time.
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
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.layers.pondernet import PonderNet, expected_loss  # noqa: E402


class GRUStep(nn.Module):
  """`(h [B, H], x [B, D]) -> h'`: one GRU update reading the (fixed) input again."""

  hidden: int

  @nn.compact
  def __call__(self, h, x):
    h, _ = nn.GRUCell(self.hidden, name="gru")(h, x)
    return h


def parity_batch(key, batch, dim, k_lo, k_hi):
  """`x [B, dim]` in {-1, 0, 1} with k ~ U{k_lo..k_hi} non-zeros, `y [B]` parity of #(+1), `k [B]`."""
  k_key, pos_key, sign_key = jax.random.split(key, 3)
  k = jax.random.randint(k_key, (batch,), k_lo, k_hi + 1)
  rank = jnp.argsort(jax.random.uniform(pos_key, (batch, dim)), axis=1).argsort(axis=1)
  nonzero = rank < k[:, None]
  sign = jnp.where(jax.random.bernoulli(sign_key, 0.5, (batch, dim)), 1.0, -1.0)
  x = jnp.where(nonzero, sign, 0.0)
  y = (jnp.sum(x > 0, axis=1) % 2).astype(jnp.float32)
  return x, y, k


def make_model(args, prior):
  return PonderNet(
      step=GRUStep(args.hidden),
      head=nn.Dense(1),
      max_steps=args.max_steps,
      prior=prior,
      beta=args.beta,
      halt_bias_init=args.halt_bias_init,
  )


def train_and_eval(args, name, prior, fixed_depth, test_sets):
  model = make_model(args, prior)
  key = jax.random.key(args.seed)
  h0 = jnp.zeros((args.batch, args.hidden))
  x0, _, _ = parity_batch(key, args.batch, args.dim, 1, args.train_max_nonzero)
  params = model.init(key, h0, x0)["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    h = jnp.zeros((x.shape[0], args.hidden))
    (_, aux), sown = model.apply({"params": params}, h, x, mutable=["aux_loss"])
    logits = aux["per_step"][..., 0]  # [N, B]
    bce = optax.sigmoid_binary_cross_entropy(logits, jnp.broadcast_to(y, logits.shape))
    if fixed_depth:
      return jnp.mean(bce[-1])
    kl = sum(jnp.sum(v) for v in jax.tree.leaves(sown["aux_loss"]))
    return expected_loss(bce, aux["halting_probs"]) + kl

  @jax.jit
  def train_step(params, opt_state, key):
    x, y, _ = parity_batch(key, args.batch, args.dim, 1, args.train_max_nonzero)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    y, aux = model.apply({"params": params}, jnp.zeros((x.shape[0], args.hidden)), x)
    if fixed_depth:
      return aux["per_step"][-1, :, 0] > 0, jnp.full(x.shape[:1], args.max_steps)
    return y[:, 0] > 0, aux["halt_step"]

  start, losses = time.perf_counter(), []
  for i in range(args.train_steps):
    params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(key, i + 1))
    if (i + 1) % max(1, args.train_steps // 10) == 0:
      losses.append(round(float(loss), 4))
      print(f"{name} step {i + 1} loss {losses[-1]}", file=sys.stderr, flush=True)
  train_s = time.perf_counter() - start

  row = {"run": name, "prior": None if fixed_depth else prior, "train_s": round(train_s, 1)}
  row["loss_curve"] = losses
  for split, (x, y, k) in test_sets.items():
    pred, steps = (np.asarray(a) for a in predict(params, x))
    correct = pred == np.asarray(y).astype(bool)
    k = np.asarray(k)
    row[f"{split}_accuracy"] = round(float(correct.mean()), 4)
    row[f"{split}_mean_steps"] = round(float(steps.mean()), 2)
    row[f"{split}_by_nonzero"] = {
        int(v): {
            "accuracy": round(float(correct[k == v].mean()), 3),
            "mean_steps": round(float(steps[k == v].mean()), 2),
        }
        for v in np.unique(k)
    }
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=16)
  p.add_argument("--train_max_nonzero", type=int, default=12)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--max_steps", type=int, default=12)
  p.add_argument("--priors", type=float, nargs="+", default=[0.5, 0.65, 0.8])
  p.add_argument("--beta", type=float, default=0.01)
  p.add_argument("--halt_bias_init", type=float, default=-2.0)
  p.add_argument("--fixed_depth", type=int, default=1, help="also run the fixed-depth baseline")
  p.add_argument("--train_steps", type=int, default=12000)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--test_size", type=int, default=8192)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  test_key = jax.random.key(10_000 + args.seed)
  test_sets = {"test": parity_batch(test_key, args.test_size, args.dim, 1, args.train_max_nonzero)}
  if args.train_max_nonzero < args.dim:
    test_sets["extrapolation"] = parity_batch(
        jax.random.fold_in(test_key, 1),
        args.test_size,
        args.dim,
        args.train_max_nonzero + 1,
        args.dim,
    )
  rows = [train_and_eval(args, f"ponder_prior_{q}", q, False, test_sets) for q in args.priors]
  if args.fixed_depth:
    rows.append(train_and_eval(args, "fixed_depth", args.priors[0], True, test_sets))
  for r in rows:
    print(json.dumps({k: v for k, v in r.items() if "by_nonzero" not in k}), file=sys.stderr)
  print(
      json.dumps(
          {
              "benchmark": "pondernet_parity",
              "machine": machine_info(),
              "config": vars(args),
              "results": rows,
          }
      )
  )


if __name__ == "__main__":
  main()
