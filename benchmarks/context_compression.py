"""Temporal context compression: window-only vs Compressive-Transformer memory vs full attention.

    python benchmarks/context_compression.py [--segment 128] [--segments 10] [--memory 32]
        [--rate 0] [--compression mean] [--layers 2] [--dim 64] [--steps 300] [--batch 8]

Three byte LMs of the same width/depth, trained on the same batches (windows of
`segments * segment + 1` bytes of the standard library's .py sources, the LM experiment's train
split) for the same AdamW steps:
  window       `CompressiveLM(memory_slots=0)`: each segment sees itself + the previous one;
  compressive  `CompressiveLM(memory_slots=M)`: + M slots of mean-pooled (or conv) evicted K/V;
  full         `CompressiveLM(segment_length=segments * segment)`: one segment = causal attention
               over the whole sequence (the oracle, on the same code, init and blocks).
`--rate 0` picks the compression rate at which the memory holds every evicted segment of a
sequence (`segment * (segments - 2) / memory`). Reported: test bits/byte on the LAST segment
(the one with the most context), the paired bootstrap 95% interval of compressive - window over
test windows, the fraction of the oracle's gain recovered `(window - compressive) / (window -
full)`, and decoding-cache bytes vs length for batch 1 (flat for window and compressive; for
full attention, the KV cache of a `LanguageModel(num_experts=0)` of the same dims).
Prints one JSON object: machine, versions, config and results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from benchmarks.lm_training import lm_optimizer, make_train_step  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.models import compressive_lm  # noqa: E402
from nexus_jax.models import decoding  # noqa: E402
from nexus_jax.models.lm import LanguageModel, count_params  # noqa: E402


def make_models(args) -> dict:
  common = dict(
      num_layers=args.layers,
      embed_dim=args.dim,
      num_heads=args.heads,
      num_kv_heads=args.kv_heads,
      mlp_dim=4 * args.dim,
  )
  window = compressive_lm.CompressiveLM(
      vocab_size=256, segment_length=args.segment, memory_slots=0, **common
  )
  return {
      "window": window,
      "compressive": window.clone(
          memory_slots=args.memory,
          compression_rate=args.rate,
          compression=args.compression,
          reconstruction_coef=args.recon_coef,
      ),
      "full": window.clone(segment_length=args.segment * args.segments),
  }


def nll_per_token(model, params, inputs):
  """`[B, T]` next-byte negative log-likelihoods (nats) and the summed sown aux losses."""
  (logits, _), state = model.apply({"params": params}, inputs[:, :-1], mutable=["aux_loss"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), inputs[:, 1:])
  aux = sum((jnp.sum(a) for a in jax.tree.leaves(state.get("aux_loss", {}))), jnp.zeros(()))
  return nll, aux


def train(model, windows, args):
  tx = lm_optimizer(args.steps, lr=args.lr)

  def loss_fn(p, batch):
    nll, aux = nll_per_token(model, p, batch)
    return jnp.mean(nll) + aux, (jnp.mean(nll), aux)

  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(windows[:1, :-1]))["params"]
  opt = tx.init(params)
  step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=(0, 1))
  t0, history = time.perf_counter(), []
  for i in range(args.steps):
    batch = jnp.asarray(windows[i * args.batch : (i + 1) * args.batch])
    params, opt, metric = step(params, opt, batch)
    history.append(metric)
  last = np.asarray([[float(a) for a in m] for m in history[-20:]])
  return params, {
      "train_seconds": time.perf_counter() - t0,
      "train_bits_per_byte_last20": float(last[:, 0].mean() / math.log(2)),
      "aux_loss_last20": float(last[:, 1].mean()),
      "params": count_params(params),
  }


def last_segment_bits(model, params, test, segment: int, chunk: int = 32) -> np.ndarray:
  """Per-window mean bits/byte over the targets of the last segment, `[N]`."""
  fn = jax.jit(lambda p, x: jnp.mean(nll_per_token(model, p, x)[0][:, -segment:], axis=1))
  out = [
      np.asarray(fn(params, jnp.asarray(test[i : i + chunk]))) for i in range(0, len(test), chunk)
  ]
  return np.concatenate(out) / math.log(2)


def paired_bootstrap(diff: np.ndarray, draws: int, seed: int = 0) -> list[float]:
  """95% percentile interval of the mean of `diff` over resampled windows."""
  rng = np.random.default_rng(seed)
  means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def cache_curve(models, params, args) -> dict:
  """Decoding-cache bytes (batch 1) at lengths 1x, 2x, 4x, 8x the training sequence."""
  lengths = [args.segment * args.segments * m for m in (1, 2, 4, 8)]
  curve = {}
  for name, model in models.items():
    if name == "full":  # a standard KV cache of the same layers / kv heads / head dim
      lm = LanguageModel(
          vocab_size=256,
          num_experts=0,
          num_layers=model.num_layers,
          embed_dim=model.embed_dim,
          num_heads=model.num_heads,
          num_kv_heads=model.num_kv_heads,
          mlp_dim=model.mlp_dim,
      )
      sizes = [
          compressive_lm.cache_bytes(
              jax.eval_shape(lambda n=n: decoding.init_cache(lm.clone(max_len=n), 1, n))
          )
          for n in lengths
      ]
    else:  # the same cache at every length: it never grows
      size = compressive_lm.cache_bytes(compressive_lm.init_cache(model, params[name], 1))
      sizes = [size] * len(lengths)
    curve[name] = dict(zip(map(str, lengths), sizes))
  return curve


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--segment", type=int, default=128, help="W, tokens per segment")
  ap.add_argument("--segments", type=int, default=10, help="segments per training sequence")
  ap.add_argument("--memory", type=int, default=32, help="M, compressed memory slots")
  ap.add_argument("--rate", type=int, default=0, help="compression rate c; 0: memory holds all")
  ap.add_argument("--compression", default="mean", choices=("mean", "conv"))
  ap.add_argument("--recon_coef", type=float, default=1.0)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--test_windows", type=int, default=1024)
  ap.add_argument("--bootstrap", type=int, default=2000)
  args = ap.parse_args()
  if args.rate == 0:
    args.rate = max(1, args.segment * (args.segments - 2) // max(args.memory, 1))
  t_start = time.perf_counter()

  length = args.segment * args.segments
  splits, files = text.load_text_splits()
  train_windows = text.random_windows(splits["train"], length + 1, args.steps * args.batch, 0)
  test = text.random_windows(splits["test"], length + 1, args.test_windows, 1).astype(np.int32)
  models = make_models(args)
  results, params, bits = {}, {}, {}
  for name, model in models.items():
    params[name], results[name] = train(model, train_windows.astype(np.int32), args)
    bits[name] = last_segment_bits(model, params[name], test, args.segment)
    results[name]["last_segment_bits_per_byte"] = float(bits[name].mean())
    all_bits = last_segment_bits(model, params[name], test, length)
    results[name]["all_positions_bits_per_byte"] = float(all_bits.mean())

  diff = bits["compressive"] - bits["window"]
  oracle_gain = float(np.mean(bits["window"] - bits["full"]))
  recovered = float(np.mean(-diff)) / oracle_gain if oracle_gain > 0 else float("nan")
  interval = paired_bootstrap(diff, args.bootstrap)
  summary = {
      "compressive_minus_window_bits": float(diff.mean()),
      "compressive_minus_window_ci95": interval,
      "full_minus_window_bits": -oracle_gain,
      "full_minus_window_ci95": paired_bootstrap(bits["full"] - bits["window"], args.bootstrap),
      "fraction_of_oracle_gain_recovered": recovered,
      "interval_excludes_zero": bool(interval[1] < 0 or interval[0] > 0),
      "target_met": bool(interval[1] < 0 and recovered >= 0.25),
  }
  print(
      json.dumps(
          {
              "benchmark": "context_compression",
              "machine": machine_info(),
              "config": {**vars(args), "sequence_length": length, "mlp_dim": 4 * args.dim},
              "data": {
                  "train_files": len(files["train"]),
                  "test_files": len(files["test"]),
                  "test_windows": len(test),
              },
              "models": results,
              "summary": summary,
              "cache_bytes_vs_length": cache_curve(models, params, args),
              "seconds": time.perf_counter() - t_start,
          },
          indent=2,
      )
  )


if __name__ == "__main__":
  main()
