"""Aggregates of a history context's visible rows, per target row, without the M cap on rows.

    levels = summary_levels(related, schema, spec)                 # fixed at fit time (JSON-able)
    columns = history_summaries(tables, schema, spec, t_ticks, ("count", "mean", "max"), levels)

For one history context (`relational.discover_contexts`) and the target rows' times, the visible
related rows are exactly those of the context sets (`context_index.SortedHistory`: same key, time at
or before the target's, strictly before for the target table itself). Aggregates:

- ``count``: visible rows;
- ``mean``, ``min``, ``max``, ``sum``, ``last`` (most recent row) of every numeric feature column
  of the related table (datetimes as days since 1970; missing values skipped, ``last`` is missing
  when the most recent row's value is);
- ``levels``: per categorical feature column, the count of each of its most frequent values.

Column names are ``"<context>.<agg>(<column>)"``, ``"<context>.count"`` and
``"<context>.count(<column>=<value>)"``. A history of the target table without a time cut (each row
would see itself) gets its count only. Used by the flat baselines (`nexusflow.flat_join`) and, with
``ContextSetBuilder(summaries=...)``, as numeric features of NexusFlow's target row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from nexus_jax.data import context_index as ci
from nexus_jax.data.context_sets import ContextSpec
from nexus_jax.data.schema import Schema, parse_time

AGGREGATES = ("count", "mean", "min", "max", "sum", "last", "levels")
MAX_LEVELS = 10


def table_ticks(
    schema: Schema, table: str, df: pd.DataFrame
) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(ticks, valid) of `table`'s time column (`context_index.time_ticks`), or (None, None)."""
  column = schema.tables[table].time_column
  if column is None:
    return None, None
  ticks, valid, _ = ci.time_ticks(parse_time(df[column], f"table {table!r} column {column!r}"))
  return ticks, valid


def is_numeric_feature(s: pd.Series, foreign_key: bool = False) -> bool:
  """Numbers and datetimes are quantities; booleans, strings and foreign keys are categories."""
  if foreign_key or pd.api.types.is_bool_dtype(s.dtype):
    return False
  return pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_datetime64_any_dtype(s.dtype)


def as_float(s: pd.Series) -> np.ndarray:
  """A numeric or datetime column as float64 `[R]` (datetimes: days since 1970; NaN = missing)."""
  if pd.api.types.is_datetime64_any_dtype(s.dtype):
    s = (s - pd.Timestamp(0, tz=s.dt.tz)) / pd.Timedelta(days=1)
  return pd.to_numeric(s, errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _columns(schema: Schema, spec: ContextSpec, related: pd.DataFrame) -> tuple[list, list]:
  fks = schema.tables[spec.table].foreign_keys
  used = [c for c in schema.feature_columns(spec.table, related) if c != spec.context_column]
  numeric = [c for c in used if is_numeric_feature(related[c], c in fks)]
  return numeric, [c for c in used if c not in numeric]


def summary_levels(
    related: pd.DataFrame, schema: Schema, spec: ContextSpec, max_levels: int = MAX_LEVELS
) -> dict[str, list[str]]:
  """The most frequent values (as strings) of each categorical feature column of `spec.table`."""
  _, categorical = _columns(schema, spec, related)
  return {
      c: [str(v) for v in related[c].astype("string").value_counts().index[:max_levels]]
      for c in categorical
  }


def history_summaries(
    tables: Mapping[str, pd.DataFrame],
    schema: Schema,
    spec: ContextSpec,
    target_ticks: np.ndarray | None,
    aggregates: Sequence[str] = AGGREGATES,
    levels: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, np.ndarray]:
  """Name -> float64 `[N]` aggregates of history `spec` (see the module docstring).

  Args:
    tables: the tables (target table in row order).
    schema: the task schema.
    spec: a history context.
    target_ticks: the target rows' `time_ticks`, or None without a target time.
    aggregates: a subset of `AGGREGATES`.
    levels: categorical column -> values counted by ``levels`` (default: `summary_levels` of
      these tables; pass the fitted ones at predict time).
  """
  unknown = sorted(set(aggregates) - set(AGGREGATES))
  if unknown:
    raise ValueError(f"summaries: unknown aggregate(s) {unknown}; choose from {list(AGGREGATES)}")
  target_df, related = tables[schema.target.table], tables[spec.table]
  r_ticks, r_valid = table_ticks(schema, spec.table, related)
  timed = target_ticks is not None and r_ticks is not None
  history = ci.SortedHistory(
      target_df[spec.target_column],
      related[spec.context_column],
      target_ticks if timed else None,
      r_ticks if timed else None,
      r_valid if timed else None,
      spec.strict,
  )
  sees_itself = spec.table == schema.target.table and not history.use_time
  out: dict[str, np.ndarray] = {}
  if "count" in aggregates:
    out[f"{spec.name}.count"] = history.key_counts(exclude_self=sees_itself).astype(np.float64)
  if sees_itself:
    return out
  numeric, _ = _columns(schema, spec, related)
  value_aggs = [a for a in aggregates if a in ("mean", "min", "max", "sum", "last")]
  if numeric and value_aggs:
    values = np.stack([as_float(related[c]) for c in numeric], axis=1)
    agg = history.summaries(values)
    if "sum" in value_aggs:
      agg["sum"] = agg["mean"] * agg["n"]  # NaN where no visible row has a value
    for a in value_aggs:
      for j, c in enumerate(numeric):
        out[f"{spec.name}.{a}({c})"] = agg[a][:, j]
  if "levels" in aggregates:
    levels = summary_levels(related, schema, spec) if levels is None else levels
    for c, values_of_c in levels.items():
      as_text = related[c].astype("string") if c in related.columns else None
      if as_text is None or not values_of_c:
        continue
      indicator = np.stack(
          [(as_text == v).fillna(False).to_numpy(np.float64) for v in values_of_c], axis=1
      )
      agg = history.summaries(indicator)  # indicators are never missing: n = visible rows
      counts = np.nan_to_num(agg["mean"]) * agg["n"]
      for j, v in enumerate(values_of_c):
        out[f"{spec.name}.count({c}={v})"] = counts[:, j]
  return out
