"""The relational benchmark suite: NexusFlow's estimator defaults vs LightGBM and a linear model.

    python benchmarks/relational_suite.py                      # every task, full size (~30 min, 2 CPUs)
    python benchmarks/relational_suite.py --quick              # smoke run of every task (small slices)
    python benchmarks/relational_suite.py --tasks pbc_death,mathach_school --seeds 0,1
    python benchmarks/relational_suite.py --override model.ensemble_size=3   # a variant of the defaults

For every task of `nexus_jax.data.datasets.relational_tasks.TASKS` (real tables from offline
packages, see benchmarks/README.md) and every seed, on the task's own split:

- NexusFlow: `NexusFlowClassifier()` / `NexusFlowRegressor()` with no arguments (plus `--override`
  config fields when exploring a variant), fitted on the tables + schema; test rows predicted once;
- LightGBM (early-stopped on the same validation rows) and a linear model (logistic / ridge, penalty
  picked on validation) on `flat_join` of the same tables: the target row's columns, parent columns
  and aggregates of the visible child rows (`nexus_jax/nexusflow/baselines.py`).

Output: one JSON object per task (metrics, fit seconds with NexusFlow's compile time apart, paired
bootstrap 95% intervals of each model's difference to LightGBM, win / tie / loss and ranks), then one
summary line with exactly the keys `SUMMARY_KEYS`. With several seeds, metrics are the mean over
seeds and the intervals come from the seed-averaged predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import pandas as pd

SUMMARY_KEYS = (
    "suite",
    "tasks",
    "wins_vs_lightgbm",
    "ties_vs_lightgbm",
    "mean_rank",
    "mean_fit_seconds",
    "mean_lightgbm_fit_seconds",
)
QUICK_ENTITIES = 150  # entities per task in --quick mode
QUICK_OVERRIDES = {"train.min_steps": 20, "train.min_epochs": 1, "eval.optimize": False}


def _parse_override(text: str) -> tuple[str, object]:
  key, _, raw = text.partition("=")
  if not key or not _:
    raise SystemExit(f"--override {text!r}: expected dotted.key=value")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  return key, value


def _labels(y: pd.Series, task: str, classes) -> np.ndarray:
  if task == "regression":
    return y.to_numpy(np.float64)
  return pd.Index(list(classes)).get_indexer(y).astype(np.int64)


def _nexusflow(tables, schema, task: str, seed: int, overrides: dict, quiet: bool):
  """Fits the estimator with its defaults (+ overrides); predictions for every target row."""
  from nexus_jax import NexusFlowClassifier, NexusFlowRegressor

  cls = NexusFlowRegressor if task == "regression" else NexusFlowClassifier
  est = cls(seed=seed, config_overrides=overrides or None)
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    if quiet:
      warnings.simplefilter("ignore")
    est.fit(tables, schema)
  fit_seconds = time.perf_counter() - t0
  target = schema["target"]
  unlabelled = {**tables, target["table"]: tables[target["table"]].drop(columns=target["column"])}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if task == "regression":
      pred = np.asarray(est.predict(unlabelled), np.float64)
    else:
      proba = np.asarray(est.predict_proba(unlabelled), np.float64)
      pred = proba[:, 1] if task == "binary" else proba
  report = est.fit_report_
  timing = {
      "fit_seconds": round(fit_seconds, 2),
      "compile_seconds": report.get("compile_seconds"),
      "data_seconds": report.get("data_seconds"),
      "train_seconds": report.get("train_seconds_this_call"),
      "score_seconds": report.get("score_seconds"),
      "steps": report.get("schedule", {}).get("num_steps"),
      "best_step": report.get("best_step"),
  }
  return pred, timing, (None if est.classes_ is None else list(est.classes_))


def run_task(name: str, seeds: list[int], max_entities: int | None, overrides: dict, n_boot: int):
  """One task: every model on the same split; returns the task's JSON-able result."""
  from nexus_jax.data.datasets.relational_tasks import TASKS
  from nexus_jax.data.relational import label_classes
  from nexus_jax.data.schema import Schema
  from nexus_jax.data.splits import assign_split
  from nexus_jax.nexusflow import baselines, comparison
  from nexus_jax.nexusflow.flat_join import flat_join

  spec = TASKS[name]
  t0 = time.perf_counter()
  tables, schema_dict = spec.load(max_entities=max_entities)
  load_seconds = time.perf_counter() - t0
  schema = Schema.from_dict(schema_dict)
  target = schema.target
  target_df = tables[target.table].reset_index(drop=True)
  tables = {**tables, target.table: target_df}
  times = None
  if schema.target_table.time_column is not None:
    from nexus_jax.data.schema import parse_time

    times = parse_time(target_df[schema.target_table.time_column], "target time")
  split = assign_split(schema, target_df, times)
  classes = label_classes(target_df[target.column], target.task)
  y = _labels(target_df[target.column], target.task, classes)
  t0 = time.perf_counter()
  features = flat_join(tables, schema)
  join_seconds = time.perf_counter() - t0
  rows = {s: int((split == s).sum()) for s in ("train", "valid", "test")}
  tr, va, te = (split == "train"), (split == "valid"), (split == "test")
  preds = {"nexusflow": [], "lightgbm": [], "linear": []}
  fits = {k: [] for k in preds}
  for seed in seeds:
    pred, timing, nf_classes = _nexusflow(
        tables, schema_dict, target.task, seed, overrides, quiet=True
    )
    if nf_classes is not None and list(nf_classes) != list(classes):
      raise RuntimeError(f"{name}: estimator classes {nf_classes} != {list(classes)}")
    preds["nexusflow"].append(pred[te])
    fits["nexusflow"].append(timing)
    for model, fit_fn in (("lightgbm", baselines.fit_lightgbm), ("linear", baselines.fit_linear)):
      fitted = fit_fn(features[tr], y[tr], features[va], y[va], target.task, seed)
      preds[model].append(fitted.predict(features[te]))
      fits[model].append({"fit_seconds": round(fitted.fit_seconds, 2), **fitted.details})
  y_test = y[te]
  mean_pred = {k: np.mean(v, axis=0) for k, v in preds.items()}
  metrics = {
      k: {
          m: float(np.mean([comparison.task_metrics(target.task, y_test, p)[m] for p in v]))
          for m in comparison.task_metrics(target.task, y_test, v[0])
      }
      for k, v in preds.items()
  }
  primary = comparison.PRIMARY[target.task]
  intervals, outcomes = {}, {}
  for k in ("nexusflow", "linear"):
    lo, hi = comparison.paired_bootstrap(
        target.task, y_test, mean_pred[k], mean_pred["lightgbm"], n_boot=n_boot
    )
    intervals[k] = [round(lo, 5), round(hi, 5)]
    outcomes[k] = comparison.outcome(target.task, lo, hi)
  return {
      "task": name,
      "kind": target.task,
      "metric": primary,
      "seeds": seeds,
      "rows": rows,
      "tables": {t: int(len(df)) for t, df in tables.items()},
      "flat_features": int(features.shape[1]),
      "load_seconds": round(load_seconds, 2),
      "flat_join_seconds": round(join_seconds, 2),
      **{k: {**metrics[k], "fits": fits[k]} for k in preds},
      "diff_vs_lightgbm_95": intervals,
      "outcome_vs_lightgbm": outcomes,
      "ranks": comparison.ranks(target.task, {k: metrics[k][primary] for k in preds}),
      "overrides": overrides,
  }


