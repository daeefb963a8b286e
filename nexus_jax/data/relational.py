"""Leakage-safe relational context sets: for every target row, the related rows it may see.

Every target row has a prediction time (the target table's ``time_column``) and sees only rows known
at that time, as RelBench and featuretools define it. Contexts are discovered from the schema:

- **parents** (``"<fk>-><table>"``, M = 1): the row a foreign key of the target row points to. Two keys
  to one table (``origin->airports``, ``dest->airports``) are two distinct contexts. A parent with a
  time column is visible only if its time is at or before the target time.
- **histories** (``"<table>.<column>=<target column>"``, up to M rows, most recent first): rows of a
  table that share a parent with the target row (``flights.tailnum=tailnum``: the same plane's
  flights; ``weather.origin=origin``: the origin's weather) or that reference the target row directly
  (``visits.patient_id=id``), with time at or before the target time -- strictly before when the
  table is the target table itself, so a row never sees itself (nor rows of the same instant).
  Without a target time every related row counts as known (the user passes only rows that are; a
  target-table row still never sees itself) and rows are ordered by their own time, else table order.

Features: each table gets one `TabularPreprocessor`, fitted on the rows known during training (the
target table: train split rows; other tables with a time column under a time split: rows before
``valid_start``; otherwise all rows, which carry no labels). ``drop_columns``, primary keys and the
target column never become features of any row (the target table's history rows included).
Foreign-key columns are categorical features (codes), never numbers. A table with no such rows
(empty, or no row timed before ``valid_start``) learns no features (a `SchemaWarning` at fit); its
contexts keep that layout at predict time and are empty (mask all False) while it has no rows.

**Window counts** (``count_windows``, optional): attention pooling over at most M rows cannot tell a
busy key from a quiet one beyond M rows, so for every history context with times the target row also
gets ``log1p`` of how many visible rows fall within each trailing window (``count[<context>,<w>]``,
hours for datetimes) -- e.g. how many departures the origin had in the previous 3 hours. Histories
without times get the count of all their rows (``count[<context>,all]``). These are numeric features of
the target row (appended after the preprocessor's); they are stateless, so predict time recomputes them
from the tables it is given.

**Summaries** (``summaries``, optional): the same blind spot for values -- pooling sees the M most
recent rows only -- so the target row can also get aggregates over *all* visible rows of every history
context (`data/summaries.py`: ``count``, ``mean``, ``min``, ``max``, ``sum``, ``last`` of the related
table's numeric columns, ``levels`` = counts of its most frequent categories, fixed at fit). They are
raw columns of the target row, preprocessed with its own features (quantile transform, missing flags).

Use::

    builder = ContextSetBuilder(schema, max_history={"flights.tailnum=tailnum": 8}, contexts=None)
    data = builder.fit(tables).transform(tables)        # -> context_sets.RelationalData
    train = data.subset("train")                         # row indexes only; feature tables shared
    batch = train.batch(np.arange(256))                  # pytree of numpy arrays for a model
    dense = train.arrays()                               # every row materialised (small data)
    builder.save(d); ContextSetBuilder.load(d).transform(new_tables)   # predict-time, same features

or `build_context_sets(tables, schema, ...)` for fit + transform in one call. Everything is
vectorised (pandas factorize/merge logic + numpy searchsorted/take); see `context_index`.
The result keeps one preprocessed `FeatureTable` per table and an int32 row index per context
(`context_sets`): features are gathered per batch, never copied per row. With
``engine="duckdb"`` the history indexes and window counts are computed by DuckDB out of core
(`duckdb_index`; the ``[duckdb]`` extra), giving the numpy engine's rows exactly.
"""

from __future__ import annotations

import json
import warnings
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from nexus_jax.data import context_index as ci
from nexus_jax.data.context_sets import (
    AGE_FEATURE,
    ContextArrays,
    ContextSpec,
    FeatureTable,
    RelationalData,
)
from nexus_jax.data.preprocess import FeatureInfo, TabularPreprocessor
from nexus_jax.data.schema import Schema, SchemaError, SchemaWarning, ValidationReport, parse_cutoff, parse_time
from nexus_jax.data import summaries as summaries_lib
from nexus_jax.data.splits import assign_split

