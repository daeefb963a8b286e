"""flat_join against a row-by-row pandas reference; the baselines learn; the bootstrap's outcome rule."""

import numpy as np
import pandas as pd
import pytest
from relational_testing import SCHEMA, make_tables
from sklearn.metrics import roc_auc_score

from nexus_jax.data import context_index as ci
from nexus_jax.data.schema import Schema
from nexus_jax.data.splits import assign_split
from nexus_jax.nexusflow import baselines, comparison
from nexus_jax.nexusflow.flat_join import flat_join


def _reference(tables, row):
  """The visible events of one order, the slow way: same customer, time <= the order's time."""
  events = tables["events"]
  return events[(events["customer_id"] == row["customer_id"]) & (events["time"] <= row["time"])]


def test_history_aggregates_match_a_row_by_row_reference():
  tables = make_tables(200)
  flat = flat_join(tables, SCHEMA)
  orders = tables["orders"]
  name = "events.customer_id=customer_id"
  assert len(flat) == len(orders)
  for i in range(0, len(orders), 7):
    seen = _reference(tables, orders.iloc[i]).sort_values("time", kind="stable")
    assert flat[f"{name}.count"][i] == len(seen)
    if len(seen):
      assert flat[f"{name}.mean(value)"][i] == pytest.approx(seen["value"].mean())
      assert flat[f"{name}.min(value)"][i] == pytest.approx(seen["value"].min())
      assert flat[f"{name}.max(value)"][i] == pytest.approx(seen["value"].max())
      assert flat[f"{name}.last(value)"][i] == pytest.approx(seen["value"].iloc[-1])
      for kind in ("view", "click", "cart"):
        assert flat[f"{name}.count(kind={kind})"][i] == (seen["kind"] == kind).sum()
    else:
      assert np.isnan(flat[f"{name}.mean(value)"][i])


def test_only_visible_rows_reach_the_aggregates():
  """The most recent visible event is never later than the order (the max of its time column)."""
  tables = make_tables(200)
  flat = flat_join(tables, SCHEMA)
  latest = flat["events.customer_id=customer_id.max(time)"]  # days since 1970
  order_days = (tables["orders"]["time"] - pd.Timestamp(0)) / pd.Timedelta(days=1)
  seen = latest.notna()
  assert seen.sum() > 50
  assert (latest[seen] <= order_days[seen] + 1e-9).all()


def test_parent_columns_and_own_columns():
  tables = make_tables(120)
  flat = flat_join(tables, SCHEMA)
  customers = tables["customers"].set_index("customer_id")
  expected = tables["orders"]["customer_id"].map(customers["income"]).to_numpy()
  np.testing.assert_allclose(flat["customer_id->customers.income"].to_numpy(), expected)
  assert "label" not in flat.columns and "order_id" not in flat.columns
  assert isinstance(flat["customer_id->customers.segment"].dtype, pd.CategoricalDtype)


def test_summaries_reduce_exactly_over_each_range():
  rng = np.random.default_rng(0)
  keys_t = pd.Series(rng.integers(0, 5, 40))
  keys_c = pd.Series(rng.integers(0, 6, 300))
  t_t, t_c = rng.uniform(0, 10, 40), rng.uniform(0, 10, 300)
  values = rng.normal(size=(300, 2))
  values[rng.random((300, 2)) < 0.2] = np.nan
  history = ci.SortedHistory(keys_t, keys_c, t_t, t_c, np.ones(300, bool))
  agg = history.summaries(values)
  for i in range(40):
    rows = np.flatnonzero((keys_c == keys_t[i]).to_numpy() & (t_c <= t_t[i]))
    assert agg["count"][i] == len(rows)
    for j in range(2):
      v = values[rows, j]
      v = v[~np.isnan(v)]
      if len(v):
        assert agg["min"][i, j] == pytest.approx(v.min())
        assert agg["max"][i, j] == pytest.approx(v.max())
        assert agg["mean"][i, j] == pytest.approx(v.mean())
      if len(rows):
        last = rows[np.argmax(t_c[rows])]
        assert agg["last"][i, j] == pytest.approx(values[last, j], nan_ok=True)


@pytest.mark.parametrize("fit", [baselines.fit_lightgbm, baselines.fit_linear])
def test_baselines_learn_the_separable_task(fit):
  tables = make_tables(600)
  schema = Schema.from_dict(SCHEMA)
  flat = flat_join(tables, schema)
  y = tables["orders"]["label"].to_numpy()
  split = assign_split(schema, tables["orders"])
  tr, va, te = (split == s for s in ("train", "valid", "test"))
  model = fit(flat[tr], y[tr], flat[va], y[va], "binary")
  assert roc_auc_score(y[te], model.predict(flat[te])) > 0.65  # chance: 0.5
  assert model.fit_seconds > 0


def test_rank_auc_matches_sklearn_and_bootstrap_outcomes():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 500)
  good, noise = y + rng.normal(0, 0.7, 500), rng.normal(size=500)
  assert comparison.roc_auc(y == 1, good) == pytest.approx(roc_auc_score(y, good))
  lo, hi = comparison.paired_bootstrap("binary", y, good, noise, n_boot=200)
  assert lo > 0 and comparison.outcome("binary", lo, hi) == "win"
  lo, hi = comparison.paired_bootstrap("binary", y, good, good + 1e-9 * noise, n_boot=200)
  assert comparison.outcome("binary", lo, hi) == "tie"
  # regression: lower RMSE wins
  target = rng.normal(size=300)
  lo, hi = comparison.paired_bootstrap("regression", target, target + 0.1, target + 1.0, n_boot=200)
  assert hi < 0 and comparison.outcome("regression", lo, hi) == "win"
  assert comparison.ranks("regression", {"a": 1.0, "b": 0.5, "c": 1.0}) == {
      "a": 2.5,
      "b": 1.0,
      "c": 2.5,
  }


def test_builder_summaries_aggregate_every_visible_row(tmp_path):
  """summaries=... gives the target row mean / max / count / level counts over ALL visible rows
  (no M cap), as preprocessed numeric features; save/load keeps the fitted levels."""
  from nexus_jax.data.relational import ContextSetBuilder

  tables = make_tables(200)
  schema = Schema.from_dict(SCHEMA)
  builder = ContextSetBuilder(schema, max_history=2, summaries=("count", "mean", "max", "levels"))
  data = builder.fit(tables).transform(tables)
  ctx = "events.customer_id=customer_id"
  names = list(data.feature_info.numeric_names)
  for name in (
      f"{ctx}.count",
      f"{ctx}.mean(value)",
      f"{ctx}.max(value)",
      f"{ctx}.count(kind=view)",
  ):
    assert name in names
  # the raw summaries are the flat join's, and the preprocessor is monotone in each of them
  flat = flat_join(tables, schema)
  raw = builder._target_features(tables, builder._target_times(tables["orders"]))
  pd.testing.assert_series_equal(
      raw[f"{ctx}.mean(value)"], flat[f"{ctx}.mean(value)"], check_names=False
  )
  counts = raw[f"{ctx}.count"].to_numpy()
  assert (counts > 2).sum() > 10  # more rows than the M = 2 the context set holds
  encoded = data.numeric[:, names.index(f"{ctx}.count")]
  order = np.argsort(counts, kind="stable")
  assert (np.diff(encoded[order]) >= -1e-6).all()
  builder.save(tmp_path / "b")
  again = ContextSetBuilder.load(tmp_path / "b").transform(tables)
  np.testing.assert_allclose(again.numeric, data.numeric)
  with pytest.raises(ValueError, match="summaries"):
    ContextSetBuilder(schema, summaries=("median",))
