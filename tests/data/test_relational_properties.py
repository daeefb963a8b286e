"""Property tests (hypothesis) of context sets over random small schemas and tables.

For any schema of the family below, shapes and masks are consistent, every visible row shares the
target row's key and is known at the target time (strictly before within the target table), rows are
the most recent ones, and dropped columns / the target never become features. Preprocessor statistics
depend on training rows only.
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relational_strategies import PRE, tasks

from nexus_jax.data.context_sets import AGE_FEATURE
from nexus_jax.data.preprocess import TabularPreprocessor
from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import Schema

# Random tables often have no rows before valid_start in a related table: legal, and warned about.
pytestmark = pytest.mark.filterwarnings("ignore::nexus_jax.data.schema.SchemaWarning")


def _times(series):
  return pd.to_datetime(series, utc=True).dt.tz_localize(None).to_numpy("datetime64[ns]")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=tasks(), m=st.integers(1, 4))
def test_context_sets_are_consistent_and_leakage_free(task, m):
  tables, schema_d = task
  schema = Schema.from_dict(schema_d)
  data = ContextSetBuilder(schema, max_history=m, preprocessor=PRE).fit_transform(tables)
  n = len(tables["T"])
  target = tables["T"]
  t_time = _times(target["t"]) if "t" in target else None
  assert data.numeric.shape == (n, data.feature_info.num_numeric)
  assert data.categorical.shape == (n, data.feature_info.num_categorical)
  assert set(data.feature_info.types).isdisjoint({"leak", "y", "tid"})
  for name, ctx in data.contexts.items():
    spec, info = ctx.spec, ctx.feature_info
    rows = tables[spec.table]
    size = 1 if spec.kind == "parent" else m
    assert ctx.mask.shape == ctx.ages.shape == ctx.row_index.shape == (n, size)
    assert ctx.numeric.shape == ctx.numeric_missing.shape == (n, size, info.num_numeric)
    assert ctx.categorical.shape == (n, size, info.num_categorical)
    assert set(info.types).isdisjoint({"leak", "y"})
    np.testing.assert_array_equal(ctx.mask, ctx.row_index >= 0)
    assert not (~ctx.mask[:, :-1] & ctx.mask[:, 1:]).any(), "real rows first"
    assert (ctx.numeric[~ctx.mask] == 0).all() and (ctx.categorical[~ctx.mask] == 0).all()
    assert (ctx.ages[~ctx.mask] == 0).all()
    assert (
        (ctx.categorical >= 0) & (ctx.categorical < np.array(info.categorical_cardinalities))
    ).all()
    i, j = np.nonzero(ctx.mask)
    r = ctx.row_index[i, j]
    t_key = target[spec.target_column].to_numpy()[i]
    assert (rows[spec.context_column].to_numpy()[r] == t_key).all(), name
    if spec.table == "T":
      assert (r != i).all(), "a target row never sees itself"
    r_has_time = "time_column" in schema_d["tables"][spec.table]
    if t_time is not None and r_has_time:
      rt = _times(rows["t"])[r]
      assert ((rt < t_time[i]) if spec.strict else (rt <= t_time[i])).all(), name
      np.testing.assert_allclose(
          ctx.ages[i, j], (t_time[i] - rt) / np.timedelta64(1, "h"), rtol=1e-6
      )
      assert info.numeric_names[-1] == AGE_FEATURE
      if spec.kind == "history":  # most recent first
        ages = np.where(ctx.mask, ctx.ages, 1e9)
        assert (np.diff(ages, axis=1) >= 0).all()
    if spec.kind == "history":  # as many rows as are visible, up to M
      for row in range(n):
        key = target[spec.target_column].iloc[row]
        eligible = (
            rows[spec.context_column].eq(key)
            if pd.notna(key)
            else pd.Series(False, index=rows.index)
        )
        if spec.table == "T":
          eligible &= rows.index != row
        if t_time is not None and r_has_time:
          rt = pd.Series(_times(rows["t"]), index=rows.index)
          eligible &= (rt < t_time[row]) if spec.strict else (rt <= t_time[row])
        assert ctx.mask[row].sum() == min(m, int(eligible.sum())), (name, row)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=tasks())
def test_preprocessor_statistics_come_from_training_rows_only(task):
  tables, schema_d = task
  schema = Schema.from_dict(schema_d)
  builder = ContextSetBuilder(schema, max_history=2, preprocessor=PRE).fit(tables)
  data = builder.transform(tables)
  train = data.split == "train"
  # Changing every non-training row's values does not change the fitted statistics.
  shifted = dict(tables)
  shifted["T"] = tables["T"].assign(x=np.where(train, tables["T"]["x"], 1e6))
  again = ContextSetBuilder(schema, max_history=2, preprocessor=PRE).fit(shifted).transform(shifted)
  np.testing.assert_allclose(again.numeric[train], data.numeric[train], rtol=1e-6)
  # ... and the target table's preprocessor equals one fitted on the training rows alone.
  features = tables["T"][schema.feature_columns("T", tables["T"])]
  direct = TabularPreprocessor(column_types={"pid": "categorical"}, **PRE).fit(features[train])
  np.testing.assert_allclose(direct.transform(features)["numeric"], data.numeric, rtol=1e-6)
