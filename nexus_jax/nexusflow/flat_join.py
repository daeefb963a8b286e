"""The flat join of a relational task: one feature row per target row, for tree and linear baselines.

    features = flat_join(tables, schema)     # DataFrame [N, F], one row per target-table row, in order

Built from the same contexts and visibility rule as the context sets (`relational.discover_contexts`,
`context_index.SortedHistory`), so a baseline sees exactly the rows NexusFlow may see, without the
M cap on history rows:

- the target row's own feature columns (`Schema.feature_columns`);
- every parent context's feature columns, ``"<context>.<column>"`` (missing when the parent row is
  unknown or, for a timed parent, later than the target time);
- every history context's aggregates over its visible rows (`data.summaries`): ``count``; per
  numeric column (datetimes as days since 1970) ``mean``, ``min``, ``max`` and ``last`` (the most
  recent row's value); per categorical column the count of each of its most frequent values.

Categorical columns come back as pandas ``category`` (strings), numeric ones as float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from nexus_jax.data import context_index as ci
from nexus_jax.data.relational import discover_contexts
from nexus_jax.data.schema import Schema
from nexus_jax.data.summaries import as_float, history_summaries, is_numeric_feature, table_ticks

FLAT_AGGREGATES = ("count", "mean", "min", "max", "last", "levels")


def _as_category(s: pd.Series) -> pd.Series:
  return s.astype("string").astype("category")


def _typed(df: pd.DataFrame, fks: Mapping[str, str], prefix: str = "") -> dict[str, object]:
  return {
      f"{prefix}{c}": as_float(df[c])
      if is_numeric_feature(df[c], c in fks)
      else _as_category(df[c])
      for c in df.columns
  }


def flat_join(tables: Mapping[str, pd.DataFrame], schema: Schema | Mapping) -> pd.DataFrame:
  """The flat feature table of `schema`'s target rows (see the module docstring).

  Args:
    tables: table name -> DataFrame, as for `ContextSetBuilder`.
    schema: the task schema.
  Returns:
    DataFrame `[N, F]` in the target table's row order (a fresh RangeIndex).
  """
  schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
  target = schema.target.table
  tables = {name: df.reset_index(drop=True) for name, df in tables.items()}
  target_df = tables[target]
  t_ticks, _ = table_ticks(schema, target, target_df)
  own = target_df[schema.feature_columns(target, target_df)]
  columns = _typed(own, schema.tables[target].foreign_keys)
  for spec in discover_contexts(schema, 1):
    if spec.kind == "history":
      columns.update(history_summaries(tables, schema, spec, t_ticks, FLAT_AGGREGATES))
      continue
    related = tables[spec.table]
    r_ticks, r_valid = table_ticks(schema, spec.table, related)
    index = ci.parent_index(target_df[spec.target_column], related[spec.context_column])
    if t_ticks is not None and r_ticks is not None:
      at = np.maximum(index, 0)
      row_t = r_ticks[at]
      seen = r_valid[at] & ((row_t < t_ticks) if spec.strict else (row_t <= t_ticks))
      index = np.where(seen & (index >= 0), index, -1)
    picked = related[schema.feature_columns(spec.table, related)].reindex(index)
    picked = picked.reset_index(drop=True)  # index -1 -> a row of missing values
    columns.update(_typed(picked, schema.tables[spec.table].foreign_keys, f"{spec.name}."))
  return pd.DataFrame(columns)
