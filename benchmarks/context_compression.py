"""Temporal context compression: window-only vs three memories vs full attention, in one run.

    python benchmarks/context_compression.py [--segment 128] [--segments 10] [--memory 32]
        [--rate 0] [--compression mean] [--layers 2] [--dim 64] [--steps 300] [--batch 8]
        [--variants window,full,compressive,summary,titans] [--plot cache.png]
    python benchmarks/context_compression.py --from_json run.json --plot cache.png

Byte LMs of the same width/depth, trained on the same batches (windows of
`segments * segment + 1` bytes of the standard library's .py sources, the LM experiment's train
split) for the same AdamW steps:
  window       `CompressiveLM(memory_slots=0)`: each segment sees itself + the previous one;
  compressive  `CompressiveLM(memory_slots=M)`: + M slots of mean-pooled (or conv) evicted K/V;
  summary      `CompressiveLM(memory="summary")`: + M learned summary slots carried forward;
  titans       `CompressiveLM(memory="titans")`: + a Titans neural memory written with each
               evicted segment (layers/segment_memory.py);
  full         causal attention over the whole sequence (the oracle, on the same code, init and
               blocks: `oracle`, a window-only model whose segment is half the sequence).
`--rate 0` picks the compression rate at which the memory holds every evicted segment of a
sequence (`segment * (segments - 2) / memory`). Test windows: up to `--per_file` non-overlapping
windows from each file of the test split. Reported per model: test bits/byte on the LAST segment
(the one with the most context); for each model vs window, the paired difference with a 95%
bootstrap interval over test FILES (files resampled, their windows kept together) and the
fraction of the oracle's gain recovered `(window - model) / (window - full)`; a repeat probe (the
last segment is a copy of segment 0, >= 8 W earlier, vs the same bytes after a different segment
0): bits/byte saved on the copy, with an interval over probe windows; decoding-cache bytes vs
length for batch 1 (flat for the segment-recurrent models; for full attention, the KV cache of a
`LanguageModel(num_experts=0)` of the same dims); bits/byte per segment position. Segment 0 sees
the same context (itself) in every model, so a gap there is how well the model trained, not
context: the summary also gives the oracle's gain net of it. Prints one JSON object: machine,
versions, config and results.
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
  models = {
      "window": window,
      "compressive": window.clone(
          memory_slots=args.memory,
          compression_rate=args.rate,
          compression=args.compression,
          reconstruction_coef=args.recon_coef,
      ),
      "summary": window.clone(memory="summary", memory_slots=args.summary_slots or args.memory),
      "titans": window.clone(
          memory="titans",
          titans_chunk=args.titans_chunk,
          titans_max_lr=args.titans_max_lr,
          titans_truncate=not args.titans_full_bptt,
      ),
      "full": oracle(window, args.segment * args.segments),
  }
  wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = sorted(set(wanted) - set(models))
  if unknown or "window" not in wanted:
    raise SystemExit(f"--variants={args.variants!r}: needs window, from {sorted(models)}")
  return {name: models[name] for name in wanted}


def oracle(window, length: int):
  """Full causal attention over `length` tokens on the window model's code, init and blocks.

  A window-only `CompressiveLM` whose segment is half the sequence: segment 1 attends to all of
  segment 0 plus itself causally, segment 0 to itself causally, so every position sees every
  earlier one - the same function as one segment of `length` (tests/layers/
  test_segment_memory_oracle.py), at half the attention cost (one segment of `length` would
  also attend over `length` masked keys of an empty previous segment). Odd lengths: one segment.
  """
  return window.clone(segment_length=length // 2 if length % 2 == 0 else length)


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
  t0, history, diverged = time.perf_counter(), [], None
  for i in range(args.steps):
    batch = jnp.asarray(windows[i * args.batch : (i + 1) * args.batch])
    params, opt, metric = step(params, opt, batch)
    history.append(metric)
    if i % 50 == 49 and not math.isfinite(float(metric[0])):
      diverged = i + 1  # NaN params stay NaN: stop instead of training on
      break
  last = np.asarray([[float(a) for a in m] for m in history[-20:]])
  return params, {
      "diverged_at_step": diverged,
      "train_seconds": time.perf_counter() - t0,
      "train_bits_per_byte_last20": float(last[:, 0].mean() / math.log(2)),
      "aux_loss_last20": float(last[:, 1].mean()),
      "params": count_params(params),
  }


def token_bits(model, params, windows: np.ndarray, chunk: int = 32) -> np.ndarray:
  """Per-target bits `[N, L]` of `windows [N, L + 1]`, in chunks padded to `chunk` rows (one
  compiled function per model and shape)."""
  fn = _nll_fn(model)
  out = []
  for i in range(0, len(windows), chunk):
    part = windows[i : i + chunk]
    padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
    out.append(np.asarray(fn(params, jnp.asarray(padded)))[: len(part)])
  return np.concatenate(out) / math.log(2)


_NLL_FNS: dict = {}


def _nll_fn(model):
  if model not in _NLL_FNS:
    _NLL_FNS[model] = jax.jit(lambda p, x: nll_per_token(model, p, x)[0])
  return _NLL_FNS[model]


def last_segment_bits(model, params, test, segment: int) -> np.ndarray:
  """Per-window mean bits/byte over the targets of the last segment, `[N]`."""
  return token_bits(model, params, test)[:, -segment:].mean(axis=1)


def paired_bootstrap(diff: np.ndarray, draws: int, seed: int = 0, groups=None) -> list[float]:
  """95% percentile interval of the mean of `diff`: windows resampled, or with `groups [N]`
  (file ids) whole groups resampled (a cluster bootstrap: the windows of a file stay together)."""
  rng = np.random.default_rng(seed)
  if groups is None:
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
  else:
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=diff, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    pick = rng.integers(0, len(ids), (draws, len(ids)))
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def test_windows_by_file(length: int, per_file: int, max_windows: int):
  """`(windows [N, length + 1] int32, file ids [N], files used)`: up to `per_file`
  non-overlapping windows from each test-split file of >= length + 1 bytes."""
  root = text.stdlib_dir()
  _, files = text.load_text_splits()
  out, ids, used = [], [], 0
  for f in files["test"]:
    data = np.frombuffer((root / f).read_bytes(), np.uint8)
    n = min(len(data) // (length + 1), per_file)
    if n < 1:
      continue
    out.append(data[: n * (length + 1)].reshape(n, length + 1))
    ids += [used] * n
    used += 1
  windows, ids = np.concatenate(out).astype(np.int32), np.asarray(ids)
  return windows[:max_windows], ids[:max_windows], used


def repeat_probe(windows: np.ndarray, segment: int):
  """`(probe, control)` `[N, L + 1]`: the last `segment` targets are a copy of the window's first
  `segment` bytes; the control has a different first segment (the next window's), so only the
  probe's copy has an earlier occurrence (`L + 1 - 2 segment` >= 8 W bytes back for 10 segments)."""
  probe = windows.copy()
  probe[:, -segment:] = windows[:, :segment]
  control = probe.copy()
  control[:, :segment] = np.roll(windows, 1, axis=0)[:, :segment]
  return probe, control


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


def save_cache_plot(result: dict, path: str) -> None:
  """Decoding-cache bytes vs decoded length (log-log), one line per model, from the printed JSON
  (`result["cache_bytes_vs_length"]`), as a PNG at `path` (matplotlib, no pyplot)."""
  from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

  fig = Figure(figsize=(5.5, 4))
  ax = fig.subplots()
  for name, curve in result["cache_bytes_vs_length"].items():
    lengths = sorted(map(int, curve))
    ax.plot(lengths, [curve[str(n)] / 1024 for n in lengths], "o-", label=name)
  cfg = result["config"]
  ax.set_xscale("log", base=2), ax.set_yscale("log", base=2)
  ax.set_xlabel("decoded length (tokens)"), ax.set_ylabel("cache (KiB, batch 1)")
  ax.set_title(f"W = {cfg['segment']}, M = {cfg['memory']}", fontsize=10)
  ax.legend(), ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


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
  ap.add_argument("--per_file", type=int, default=8, help="test windows per test file (at most)")
  ap.add_argument("--probe_windows", type=int, default=256)
  ap.add_argument("--bootstrap", type=int, default=2000)
  ap.add_argument("--variants", default="window,full,compressive,summary,titans")
  ap.add_argument("--summary_slots", type=int, default=0, help="summary slots; 0: = --memory")
  ap.add_argument("--titans_chunk", type=int, default=16)
  ap.add_argument("--titans_max_lr", type=float, default=0.02, help="inner lr bound")
  ap.add_argument("--titans_full_bptt", action="store_true", help="gradient through every write")
  ap.add_argument("--plot", default="", help="also save cache bytes vs length as this PNG")
  ap.add_argument("--from_json", default="", help="only plot (--plot) an earlier run's JSON")
  args = ap.parse_args()
  if args.from_json:
    if not args.plot:
      raise SystemExit("--from_json only plots: give --plot PATH.png as well.")
    with open(args.from_json) as f:
      save_cache_plot(json.load(f), args.plot)
    return
  if args.rate == 0:
    args.rate = max(1, args.segment * (args.segments - 2) // max(args.memory, 1))
  t_start = time.perf_counter()

  length = args.segment * args.segments
  splits, files = text.load_text_splits()
  train_windows = text.random_windows(splits["train"], length + 1, args.steps * args.batch, 0)
  test, file_ids, test_files_used = test_windows_by_file(length, args.per_file, args.test_windows)
  probe, control = repeat_probe(test[: args.probe_windows], args.segment)
  models = make_models(args)
  results, params, bits, saved, first = {}, {}, {}, {}, {}
  for name, model in models.items():
    print(f"training {name}", file=sys.stderr, flush=True)
    params[name], results[name] = train(model, train_windows.astype(np.int32), args)
    per_token = token_bits(model, params[name], test)
    bits[name] = per_token[:, -args.segment :].mean(axis=1)
    results[name]["last_segment_bits_per_byte"] = float(bits[name].mean())
    results[name]["all_positions_bits_per_byte"] = float(per_token.mean())
    segs = per_token.reshape(len(test), args.segments, args.segment).mean(axis=(0, 2))
    results[name]["per_segment_bits_per_byte"] = [round(float(b), 4) for b in segs]
    first[name] = per_token[:, : args.segment].mean(axis=1)
    on_copy = last_segment_bits(model, params[name], probe, args.segment)
    fresh = last_segment_bits(model, params[name], control, args.segment)
    saved[name] = fresh - on_copy
    results[name]["repeat_probe"] = {
        "copy_bits_per_byte": float(on_copy.mean()),
        "no_copy_bits_per_byte": float(fresh.mean()),
        "bits_per_byte_saved": float(saved[name].mean()),
        "saved_ci95": paired_bootstrap(saved[name], args.bootstrap),
    }
    print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)  # partial results

  summary = {}
  oracle_gain = net_gain = float("nan")  # without "full" in --variants: no oracle to compare
  # Difference-in-differences per window: (last segment - window's) - (segment 0 - window's).
  net_diff = lambda name: (bits[name] - bits["window"]) - (first[name] - first["window"])
  if "full" in models:
    oracle_gain = float(np.mean(bits["window"] - bits["full"]))
    net_gain = float(np.mean(-net_diff("full")))
    summary = {
        "full_minus_window_bits": -oracle_gain,
        "full_minus_window_ci95_over_files": paired_bootstrap(
            bits["full"] - bits["window"], args.bootstrap, groups=file_ids
        ),
        "oracle_beats_window": bool(oracle_gain > 0),
        # Segment 0 has the same context in every model (itself, causally): a difference there
        # is training, not context. The oracle's context gain net of it: last-segment
        # difference minus segment-0 difference (> 0: the extra context helps the oracle).
        "full_minus_window_segment0_bits": float(np.mean(first["full"] - first["window"])),
        "full_context_gain_net_of_segment0": net_gain,
        "full_context_gain_net_of_segment0_ci95_over_files": paired_bootstrap(
            -net_diff("full"), args.bootstrap, groups=file_ids
        ),
    }
  for name in models:
    if name in ("window", "full"):
      continue
    diff = bits[name] - bits["window"]
    interval = paired_bootstrap(diff, args.bootstrap, groups=file_ids)
    recovered = float(np.mean(-diff)) / oracle_gain if oracle_gain > 0 else float("nan")
    summary[name] = {
        "minus_window_bits": float(diff.mean()),
        "minus_window_ci95_over_files": interval,
        "fraction_of_oracle_gain_recovered": recovered,
        "interval_excludes_zero": bool(interval[1] < 0 or interval[0] > 0),
        "target_met": bool(interval[1] < 0 and recovered >= 0.25),
        # diagnostic, not the target: the same difference net of segment 0 (equal context there)
        "minus_window_net_of_segment0_bits": float(np.mean(net_diff(name))),
        "minus_window_net_of_segment0_ci95_over_files": paired_bootstrap(
            net_diff(name), args.bootstrap, groups=file_ids
        ),
        "fraction_of_oracle_net_gain": (
            float(np.mean(-net_diff(name))) / net_gain if net_gain > 0 else float("nan")
        ),
    }
  result = {
      "benchmark": "context_compression",
      "machine": machine_info(),
      "config": {**vars(args), "sequence_length": length, "mlp_dim": 4 * args.dim},
      "data": {
          "train_files": len(files["train"]),
          "test_files": len(files["test"]),
          "test_files_with_windows": test_files_used,
          "test_windows": len(test),
          "probe_windows": len(probe),
      },
      "models": results,
      "summary": summary,
      "cache_bytes_vs_length": cache_curve(models, params, args),
      "seconds": time.perf_counter() - t_start,
  }
  print(json.dumps(result, indent=2))
  if args.plot:
    save_cache_plot(result, args.plot)


if __name__ == "__main__":
  main()
