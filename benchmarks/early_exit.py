"""CALM-style early exit: layer compute skipped vs quality, anytime vs last-layer-only training.

    python benchmarks/early_exit.py [--steps 400] [--dim 128] [--layers 4] [--eval_windows 64]

Trains two byte-level `LanguageModel`s of `--layers` layers on the standard library's .py sources
(same init, same batches): one with the anytime objective (`models/anytime.py`, CALM's weights
l / sum(l)) and one on the last layer only. On test-split windows (teacher-forced), for every
confidence measure and threshold tau: each token exits at the first layer whose confidence
reaches tau (`exit_layers_teacher_forced`); reported are the fraction of layer compute skipped
(mean (L - exit) / L), the test bits/byte of the exit layers' predictions (and the delta to full
depth) and the greedy agreement (exit layer's argmax == last layer's). Then real decoding with
`early_exit_generate` (greedy, batch 1, `--new_tokens` from `--prompts` test prompts) at
`--decode_tau`: the skipped fraction actually realised (propagated K/V states) and the fraction of
positions equal to full-depth `generate`. Prints one JSON object with the targets met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from benchmarks.lm_training import lm_optimizer, make_train_step  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.inference.early_exit import (  # noqa: E402
    CONFIDENCES,
    early_exit_generate,
    exit_layers_teacher_forced,
)
from nexus_jax.inference.generate import generate  # noqa: E402
from nexus_jax.models import anytime  # noqa: E402
from nexus_jax.models.lm import LanguageModel, count_params  # noqa: E402

TAUS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
LN2 = float(np.log(2.0))


def train(model, windows, steps, batch, objective):
  """AdamW on `windows [steps * batch, seq + 1]`; objective "anytime" | "last". Returns params."""
  params = jax.jit(model.init)(jax.random.PRNGKey(0), windows[:1, :-1])["params"]
  tx = lm_optimizer(steps)

  def loss_fn(p, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32)
    if objective == "anytime":
      states = anytime.layer_states(model, {"params": p}, inputs)
      logits = anytime.layer_logits(model, p, states[1:])
    else:
      logits = model.apply({"params": p}, inputs)[0][None]
    loss = anytime.anytime_loss(logits, targets, weights)[0]
    return loss, loss

  step = jax.jit(make_train_step(loss_fn, tx))

  opt = tx.init(params)
  for i in range(steps):
    params, opt, _ = step(params, opt, windows[i * batch : (i + 1) * batch])
  return params


def teacher_forced(model, params, windows, chunk):
  """Per-layer logits' nll `[L, N]`, argmax `[L, N]` and confidences for every measure."""

  @jax.jit
  def run(tokens):
    states = anytime.layer_states(model, {"params": params}, tokens[:, :-1])
    logits = anytime.layer_logits(model, params, states[1:])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[None, :, 1:, None], -1)[..., 0]
    return logits, states, nll

  out = {"nll": [], "argmax": [], **{c: [] for c in CONFIDENCES}}
  exits = {(c, t): [] for c in CONFIDENCES for t in TAUS}
  for i in range(0, len(windows), chunk):
    logits, states, nll = run(windows[i : i + chunk])
    out["nll"].append(np.asarray(nll).reshape(nll.shape[0], -1))
    out["argmax"].append(np.asarray(jnp.argmax(logits, -1)).reshape(nll.shape[0], -1))
    for c in CONFIDENCES:
      for t in TAUS:
        exits[(c, t)].append(np.asarray(exit_layers_teacher_forced(logits, states, t, c)).ravel())
  nll, argmax = np.concatenate(out["nll"], 1), np.concatenate(out["argmax"], 1)
  exits = {k: np.concatenate(v) for k, v in exits.items()}
  return nll, argmax, exits


def tau_curves(nll, argmax, exits, num_layers):
  full_bpb = float(nll[-1].mean() / LN2)
  cols = np.arange(nll.shape[1])
  curves = {}
  for c in CONFIDENCES:
    rows = []
    for t in TAUS:
      e = exits[(c, t)] - 1
      bpb = float(nll[e, cols].mean() / LN2)
      rows.append(
          {
              "tau": t,
              "skipped_fraction": round(float(np.mean((num_layers - 1 - e) / num_layers)), 4),
              "bits_per_byte": round(bpb, 4),
              "delta_bits_per_byte": round(bpb - full_bpb, 4),
              "greedy_agreement": round(float(np.mean(argmax[e, cols] == argmax[-1])), 5),
              "exit_layer_histogram": np.bincount(e + 1, minlength=num_layers + 1)[1:].tolist(),
          }
      )
    curves[c] = rows
  per_layer = [round(float(x / LN2), 4) for x in nll.mean(1)]
  return {"full_depth_bits_per_byte": round(full_bpb, 4), "per_layer_bits_per_byte": per_layer,
          "curves": curves}  # fmt: skip