BUILDER_FILE = "context_set_builder.json"
SUMMARIES = summaries_lib.AGGREGATES
ENGINES = ("numpy", "duckdb")


def discover_contexts(
    schema: Schema, max_history: int | Mapping[str, int] = 16
) -> list[ContextSpec]:
  """All parent and history contexts of the target table, in a stable order.

  Args:
    schema: the task schema.
    max_history: M for every history context, or name -> M (names not given use 16).
  Returns:
    list of `ContextSpec`: parents first (in foreign-key order), then shared-parent histories,
    then tables referencing the target table.
  """
  target = schema.target_table
  specs: list[ContextSpec] = []

  def m_of(name: str) -> int:
    m = max_history.get(name, 16) if isinstance(max_history, Mapping) else max_history
    if int(m) < 1:
      raise ValueError(f"max_history[{name!r}] = {m}; must be >= 1")
    return int(m)

  for column, parent in target.foreign_keys.items():
    specs.append(
        ContextSpec(
            f"{column}->{parent}",
            "parent",
            parent,
            column,
            schema.tables[parent].primary_key,
            parent == target.name,
            1,
        )
    )
  for column, parent in target.foreign_keys.items():
    for child, child_column in schema.children_of(parent):
      name = f"{child}.{child_column}={column}"
      specs.append(
          ContextSpec(
              name, "history", child, column, child_column, child == target.name, m_of(name)
          )
      )
  if target.primary_key is not None:
    for child, child_column in schema.children_of(target.name):
      name = f"{child}.{child_column}={target.primary_key}"
      specs.append(
          ContextSpec(
              name,
              "history",
              child,
              target.primary_key,
              child_column,
              child == target.name,
              m_of(name),
          )
      )
  unique = {s.name: s for s in specs}
  return list(unique.values())


def label_classes(y: pd.Series, task: str) -> tuple | None:
  """Label vocabulary: None (regression), (0, 1) for 0/1 or bool binaries, else sorted values."""
  if task == "regression":
    return None
  values = pd.unique(y.dropna()).tolist()
  if (
      task == "binary"
      and (pd.api.types.is_bool_dtype(y.dtype) or pd.api.types.is_numeric_dtype(y.dtype))
      and set(float(v) for v in values) <= {0.0, 1.0}
  ):
    return (0, 1)
  return tuple(sorted(values, key=lambda v: (str(type(v)), v)))


def _signed_log1p(x: np.ndarray) -> np.ndarray:
  return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)


