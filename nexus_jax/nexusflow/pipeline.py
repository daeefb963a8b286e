"""The one relational pipeline of NexusFlow: prepare -> train -> score, used by the runner and the estimator.

    prepared = prepare(config)                          # runner: config.data names the tables
    prepared = prepare(config, tables, schema)          # estimator: the user's DataFrames + schema
    result, schedule = train(prepared, config, workdir)
    results = score(prepared, result, config, schedule) # the one results dict (results.json, fit_report_)

1. `prepare`: validates the training settings (before anything is built or compiled), loads the
   tables (bundled `data.name`, a `data.path` folder, or the tables given), adds `data.drop_columns`
   to the schema, fits the `ContextSetBuilder` on training-time rows and splits the context sets
   (a split without validation rows gets 10% of the training rows carved off for early stopping:
   the latest ones, whole groups, or random rows, like the split; `carve_validation`).
   Builder settings follow ONE precedence rule, `builder_settings` (later wins):
   library defaults < the dataset's recommendation < `config.data` fields that are set < explicit
   builder keyword arguments (the estimator's `builder_kwargs`).
2. `train`: scales the schedule to the training rows (`schedule.scale_schedule`), then trains
   NexusFormer (or a deep ensemble) with the generic loop: early stopping on validation,
   checkpoints, resume in `workdir`.
3. `score`: the test split scored once, the validation metrics of the chosen checkpoint, which
   contexts mattered (attention / gates), the effective schedule, timings and (with
   `config.eval.optimize`) the int8 / pruning report (`optimization.py`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np
import pandas as pd

from nexus_jax.data.context_sets import RelationalData
from nexus_jax.data.datasets import load_dataset
from nexus_jax.data.datasets.folder import sample_target_rows
from nexus_jax.data.relational import SUMMARIES, ContextSetBuilder
from nexus_jax.data import context_index
from nexus_jax.data.schema import Schema, parse_time
from nexus_jax.nexusflow.batch_inference import predict_arrays
from nexus_jax.nexusflow.config import DEFAULT_MAX_CATEGORIES, DEFAULT_SUMMARIES
from nexus_jax.nexusflow.model_spec import validate_ensemble_config
from nexus_jax.nexusflow.objectives import evaluation_metrics, relational_arrays
from nexus_jax.nexusflow.optimization import optimization_report
from nexus_jax.nexusflow.plots import context_importance
from nexus_jax.nexusflow.schedule import scale_schedule
from nexus_jax.nexusflow.training import TrainResult, train_nexus_former
from nexus_jax.train.config import validate_train_config

SPLITS = ("train", "valid", "test")
BUILDER_ARGS = (
    "max_history",
    "contexts",
    "preprocessor",
    "table_preprocessors",
    "count_windows",
    "summaries",
)
AUX_KEYS = ("context_attention", "fusion_gates", "context_present", "iterations")
EVAL_BATCH = 2048
# With no validation rows in the schema's split, this share of the training rows (at least
# MIN_ROWS_TO_CARVE of them) becomes the validation split: early stopping needs held-out rows.
CARVED_FRACTION = 0.1
MIN_ROWS_TO_CARVE = 50


@dataclasses.dataclass
class Prepared:
  """What `prepare` built: the tables, the fitted builder and the context sets of each split."""

  name: str  # dataset name or folder ("tables" for DataFrames given directly)
  tables: dict[str, pd.DataFrame]
  schema: Schema  # with data.drop_columns applied
  builder: ContextSetBuilder  # fitted on training-time rows
  splits: dict[str, RelationalData]  # "train" | "valid" | "test"
  baselines: dict[str, Any]  # reference test metrics of a bundled dataset ({} otherwise)
  seconds: float  # wall time of loading + building
  carved_validation: int = 0  # validation rows carved from training rows (the split gave none)


# ---------------------------------------------------------------------------------------- settings
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


def parse_summaries(text: str) -> tuple[str, ...]:
  """'count,mean,max' -> ('count', 'mean', 'max'); 'all' -> every aggregate; 'none' -> ().
  Raises ValueError naming
  `config.data.summaries` for an unknown aggregate."""
  if text.strip().lower() == "none":
    return ()
  if text.strip().lower() == "all":
    return tuple(SUMMARIES)
  names = tuple(a.strip() for a in text.split(",") if a.strip())
  unknown = sorted(set(names) - set(SUMMARIES))
  if not names or unknown:
    raise ValueError(
        f"config.data.summaries={text!r}: unknown aggregate(s) {unknown}; choose from "
        f"{list(SUMMARIES)} or 'none'"
    )
  return names


def preprocessor_settings(dc: Any, recommended: Mapping[str, Any]) -> dict[str, Any]:
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


def builder_settings(
    dc: Any,
    recommended: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """`ContextSetBuilder` keyword arguments: the one precedence rule (see the module docstring).

  Args:
    dc: `config.data`.
    recommended: the dataset's recommended builder kwargs ({} for a user's own tables).
    overrides: explicit builder kwargs (the estimator's `builder_kwargs`); they win.
  Raises:
    ValueError naming an unknown builder argument.
  """
  for where, given in (
      ("the dataset's recommendation", recommended),
      ("builder_kwargs", overrides),
  ):
    unknown = sorted(set(given or {}) - set(BUILDER_ARGS))
    if unknown:
      raise ValueError(
          f"{where}: unknown ContextSetBuilder argument(s) {unknown}; known: {list(BUILDER_ARGS)}"
      )
  kwargs: dict[str, Any] = {"max_history": int(dc.max_history), **dict(recommended or {})}
  if dc.contexts:
    kwargs["contexts"] = [c.strip() for c in dc.contexts.split(",") if c.strip()]
  if int(dc.history_rows) > 0:
    kwargs["max_history"] = int(dc.history_rows)
  if dc.count_windows:
    kwargs["count_windows"] = parse_count_windows(dc.count_windows)
  if dc.summaries:
    kwargs["summaries"] = parse_summaries(dc.summaries)
  elif "summaries" not in kwargs:  # no recommendation: the library default (any schema)
    kwargs["summaries"] = DEFAULT_SUMMARIES
  kwargs["preprocessor"] = preprocessor_settings(dc, kwargs.get("preprocessor", {}))
  overrides = dict(overrides or {})
  if "preprocessor" in overrides:
    overrides["preprocessor"] = {**kwargs["preprocessor"], **overrides["preprocessor"]}
  return {**kwargs, **overrides}


# ---------------------------------------------------------------------------------------- prepare
def prepare(
    config: Any,
    tables: Mapping[str, pd.DataFrame] | None = None,
    schema: Schema | Mapping | None = None,
    builder_overrides: Mapping[str, Any] | None = None,
) -> Prepared:
  """Loads / takes the tables, builds the context sets and splits them (see the module docstring)."""
  validate_train_config(config)
  if "model" in config:
    validate_ensemble_config(config.model)
  t0 = time.perf_counter()
  dc = config.data
  if tables is None:
    ds = load_dataset(
        name=dc.name or None,
        path=dc.path or None,
        max_target_rows=int(dc.max_rows) or None,
        seed=int(config.seed),
    )
    name, tables, schema, recommended, baselines = (
        ds.name,
        ds.tables,
        ds.schema,
        ds.builder_kwargs,
        ds.baselines,
    )
  else:
    schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
    tables = sample_target_rows(tables, schema, int(dc.max_rows) or None, int(config.seed))
    name, recommended, baselines = "tables", {}, {}
  if dc.drop_columns:
    schema = with_dropped_columns(schema, dc.drop_columns)
  kwargs = builder_settings(dc, recommended, builder_overrides)
  engine = dc.get("engine", "numpy")
  options = {"memory_limit": dc.get("engine_memory_limit", "1GB")} if engine == "duckdb" else None
  builder = ContextSetBuilder(schema, engine=engine, engine_options=options, **kwargs).fit(tables)
  data = builder.transform(tables)  # row indexes + one feature table per table, gathered per batch
  splits = {s: data.subset(s) for s in SPLITS}
  del data  # the splits hold their own rows' indexes; the tables are shared
  carved = 0
  if splits["valid"].num_rows == 0 and splits["train"].num_rows >= MIN_ROWS_TO_CARVE:
    splits["train"], splits["valid"] = carve_validation(
        splits["train"], tables[schema.target.table], schema, int(config.seed)
    )
    carved = splits["valid"].num_rows
  return Prepared(
      name,
      dict(tables),
      schema,
      builder,
      splits,
      dict(baselines),
      time.perf_counter() - t0,
      carved,
  )


def carve_validation(
    train: RelationalData, target_df: pd.DataFrame, schema: Schema, seed: int
) -> tuple[RelationalData, RelationalData]:
  """(train, valid) with `CARVED_FRACTION` of the training rows moved to validation, for early
  stopping when the schema's split gives no validation rows. The same kind of split as the
  schema's: the latest rows (time), whole groups of the split key (group), else random rows.
  """
  n = train.num_rows
  n_valid = max(1, int(round(CARVED_FRACTION * n)))
  rng = np.random.default_rng(seed)
  rows = target_df.iloc[train.row_index]
  if schema.split.method == "time":
    column = schema.target_table.time_column
    ticks, _, _ = context_index.time_ticks(parse_time(rows[column], f"column {column!r}"))
    valid = np.zeros(n, bool)
    valid[np.argsort(ticks, kind="stable")[-n_valid:]] = True
  elif schema.split.method == "group" and schema.split.key in rows.columns:
    codes, uniques = pd.factorize(rows[schema.split.key], use_na_sentinel=False)
    chosen, count = set(), 0
    for g in rng.permutation(len(uniques)):
      if count >= n_valid:
        break
      chosen.add(g)
      count += int((codes == g).sum())
    valid = np.isin(codes, list(chosen))
  else:
    valid = np.zeros(n, bool)
    valid[rng.permutation(n)[:n_valid]] = True
  if valid.all():  # one group holds every row: fall back to random rows
    valid = np.zeros(n, bool)
    valid[rng.permutation(n)[:n_valid]] = True
  carved = train.take(valid)
  carved.split = np.full(carved.num_rows, "valid", dtype=object)
  return train.take(~valid), carved


# ---------------------------------------------------------------------------------------- train
def train(
    prepared: Prepared, config: Any, workdir: str | pathlib.Path
) -> tuple[TrainResult, dict[str, int]]:
  """Scales the schedule to the training rows (in `config`), then trains; returns (result, schedule)."""
  train_data, valid = prepared.splits["train"], prepared.splits["valid"]
  schedule = scale_schedule(config, train_data.num_rows)
  result = train_nexus_former(train_data, valid if valid.num_rows else None, config, workdir)
  return result, schedule


# ---------------------------------------------------------------------------------------- score
def score(
    prepared: Prepared, result: TrainResult, config: Any, schedule: Mapping[str, int]
) -> dict[str, Any]:
  """The results dict of a fit (written to results.json by the runner, `fit_report_` of the estimator)."""
  t0 = time.perf_counter()
  test = prepared.splits["test"]
  task = test.task
  names = [c["name"] for c in result.spec["contexts"]]
  tables = [c["table"] for c in result.spec["contexts"]]
  test_metrics, importance, iterations = {}, None, None
  if test.num_rows:
    arrays = relational_arrays(test, result.target_scale)
    preds, aux = predict_arrays(
        result.model, result.variables, arrays, task, EVAL_BATCH, aux_keys=AUX_KEYS
    )
    test_metrics = evaluation_metrics(task, preds, arrays["y"], result.target_scale)
    importance = context_importance(
        aux["context_attention"], aux["fusion_gates"], aux["context_present"]
    )
    iterations = float(np.mean(aux["iterations"]))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.variables["params"]))
  target = prepared.schema.target
  results: dict[str, Any] = {
      "task": f"{prepared.name}: {target.table}.{target.column} ({task}), multi-table NexusFormer",
      "test": test_metrics,
      "valid_at_best": result.fit.best_metrics or {},
      "best_step": result.fit.best_step,
      "stopped_early": result.fit.stopped_early,
      "early_stopping": list(result.early_stopping),
      "ensemble_members": [
          {k: m[k] for k in ("seed", "best_step", "valid")} for m in result.members
      ],
      "model": {
          "name": "nexus_former",
          "parameters": n_params,
          "contexts": names,
          "context_tables": tables,
          "inference_iterations_mean": iterations,
      },
      "context_importance": {}
      if importance is None
      else {
          n: {k: float(importance[k][i]) for k in ("attention", "gate", "present")}
          for i, n in enumerate(names)
      },
      "rows": {s: int(prepared.splits[s].num_rows) for s in SPLITS},
      "validation_carved_from_train": int(prepared.carved_validation),
      "schedule": dict(schedule),
      "data_seconds": round(prepared.seconds, 2),
      "train_seconds_this_call": round(result.fit.train_seconds, 2),
      # first train step + first evaluation of this call (mostly XLA compilation), inside train_seconds
      "compile_seconds": round(result.fit.compile_seconds, 2),
      "train_rows_per_second": round(result.fit.rows_per_second, 1),
      "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
  }
  if config.eval.optimize and test.num_rows:
    results["optimization"] = optimization_report(
        result.model,
        result.variables,
        relational_arrays(test, result.target_scale),
        task,
        result.target_scale,
        float(config.eval.prune_amount),
    )
  results["score_seconds"] = round(time.perf_counter() - t0, 2)
  return results
