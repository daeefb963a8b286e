"""The flat join of a relational task: one feature row per target row, for tree and linear baselines.

    features = flat_join(tables, schema)     # DataFrame [N, F], one row per target-table row, in order

Built from the same contexts and visibility rule as the context sets (`relational.discover_contexts`,
`context_index.SortedHistory`), so a baseline sees exactly the rows NexusFlow may see, without the
M cap on history rows:

- the target row's own feature columns (`Schema.feature_columns`);
- every parent context's feature columns, ``"<context>.<column>"`` (missing when the parent row is
  unknown or, for a timed parent, later than the target time);
- every history context's aggregates over its visible rows: ``count``; per numeric column (datetimes
  as days since 1970) ``mean``, ``min``, ``max`` and ``last`` (the most recent row's value); per
  categorical column the count of each of its `max_levels` most frequent values.

A history of the target table without a time cut (each row would see itself) gets its count only.
Categorical columns come back as pandas ``category`` (strings), numeric ones as float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from nexus_jax.data import context_index as ci
from nexus_jax.data.relational import discover_contexts
from nexus_jax.data.schema import Schema, parse_time

AGGREGATES = ("mean", "min", "max", "last")


def _times(
    schema: Schema, table: str, df: pd.DataFrame
) -> tuple[np.ndarray | None, np.ndarray | None]:
  column = schema.tables[table].time_column
  if column is None:
    return None, None
  ticks, valid, _ = ci.time_ticks(parse_time(df[column], f"table {table!r} column {column!r}"))
  return ticks, valid


def _split_kinds(df: pd.DataFrame, columns: list[str], fks: Mapping[str, str]):
  """(numeric columns as float64 `[R, F]` with their names, categorical column names)."""
  numeric, names, categorical = [], [], []
  for c in columns:
    s = df[c]
    if (
        c in fks
        or not (
            pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_datetime64_any_dtype(s.dtype)
        )
        or pd.api.types.is_bool_dtype(s.dtype)
    ):
      categorical.append(c)
      continue
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
      s = (s - pd.Timestamp(0, tz=s.dt.tz)) / pd.Timedelta(days=1)
    numeric.append(s.to_numpy(np.float64, na_value=np.nan))
    names.append(c)
  values = np.stack(numeric, axis=1) if numeric else np.zeros((len(df), 0))
  return values, names, categorical


def _as_category(s: pd.Series) -> pd.Series:
  return s.astype("string").astype("category")


def flat_join(
    tables: Mapping[str, pd.DataFrame], schema: Schema | Mapping, max_levels: int = 10
) -> pd.DataFrame:
  """The flat feature table of `schema`'s target rows (see the module docstring).

  Args:
    tables: table name -> DataFrame, as for `ContextSetBuilder`.
    schema: the task schema.
    max_levels: categories counted per categorical column of a history table.
  Returns:
    DataFrame `[N, F]` with the target table's index order (a fresh RangeIndex).
  """
  schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
  target = schema.target.table
  target_df = tables[target].reset_index(drop=True)
  t_ticks, _ = _times(schema, target, target_df)
  own = target_df[schema.feature_columns(target, target_df)]
  columns: dict[str, pd.Series | np.ndarray] = {}
  own_fks = schema.tables[target].foreign_keys
  for c in own.columns:
    kind_numeric = c not in own_fks and (
        pd.api.types.is_numeric_dtype(own[c].dtype) and not pd.api.types.is_bool_dtype(own[c].dtype)
    )
    columns[c] = own[c].astype(np.float64) if kind_numeric else _as_category(own[c])
  for spec in discover_contexts(schema, 1):
    related = tables[spec.table].reset_index(drop=True)
    r_ticks, r_valid = _times(schema, spec.table, related)
    timed = t_ticks is not None and r_ticks is not None
    feature_cols = schema.feature_columns(spec.table, related)
    fks = schema.tables[spec.table].foreign_keys
    if spec.kind == "parent":
      index = ci.parent_index(target_df[spec.target_column], related[spec.context_column])
      if timed:
        ok = index >= 0
        row_t = np.where(ok, r_ticks[np.maximum(index, 0)], 0)
        row_ok = np.where(ok, r_valid[np.maximum(index, 0)], False)
        seen = row_ok & ((row_t < t_ticks) if spec.strict else (row_t <= t_ticks))
        index = np.where(seen, index, -1)
      picked = related[feature_cols].reindex(index).reset_index(drop=True)  # -1 -> all missing
      values, names, categorical = _split_kinds(picked, feature_cols, fks)
      for j, c in enumerate(names):
        columns[f"{spec.name}.{c}"] = values[:, j]
      for c in categorical:
        columns[f"{spec.name}.{c}"] = _as_category(picked[c])
      continue
    history = ci.SortedHistory(
        target_df[spec.target_column],
        related[spec.context_column],
        t_ticks if timed else None,
        r_ticks if timed else None,
        r_valid if timed else None,
        spec.strict,
    )
    sees_itself = spec.table == target and not history.use_time
    columns[f"{spec.name}.count"] = history.key_counts(exclude_self=sees_itself).astype(np.float64)
    if sees_itself:
      continue
    used = [c for c in feature_cols if c != spec.context_column]
    values, names, categorical = _split_kinds(related, used, fks)
    if names:
      agg = history.summaries(values)
      for a in AGGREGATES:
        for j, c in enumerate(names):
          columns[f"{spec.name}.{a}({c})"] = agg[a][:, j]
    for c in categorical:
      levels = related[c].astype("string").value_counts().index[:max_levels]
      indicator = (
          np.stack(
              [
                  (related[c].astype("string") == lv).fillna(False).to_numpy(np.float64)
                  for lv in levels
              ],
              axis=1,
          )
          if len(levels)
          else np.zeros((len(related), 0))
      )
      if indicator.shape[1]:
        agg = history.summaries(indicator)
        counts = np.nan_to_num(agg["mean"]) * agg["count"][:, None]
        for j, lv in enumerate(levels):
          columns[f"{spec.name}.count({c}={lv})"] = counts[:, j]
  return pd.DataFrame(columns)