class ContextSetBuilder:
  """Fits per-table preprocessors on training-time rows; builds `RelationalData` for any tables.

  Args:
    schema: the task schema.
    max_history: M for every history context, or context name -> M.
    contexts: names of the contexts to build (default: all of `discover_contexts`).
    preprocessor: keyword arguments of `TabularPreprocessor` for every table.
    table_preprocessors: table name -> keyword arguments overriding `preprocessor` for that table.
    count_windows: trailing windows (hours for datetimes, raw units for numeric times) of the
      window-count features of every history context (see the module docstring); () = none.
    summaries: aggregates over all visible rows of every history context, a subset of
      `SUMMARIES` (see the module docstring); () = none.
    engine: "numpy" (in memory, `context_index`) or "duckdb" (history indexes and window counts
      out of core, `duckdb_index`; the same rows). A runtime choice: not saved with the builder.
    engine_options: `duckdb_index.connect` options (memory_limit, threads, temp_directory).
  """

  def __init__(
      self,
      schema: Schema,
      max_history: int | Mapping[str, int] = 16,
      contexts: Sequence[str] | None = None,
      preprocessor: Mapping | None = None,
      table_preprocessors: Mapping[str, Mapping] | None = None,
      count_windows: Sequence[float] = (),
      summaries: Sequence[str] = (),
      engine: str = "numpy",
      engine_options: Mapping | None = None,
  ):
    self.schema = schema
    if engine not in ENGINES:
      raise ValueError(f"engine={engine!r}; choose one of {ENGINES}")
    if engine_options and engine != "duckdb":
      raise ValueError(f"engine_options apply to engine='duckdb' only (engine={engine!r})")
    self.engine, self.engine_options = engine, dict(engine_options or {})
    unknown_summaries = sorted(set(summaries) - set(SUMMARIES))
    if unknown_summaries:
      raise ValueError(f"summaries: unknown {unknown_summaries}; choose from {list(SUMMARIES)}")
    available = discover_contexts(schema, max_history)
    names = [s.name for s in available]
    if isinstance(max_history, Mapping):
      unknown = sorted(set(max_history) - set(names))
      if unknown:
        raise ValueError(f"max_history names unknown context(s) {unknown}; available: {names}")
    if contexts is None:
      self.contexts = available
    else:
      unknown = [c for c in contexts if c not in names]
      if unknown:
        raise ValueError(f"contexts: unknown context(s) {unknown}; available: {names}")
      self.contexts = [s for s in available if s.name in set(contexts)]
    for table in table_preprocessors or {}:
      if table not in schema.tables:
        raise ValueError(
            f"table_preprocessors: unknown table {table!r}; tables: {sorted(schema.tables)}"
        )
    windows = [float(w) for w in count_windows]
    if any(not (np.isfinite(w) and w > 0) for w in windows):
      raise ValueError(f"count_windows must be positive finite numbers, got {list(count_windows)}")
    self.config = {
        "max_history": dict(max_history) if isinstance(max_history, Mapping) else int(max_history),
        "contexts": [s.name for s in self.contexts],
        "preprocessor": dict(preprocessor or {}),
        "table_preprocessors": {k: dict(v) for k, v in (table_preprocessors or {}).items()},
        "count_windows": windows,
        "summaries": [a for a in SUMMARIES if a in set(summaries)],
    }
    self.preprocessors: dict[str, TabularPreprocessor] = {}
    self.classes: tuple | None = None
    self.report: ValidationReport | None = None

  @property
  def tables_used(self) -> list[str]:
    """The target table first, then every table some context reads."""
    out = [self.schema.target.table]
    return out + sorted({s.table for s in self.contexts} - set(out))

  def _features(self, table: str, df: pd.DataFrame) -> pd.DataFrame:
    return df[self.schema.feature_columns(table, df)]

  def _target_features(self, tables: Mapping[str, pd.DataFrame], times) -> pd.DataFrame:
    """The target table's feature columns plus the summaries of every history context."""
    target = self.schema.target.table
    own = self._features(target, tables[target])
    wanted = self.config.get("summaries") or ()
    if not wanted:
      return own
    t_ticks, _, _ = ci.time_ticks(times)
    levels = self.config.setdefault("summary_levels", {})
    extra: dict[str, np.ndarray] = {}
    for spec in self.contexts:
      if spec.kind != "history":
        continue
      if spec.name not in levels:  # fit: the most frequent values of the related table's categories
        levels[spec.name] = summaries_lib.summary_levels(tables[spec.table], self.schema, spec)
      extra.update(
          summaries_lib.history_summaries(
              tables, self.schema, spec, t_ticks, wanted, levels[spec.name]
          )
      )
    names = self.config.setdefault("summary_columns", list(extra))  # fixed at fit
    frame = pd.DataFrame(
        {n: extra.get(n, np.full(len(own), np.nan)) for n in names}, index=own.index
    )
    return pd.concat([own, frame], axis=1)

  # ------------------------------------------------------------------ fit
  def fit(self, tables: Mapping[str, pd.DataFrame]) -> "ContextSetBuilder":
    """Validates `tables`, fits one preprocessor per used table on training-time rows, and the classes."""
    schema = self.schema
    self.report = schema.validate(tables, require_target=True)
    target = schema.target.table
    target_df = tables[target]
    times = self._target_times(target_df)
    split = assign_split(schema, target_df, times)
    if not (split == "train").any():
      raise SchemaError(f"split: no training rows in table {target!r}; check the split settings")
    self.config.pop("summary_levels", None)  # refit: chosen again from these tables
    self.config.pop("summary_columns", None)
    target_features = self._target_features(tables, times)
    for table in self.tables_used:
      df = tables[table]
      if table == target:
        rows = target_features[split == "train"]
      elif schema.split.method == "time" and schema.tables[table].time_column is not None:
        column = schema.tables[table].time_column
        where = f"table {table!r} column {column!r}"
        t = parse_time(df[column], where)
        known = t.notna().to_numpy()
        if known.any():  # an all-null column has no type to compare valid_start with
          known = known & (t < parse_cutoff(schema.split.valid_start, t, where)).to_numpy()
        rows = df[known]
      else:
        rows = df
      if len(rows) == 0:
        why = "has no rows" if len(df) == 0 else "has no rows known during training"
        warnings.warn(
            f"table {table!r} {why}: it gets no features and its contexts are empty until "
            "it has rows",
            SchemaWarning,
            stacklevel=2,
        )
      kwargs = {**self.config["preprocessor"], **self.config["table_preprocessors"].get(table, {})}
      # Foreign keys are identities, never quantities: categorical unless the user says otherwise.
      fk_types = {c: "categorical" for c in schema.tables[table].foreign_keys if c in rows.columns}
      if table == target:  # summaries are quantities, whatever their number of distinct values
        fk_types.update({c: "numeric" for c in self.config.get("summary_columns", [])})
      kwargs["column_types"] = {**fk_types, **kwargs.get("column_types", {})}
      features = rows if table == target else self._features(table, rows)
      self.preprocessors[table] = TabularPreprocessor(**kwargs).fit(features)
    self.classes = label_classes(target_df[schema.target.column], schema.target.task)
    return self

  def _target_times(self, target_df: pd.DataFrame) -> pd.Series | None:
    spec = self.schema.target_table
    if spec.time_column is None:
      return None
    return parse_time(
        target_df[spec.time_column], f"table {spec.name!r} column {spec.time_column!r}"
    )

  def _labels(self, y: pd.Series) -> np.ndarray:
    task = self.schema.target.task
    if task == "regression":
      return y.to_numpy(np.float32)
    if self.classes == (0, 1):
      return y.astype(np.float32).to_numpy()
    index = pd.Index(list(self.classes)).get_indexer(y)
    if (index < 0).any():
      bad = y[index < 0].astype(str).unique()[:3].tolist()
      raise SchemaError(
          f"target: column {self.schema.target.column!r} has label(s) {bad} not seen at fit time "
          f"(classes: {list(self.classes)})"
      )
    return index.astype(np.float32 if task == "binary" else np.int32)

  # ------------------------------------------------------------------ transform
  def transform(self, tables: Mapping[str, pd.DataFrame]) -> RelationalData:
    """Builds every context for every row of the target table.

    For prediction, pass the rows to predict together with the past rows they should see (the
    histories come from these tables), then select the predicted rows with `RelationalData.take`.

    Returns:
      `RelationalData` with N = rows of the target table (in table order); labels are None when
      the target column is absent or has nulls (prediction).
    """
    if not self.preprocessors:
      raise RuntimeError("ContextSetBuilder is not fitted: call .fit(tables) or .load(directory)")
    schema = self.schema
    target = schema.target.table
    self.report = schema.validate(tables, require_target=False)
    target_df = tables[target]
    times = self._target_times(target_df)
    t_ticks, _, t_is_dt = ci.time_ticks(times)
    feats = {}
    for (
        table
    ) in self.tables_used:  # transform each table once; a zero row at the end is the padding
      features = (
          self._target_features(tables, times)
          if table == target
          else self._features(table, tables[table])
      )
      feats[table] = self._feature_table(
          table, self.preprocessors[table].transform(features), tables
      )
    contexts, count_names, counts = {}, [], []
    for spec in self.contexts:
      contexts[spec.name], history = self._context(
          spec, tables, target_df, t_ticks, t_is_dt, feats[spec.table]
      )
      if self.config.get("count_windows") and history is not None:
        names, values = self._window_counts(spec, history, t_is_dt)
        count_names += names
        counts.append(values)
      del history
    has_labels = schema.target.column in target_df.columns
    own = feats[target]
    info = self.preprocessors[target].get_feature_info()
    n = len(target_df)
    extra_numeric = np.zeros((n, 0), own.numeric.dtype)
    extra_missing = np.zeros((n, 0), bool)
    if counts:
      counts = np.concatenate(counts, axis=1)
      extra_missing = np.isnan(counts)
      extra_numeric = np.where(extra_missing, 0.0, counts).astype(own.numeric.dtype)
      info = FeatureInfo(
          info.numeric_names + tuple(count_names),
          info.numeric_sources + tuple(count_names),
          info.categorical_names,
          info.categorical_cardinalities,
          info.column_types,
      )
    return RelationalData(
        target_table=target,
        task=schema.target.task,
        feature_info=info,
        own=own,
        extra_numeric=extra_numeric,
        extra_missing=extra_missing,
        labels=self._labels(target_df[schema.target.column])
        if has_labels and target_df[schema.target.column].notna().all()
        else None,
        classes=self.classes,
        split=assign_split(schema, target_df, times),
        row_index=np.arange(n, dtype=np.int64),
        contexts=contexts,
    )

  def _table_ticks(self, table: str, df: pd.DataFrame):
    """(ticks, valid, is_datetime) of `table`'s time column (None, None, False without one)."""
    column = self.schema.tables[table].time_column
    times = None if column is None else parse_time(df[column], f"table {table!r} column {column!r}")
    return ci.time_ticks(times)

  def _feature_table(self, table: str, arrays: Mapping[str, np.ndarray], tables) -> FeatureTable:
    """`table`'s preprocessed features plus the zero padding row (and its times, padded with 0)."""
    pad = {k: np.concatenate([v, np.zeros((1,) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}
    ticks, _, is_dt = self._table_ticks(table, tables[table])
    if ticks is not None:
      ticks = np.concatenate([ticks, np.zeros(1, ticks.dtype)])
    return FeatureTable(
        pad["numeric"], pad["numeric_missing"], pad["categorical"], ticks=ticks, is_datetime=is_dt
    )

  def _context(
      self, spec: ContextSpec, tables, target_df, t_ticks, t_is_dt, table: FeatureTable
  ) -> tuple[ContextArrays, ci.SortedHistory | None]:
    """The context's row index and, for a numpy history, its sorted visible rows (reused by the
    window counts; the DuckDB engine returns the counts itself)."""
    related = tables[spec.table]
    time_column = self.schema.tables[spec.table].time_column
    r_ticks, r_valid, r_is_dt = self._table_ticks(spec.table, related)
    timed = t_ticks is not None and r_ticks is not None
    # Rows without a time are never visible, so a column with no time at all has no kind to check.
    if timed and t_is_dt != r_is_dt and r_valid.any():
      raise SchemaError(
          f"table {spec.table!r} column {time_column!r}: times are "
          f"{'datetimes' if r_is_dt else 'numbers'} but the target's are not"
      )
    history = None
    if spec.kind == "history":
      keys = (target_df[spec.target_column], related[spec.context_column])
      exclude_self = spec.table == self.schema.target.table and not timed
      if self.engine == "duckdb":
        from nexus_jax.data.duckdb_index import DuckDBHistory

        history = DuckDBHistory(
            *keys,
            t_ticks,
            r_ticks,
            r_valid,
            spec.strict,
            max_rows=spec.max_rows,
            exclude_self=exclude_self,
            windows=self.config["count_windows"],
            is_datetime=t_is_dt,
            **self.engine_options,
        )
      else:
        history = ci.SortedHistory(*keys, t_ticks, r_ticks, r_valid, spec.strict)
      index = history.index(spec.max_rows, exclude_self=exclude_self, dtype=np.int32)
    else:
      index = ci.parent_index(target_df[spec.target_column], related[spec.context_column])
      if timed:  # a parent with a time is visible only from its time on
        r_ticks = np.concatenate([r_ticks, np.zeros(1, r_ticks.dtype)])  # index -1: padding
        r_valid = np.concatenate([r_valid, np.zeros(1, bool)])
        visible = r_valid[index] & (
            (r_ticks[index] < t_ticks) if spec.strict else (r_ticks[index] <= t_ticks)
        )
        index = np.where(visible & (index >= 0), index, -1)
      index = index[:, None]
    info = self.preprocessors[spec.table].get_feature_info()
    if timed:  # the age of each row as one more numeric feature
      info = FeatureInfo(
          info.numeric_names + (AGE_FEATURE,),
          info.numeric_sources + (AGE_FEATURE,),
          info.categorical_names,
          info.categorical_cardinalities,
          info.column_types,
      )
    if len(related) >= np.iinfo(np.int32).max:
      raise OverflowError(f"table {spec.table!r}: {len(related)} rows overflow an int32 row index")
    return (
        ContextArrays(
            spec=spec,
            feature_info=info,
            table=table,
            row_index=index.astype(np.int32),
            target_ticks=t_ticks if timed else None,
        ),
        history,
    )

  def _sees_itself(self, spec: ContextSpec, history: ci.SortedHistory) -> bool:
    """A history of the target table without a time cut would list each row itself."""
    return spec.table == self.schema.target.table and not history.use_time

  def _window_counts(
      self, spec: ContextSpec, history: ci.SortedHistory, t_is_dt: bool
  ) -> tuple[list[str], np.ndarray]:
    """Names and counts `[N, W]` of the visible rows of history `spec` per trailing window; one
    ``all`` column without a time cut (then every row of the key is visible)."""
    if not history.use_time:
      counts = history.key_counts(self._sees_itself(spec, history))[:, None]
      return [f"count[{spec.name},all]"], _signed_log1p(counts)
    windows = self.config["count_windows"]
    names = [f"count[{spec.name},{w:g}{'h' if t_is_dt else ''}]" for w in windows]
    return names, _signed_log1p(history.window_counts(windows, is_datetime=t_is_dt))

  def fit_transform(self, tables: Mapping[str, pd.DataFrame]) -> RelationalData:
    return self.fit(tables).transform(tables)

  # ------------------------------------------------------------------ persistence
  def save(self, directory: str | pathlib.Path) -> None:
    """Writes ``context_set_builder.json`` (schema, config, classes) and one preprocessor folder per table."""
    if not self.preprocessors:
      raise RuntimeError("ContextSetBuilder.save: not fitted")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": self.schema.to_dict(),
        "config": self.config,
        "classes": None if self.classes is None else list(self.classes),
        "tables": list(self.preprocessors),
    }
    (directory / BUILDER_FILE).write_text(json.dumps(payload, indent=1))
    for i, (table, pre) in enumerate(self.preprocessors.items()):
      pre.save(directory / f"preprocessor_{i}")

  @classmethod
  def load(
      cls,
      directory: str | pathlib.Path,
      engine: str = "numpy",
      engine_options: Mapping | None = None,
  ) -> "ContextSetBuilder":
    directory = pathlib.Path(directory)
    payload = json.loads((directory / BUILDER_FILE).read_text())
    cfg = payload["config"]
    builder = cls(
        Schema.from_dict(payload["schema"]),
        max_history=cfg["max_history"],
        contexts=cfg["contexts"],
        preprocessor=cfg["preprocessor"],
        table_preprocessors=cfg["table_preprocessors"],
        count_windows=cfg.get("count_windows", ()),
        summaries=cfg.get("summaries", ()),
        engine=engine,
        engine_options=engine_options,
    )
    for key in ("summary_levels", "summary_columns"):  # chosen at fit
      if key in cfg:
        builder.config[key] = cfg[key]
    builder.classes = None if payload["classes"] is None else tuple(payload["classes"])
    builder.preprocessors = {
        t: TabularPreprocessor.load(directory / f"preprocessor_{i}")
        for i, t in enumerate(payload["tables"])
    }
    return builder


def build_context_sets(
    tables: Mapping[str, pd.DataFrame],
    schema: Schema | Mapping,
    max_history: int | Mapping[str, int] = 16,
    contexts: Sequence[str] | None = None,
    **kwargs,
) -> RelationalData:
  """Fit + transform in one call; `schema` may be a `Schema` or its dict. Returns `RelationalData`."""
  if not isinstance(schema, Schema):
    schema = Schema.from_dict(schema)
  return ContextSetBuilder(
      schema, max_history=max_history, contexts=contexts, **kwargs
  ).fit_transform(tables)
