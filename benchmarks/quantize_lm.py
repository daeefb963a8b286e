"""Weight-only quantisation of a byte-level LM: parameter bytes and test bits/byte, float32 vs int8 vs int4.

    python benchmarks/quantize_lm.py [--steps 150] [--test_bytes 32768] [--int4_groups 32 64]
    python benchmarks/quantize_lm.py --workdir runs/lm/moe     # reuse a finished `configs/lm.py` run

Trains the `configs/lm.py` model (byte-level MoE `LanguageModel` on the standard library's .py
files, same split and optimiser) for `--steps` steps in `--workdir` (a temporary folder unless
given; a finished run there is restored instead of retrained), keeps the best validation
checkpoint, then scores the first `--test_bytes` bytes of the test split with: the float32
params, per-channel int8 (`quantize(params, bits=8)`) and packed int4 with each group size in
`--int4_groups` (`quantize(params, bits=4, group_size=g)`). Every variant runs through the same
jitted loss, which dequantises the stored tree on the fly (`dequantize` inside `jax.jit`).
Prints one JSON object: machine, versions, config, and per variant the parameter bytes, the
size reduction, test bits/byte and its change vs float32, and the leaves that fell back to int8.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from configs.lm import get_config  # noqa: E402
from nexus_jax.data.datasets.byte_lm import load_byte_lm_data  # noqa: E402
from nexus_jax.models.lm import lm_from_config  # noqa: E402
from nexus_jax.inference.quantize import dequantize, quantize, tree_bytes  # noqa: E402
from nexus_jax.models.lm import count_params  # noqa: E402
from nexus_jax.models.seq_objectives import lm_objective  # noqa: E402
from nexus_jax.train.data import ArrayDataset  # noqa: E402
from nexus_jax.train.loop import fit, restore_best  # noqa: E402


def train_or_load(config, workdir: str):
  """(model, params, extra collections, test dataset, train seconds) as experiments/lm.py builds them."""
  _, _, train, valid, test, _, _ = load_byte_lm_data(config)
  model = lm_from_config(config.model)
  result = fit(lm_objective(model), train, valid, config, workdir)
  state = restore_best(result)
  return model, nn.unbox(state.params), dict(state.extra), test, result.train_seconds


def make_scorer(model, extra):
  """Jitted (stored params tree, batch) -> (sum of nats over real target bytes, count)."""

  @jax.jit
  def score(qparams, tokens_BT, weight_B):
    logits, _ = model.apply(
        {"params": dequantize(qparams), **extra}, tokens_BT[:, :-1], deterministic=True
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens_BT[:, 1:]
    )
    return jnp.sum(nll * weight_B[:, None]), jnp.sum(weight_B) * nll.shape[1]

  return score


def bits_per_byte(score, stored, test: ArrayDataset) -> tuple[float, float]:
  """(test bits/byte, seconds of the scoring pass after compilation)."""
  stored = jax.device_put(stored)
  batches = list(test.eval_batches())
  jax.block_until_ready(score(stored, batches[0]["tokens"], batches[0]["weight"]))  # compile
  t0 = time.perf_counter()
  total, count = 0.0, 0.0
  for b in batches:
    s, n = score(stored, b["tokens"], b["weight"])
    total, count = total + float(s), count + float(n)
  return total / count / math.log(2.0), time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
      "--steps", type=int, default=150, help="training steps (configs/lm.py default: 150)"
  )
  ap.add_argument(
      "--test_bytes", type=int, default=32_768, help="test bytes scored (0 = whole split)"
  )
  ap.add_argument("--int4_groups", type=int, nargs="+", default=[32, 64])
  ap.add_argument("--min_size", type=int, default=256, help="smallest leaf (elements) quantised")
  ap.add_argument("--workdir", default="", help="training folder (default: a temporary one)")
  args = ap.parse_args()

  config = get_config()
  with config.unlocked():
    config.train.num_steps = args.steps
    config.train.eval_every_steps = max(args.steps // 2, 1)
    config.train.progress = False
    config.train.tensorboard = False
    config.data.test_bytes = args.test_bytes
  tmp = None if args.workdir else tempfile.TemporaryDirectory()
  workdir = args.workdir or tmp.name
  model, params, extra, test, train_s = train_or_load(config, workdir)
  score = make_scorer(model, extra)

  variants = [("float32", params, {"bytes_after": tree_bytes(params), "fallback": []})]
  variants.append(("int8",) + quantize(params, bits=8, min_size=args.min_size))
  for g in args.int4_groups:
    variants.append(
        (f"int4_g{g}",) + quantize(params, bits=4, group_size=g, min_size=args.min_size)
    )
  results, base = {}, None
  for name, stored, report in variants:
    bpb, seconds = bits_per_byte(score, stored, test)
    base = bpb if base is None else base
    results[name] = {
        "param_bytes": int(report["bytes_after"]),
        "size_reduction": round(1 - report["bytes_after"] / variants[0][2]["bytes_after"], 4),
        "test_bits_per_byte": round(bpb, 4),
        "bits_per_byte_change": round(bpb - base, 4),
        "max_abs_weight_error": round(float(report.get("max_abs_error", 0.0)), 5),
        "int8_fallback_leaves": report["fallback"],
        "score_seconds": round(seconds, 2),
    }
  print(
      json.dumps(
          {
              "benchmark": "quantize_lm",
              "machine": machine_info(),
              "note": "CPU shared with other jobs; wall times are inflated and noisy",
              "config": {
                  **vars(args),
                  "model": config.model.to_dict(),
                  "seq_len": int(config.data.seq_len),
                  "params": count_params(params),
                  "train_seconds": round(train_s, 1),
                  "test_bytes_scored": int(test.size * config.data.seq_len),
              },
              "results": results,
          }
      )
  )
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
