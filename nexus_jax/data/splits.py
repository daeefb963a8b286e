"""Train / validation / test assignment of target rows, as declared by `Schema.split`.

- ``time``: ``time < valid_start`` -> train, ``valid_start <= time < test_start`` -> valid, rest -> test
  (on the target table's time column; no shuffling).
- ``random``: a seeded permutation; the first ``test_fraction`` of rows -> test, the next
  ``valid_fraction`` -> valid, the rest -> train.
- ``group``: the same on the distinct values of ``key`` (a seeded permutation of groups, cut where
  the cumulative row count reaches the fractions: a group starting below the test fraction goes to
  test, then likewise valid), so one entity never spans two splits.
  Null keys form one group of their own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from nexus_jax.data.schema import Schema, SchemaError, parse_cutoff, parse_time

SPLITS = ("train", "valid", "test")


def assign_split(
    schema: Schema, target_df: pd.DataFrame, times: pd.Series | None = None
) -> np.ndarray:
  """Split of every target row.

  Args:
    schema: the task's schema (its `split` and target table are used).
    target_df: the target table `[N, C]`.
    times: optional pre-parsed time column (`schema.parse_time` output) to avoid parsing twice.
  Returns:
    `[N]` numpy array of ``"train" | "valid" | "test"`` (dtype object).
  """
  s = schema.split
  table = schema.target.table
  n = len(target_df)
  out = np.full(n, "train", dtype=object)
  if s.method == "time":
    column = schema.target_table.time_column
    where = f"table {table!r} column {column!r}"
    if times is None:
      times = parse_time(target_df[column], where)
    valid_start = parse_cutoff(s.valid_start, times, f"split.valid_start ({where})")
    test_start = parse_cutoff(s.test_start, times, f"split.test_start ({where})")
    if test_start < valid_start:
      raise SchemaError(
          f"split: test_start {s.test_start!r} is before valid_start {s.valid_start!r}"
      )
    out[(times >= valid_start).to_numpy()] = "valid"  # pandas compare: no per-row Timestamp objects
    out[(times >= test_start).to_numpy()] = "test"
    return out
  rng = np.random.default_rng(s.seed)
  if s.method == "random":
    order = rng.permutation(n)
    n_test, n_valid = int(round(s.test_fraction * n)), int(round(s.valid_fraction * n))
    out[order[:n_test]] = "test"
    out[order[n_test : n_test + n_valid]] = "valid"
    return out
  if s.key not in target_df.columns:
    raise SchemaError(f"split: group key {s.key!r} is not a column of table {table!r}")
  codes, uniques = pd.factorize(target_df[s.key], use_na_sentinel=False)
  sizes = np.bincount(codes, minlength=len(uniques))
  order = rng.permutation(len(uniques))
  before = (np.cumsum(sizes[order]) - sizes[order]) / max(n, 1)  # row fraction before each group
  group_split = np.full(len(uniques), "train", dtype=object)
  group_split[order[before < s.test_fraction]] = "test"
  in_valid = (before >= s.test_fraction) & (before < s.test_fraction + s.valid_fraction)
  group_split[order[in_valid]] = "valid"
  return group_split[codes]