def summary_line(results: list[dict]) -> dict:
  """The suite's last line: exactly `SUMMARY_KEYS`."""

  def mean_fit(model: str) -> float:
    return float(np.mean([np.mean([f["fit_seconds"] for f in r[model]["fits"]]) for r in results]))

  out = {
      "suite": "relational",
      "tasks": len(results),
      "wins_vs_lightgbm": sum(r["outcome_vs_lightgbm"]["nexusflow"] == "win" for r in results),
      "ties_vs_lightgbm": sum(r["outcome_vs_lightgbm"]["nexusflow"] == "tie" for r in results),
      "mean_rank": round(float(np.mean([r["ranks"]["nexusflow"] for r in results])), 3),
      "mean_fit_seconds": round(mean_fit("nexusflow"), 2),
      "mean_lightgbm_fit_seconds": round(mean_fit("lightgbm"), 2),
  }
  assert tuple(out) == SUMMARY_KEYS
  return out


def markdown_table(results: list[dict]) -> str:
  """The README table of a run: one row per task, metric of each model, NexusFlow's interval vs
  LightGBM and outcome, fit seconds (NexusFlow: total / compile)."""
  lines = [
      "| task | kind | train / valid / test rows | metric | NexusFlow | LightGBM | linear | "
      "NexusFlow - LightGBM (95% CI) | outcome | fit s NexusFlow (compile) | fit s LightGBM | "
      "fit s linear |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    m, rows = r["metric"], r["rows"]
    fit = {
        k: np.mean([f["fit_seconds"] for f in r[k]["fits"]])
        for k in ("nexusflow", "lightgbm", "linear")
    }
    compile_s = np.mean([f["compile_seconds"] or 0 for f in r["nexusflow"]["fits"]])
    lo, hi = r["diff_vs_lightgbm_95"]["nexusflow"]
    lines.append(
        f"| {r['task']} | {r['kind']} | {rows['train']:,} / {rows['valid']:,} / {rows['test']:,} | "
        f"{m} | {r['nexusflow'][m]:.4f} | {r['lightgbm'][m]:.4f} | {r['linear'][m]:.4f} | "
        f"[{lo:+.4f}, {hi:+.4f}] | {r['outcome_vs_lightgbm']['nexusflow']} | "
        f"{fit['nexusflow']:.0f} ({compile_s:.0f}) | {fit['lightgbm']:.1f} | {fit['linear']:.1f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from nexus_jax.data.datasets.relational_tasks import TASKS

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
  parser.add_argument("--quick", action="store_true", help="small slices + short training")
  parser.add_argument("--max-entities", type=int, default=0, help="entities per task (0 = all)")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds")
  parser.add_argument("--override", action="append", default=[], help="config field=value")
  parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
  parser.add_argument("--markdown", default="", help="also write the README table to this file")
  parser.add_argument(
      "--table-from", default="", help="only render --markdown from this file of JSON lines"
  )
  args = parser.parse_args(argv)
  if args.table_from:
    with open(args.table_from) as f:
      rows = [json.loads(l) for l in f if l.startswith('{"task"')]
    print(markdown_table(rows))
    return 0
  names = [t for t in args.tasks.split(",") if t] or list(TASKS)
  unknown = [t for t in names if t not in TASKS]
  if unknown:
    parser.error(f"unknown task(s) {unknown}; tasks: {list(TASKS)}")
  overrides = dict(QUICK_OVERRIDES) if args.quick else {}
  overrides.update(_parse_override(o) for o in args.override)
  max_entities = args.max_entities or (QUICK_ENTITIES if args.quick else None)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  n_boot = min(args.n_boot, 200) if args.quick else args.n_boot
  results = []
  for name in names:
    result = run_task(name, seeds, max_entities, overrides, n_boot)
    results.append(result)
    print(json.dumps(result), flush=True)
  print(json.dumps(summary_line(results)), flush=True)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(markdown_table(results) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
