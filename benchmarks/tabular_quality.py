"""Test quality on nycflights13: NexusFormer (quick / full presets) and each row encoder alone on feature
set A, next to the gradient-boosted trees of shared/TASKS.md; prints ONE JSON object.

    python benchmarks/tabular_quality.py                                   # everything (hours on a CPU)
    python benchmarks/tabular_quality.py --runs nexus_quick,mlp,tabm       # a subset
    python benchmarks/tabular_quality.py --runs nexus_quick --from_results runs/x/results.json
    python benchmarks/tabular_quality.py --max_rows 20000 --epochs 1       # a quick smoke run

Every run goes through the library code that `python -m experiments.run` uses (NexusFormer:
`nexusflow.pipeline` prepare -> train -> score; row encoders: `nexusflow.flat.train_row_model`), in
its own folder under `--workdir`; rerunning resumes finished runs. `--from_results NAME=PATH` takes a
run's numbers from an existing results.json instead of training again. Targets (TASKS.md): NexusFormer
quick >= LightGBM on set A (0.6957), full >= CatBoost on set B (0.7160).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax

from configs.tabular import PRESETS, get_config
from nexus_jax.data.datasets import nycflights13
from nexus_jax.nexusflow import pipeline
from nexus_jax.nexusflow.flat import train_row_model
from nexus_jax.train.presets import resolve_preset

ENCODERS = ("mlp", "resnet", "tabm", "ft_transformer", "tabnet")
RUNS = ("nexus_quick", "nexus_full") + ENCODERS


def config_for(name: str, args: argparse.Namespace):
  c = get_config()
  c.train.progress = False
  if name.startswith("nexus_"):
    c.preset = name.split("_", 1)[1]
  else:
    c.model.name = "row"
    c.model.row.encoder = (
        name  # the encoder's own defaults (FT-Transformer: the paper's default, "large")
    )
    c.train.num_epochs = 4
  if args.max_rows:
    c.data.max_rows = args.max_rows
  if args.epochs:
    c.train.num_epochs = args.epochs
  resolve_preset(c, PRESETS, get_config(), explicit={"train.num_epochs"} if args.epochs else ())
  return c


def run_one(config, workdir: pathlib.Path) -> dict:
  """Trains (or resumes) one run in `workdir`; returns its results (test metrics, parameters, ...)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if config.model.name == "row":
    run = train_row_model(config, workdir)
    return {
        "test": run.test_metrics,
        "best_step": run.result.best_step,
        "train_rows_per_second": run.result.rows_per_second,
        "model": {"parameters": run.parameters},
    }
  prepared = pipeline.prepare(config)
  result, schedule = pipeline.train(prepared, config, workdir)
  return pipeline.score(prepared, result, config, schedule)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
  parser.add_argument("--workdir", default="runs/benchmark_quality")
  parser.add_argument("--max_rows", type=int, default=0, help="subsample flights (0 = all)")
  parser.add_argument(
      "--epochs", type=int, default=0, help="override every run's epochs (0 = config's)"
  )
  parser.add_argument(
      "--from_results", action="append", default=[], help="NAME=path/to/results.json"
  )
  args = parser.parse_args()
  runs = [r for r in args.runs.split(",") if r]
  unknown = sorted(set(runs) - set(RUNS))
  if unknown:
    raise SystemExit(f"--runs: unknown {unknown}; choose from {RUNS}")
  given = dict(item.split("=", 1) for item in args.from_results)
  out = {}
  for name in runs:
    if name in given:
      r = json.loads(pathlib.Path(given[name]).read_text())
      source = given[name]
    else:
      t0 = time.perf_counter()
      r = run_one(config_for(name, args), pathlib.Path(args.workdir) / name)
      r["wall_seconds"] = round(time.perf_counter() - t0, 1)
      source = str(pathlib.Path(args.workdir) / name)
    out[name] = {
        "test": r["test"],
        "train_rows_per_second": r.get("train_rows_per_second"),
        "wall_seconds": r.get("wall_seconds"),
        "parameters": r["model"]["parameters"],
        "best_step": r.get("best_step"),
        "results": source,
    }
  quick, full = out.get("nexus_quick"), out.get("nexus_full")
  targets = {}
  if quick:
    targets["nexus_quick_vs_lightgbm_set_a"] = (
        quick["test"]["auc"] - nycflights13.BASELINES["lightgbm_set_a"]["test_auc"]
    )
  if full:
    targets["nexus_full_vs_catboost_set_b"] = (
        full["test"]["auc"] - nycflights13.BASELINES["catboost_set_b"]["test_auc"]
    )
  print(
      json.dumps(
          {
              "benchmark": "tabular_quality",
              "task": "nycflights13 delayed > 15 min, test = December",
              "runs": out,
              "auc_margin_to_targets": targets,
              "baselines_test_auc": {k: v["test_auc"] for k, v in nycflights13.BASELINES.items()},
              "settings": {"max_rows": args.max_rows, "epochs_override": args.epochs},
              "machine": {
                  "platform": platform.platform(),
                  "cpus": os.cpu_count(),
                  "device": str(jax.devices()[0]),
              },
              "versions": {"jax": jax.__version__, "python": platform.python_version()},
          },
          indent=2,
          default=str,
      )
  )


if __name__ == "__main__":
  main()