def decode_check(model, params, prompts, new_tokens, tau):
  """Real early-exit decoding at `tau` (greedy, batch 1) vs full-depth `generate`."""
  rows = {}
  for c in CONFIDENCES:
    skipped, same, total, seconds = [], 0, 0, 0.0
    for prompt in prompts:
      full = generate(model, params, [prompt], max_new_tokens=new_tokens).tokens[0]
      t0 = time.perf_counter()
      out = early_exit_generate(
          model, params, [prompt], max_new_tokens=new_tokens, threshold=tau, confidence=c
      )
      seconds += time.perf_counter() - t0
      skipped.append(out.batch_skipped_fraction)
      same += int(np.sum(out.tokens[0] == full))
      total += new_tokens
      first = np.nonzero(out.tokens[0] != full)[0]
      rows.setdefault("first_divergence", {}).setdefault(c, []).append(
          int(first[0]) if first.size else None
      )
    rows[c] = {
        "skipped_fraction": round(float(np.mean(skipped)), 4),
        "positions_equal_to_generate": round(same / total, 4),
        "seconds_incl_compile": round(seconds, 1),
    }
  return {"tau": tau, **rows}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--eval_windows", type=int, default=64)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--decode_tau", type=float, default=0.9)
  args = ap.parse_args()

  splits, _ = text.load_text_splits()
  model = LanguageModel(
      vocab_size=256,
      num_layers=args.layers,
      embed_dim=args.dim,
      num_heads=max(args.dim // 32, 2),
      num_kv_heads=1,
      mlp_dim=4 * args.dim,
      num_experts=0,
  )
  windows = text.random_windows(splits["train"], args.seq + 1, args.steps * args.batch, 0)
  windows = jnp.asarray(windows.astype(np.int32))
  test = text.random_windows(splits["test"], args.seq + 1, args.eval_windows, 1).astype(np.int32)
  t0 = time.perf_counter()
  params, train_seconds, results = {}, {}, {}
  for name in ("anytime", "last"):
    t = time.perf_counter()
    params[name] = train(model, windows, args.steps, args.batch, name)
    train_seconds[name] = round(time.perf_counter() - t, 1)
    nll, argmax, exits = teacher_forced(model, params[name], jnp.asarray(test), 16)
    results[name] = tau_curves(nll, argmax, exits, args.layers)

  rng = np.random.default_rng(0)
  starts = rng.integers(0, len(splits["test"]) - 64, args.prompts)
  prompts = [splits["test"][s : s + 32].astype(np.int32).tolist() for s in starts]
  decode = decode_check(model, params["anytime"], prompts, args.new_tokens, args.decode_tau)

  curves = results["anytime"]["curves"]
  at = lambda c, tau: next(r for r in curves[c] if r["tau"] == tau)
  best = lambda tau, ok: max(
      (at(c, tau) | {"confidence": c} for c in CONFIDENCES if ok(at(c, tau))),
      key=lambda r: r["skipped_fraction"],
      default=None,
  )
  t09 = best(0.9, lambda r: r["delta_bits_per_byte"] <= 0.05 and r["greedy_agreement"] >= 0.995)
  t07 = best(0.7, lambda r: r["greedy_agreement"] >= 0.985)
  cost = (
      results["anytime"]["full_depth_bits_per_byte"] - results["last"]["full_depth_bits_per_byte"]
  )
  targets = {
      "tau_0.9: >=12% skipped, <=+0.05 bits/byte, >=99.5% agreement": {
          "met": bool(t09 and t09["skipped_fraction"] >= 0.12),
          "best_measure_within_quality": t09,
      },
      "tau_0.7: >=20% skipped, >=98.5% agreement": {
          "met": bool(t07 and t07["skipped_fraction"] >= 0.20),
          "best_measure_within_quality": t07,
      },
      "anytime last-layer cost <= 0.05 bits/byte": {"met": bool(cost <= 0.05),
                                                     "delta": round(cost, 4)},
  }  # fmt: skip
  print(
      json.dumps(
          {
              "benchmark": "early_exit",
              "machine": machine_info(),
              "note": "2-core CPU shared with other jobs; teacher-forced on test windows",
              "config": {**vars(args), "params": count_params(params["anytime"]), "taus": TAUS},
              "train_seconds": train_seconds,
              "results": results,
              "decode": decode,
              "targets": targets,
              "total_seconds": round(time.perf_counter() - t0, 1),
          }
      )
  )


if __name__ == "__main__":
  main()
