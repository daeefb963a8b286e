"""Tests for nexus_jax.data.relational on hand-built 3- and 4-table examples, checked exactly."""

import io

import numpy as np
import pandas as pd
import pytest

from nexus_jax.data.context_sets import AGE_FEATURE, RelationalData
from nexus_jax.data.relational import ContextSetBuilder, build_context_sets, discover_contexts
from nexus_jax.data.schema import Schema, SchemaError, SchemaWarning


def _tables():
  customers = pd.DataFrame(
      {"cid": [1, 2, 3], "segment": ["a", "b", "a"], "spend": [10.0, 20.0, 30.0]}
  )
  orders = pd.DataFrame(
      {
          "oid": range(7),
          "t": [
              "2020-01-01T00:00Z",
              "2020-01-01T01:00Z",
              "2020-01-01T02:00Z",
              "2020-01-01T02:00Z",
              "2020-01-01T05:00Z",
              "2020-01-01T06:00Z",
              "2020-01-01T07:00Z",
          ],
          "cid": [1, 2, 1, 1, 99, 1, None],
          "amount": [5.0, 7.0, 6.0, 9.0, 1.0, 2.0, 3.0],
          "secret": [100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0],
          "label": [0, 1, 1, 0, 0, 1, 0],
      }
  )
  visits = pd.DataFrame(
      {
          "vid": range(7),
          "t": [
              "2019-12-31T23:00Z",
              "2020-01-01T02:00Z",
              "2020-01-01T03:00Z",
              "2020-01-01T00:30Z",
              "2020-01-01T09:00Z",
              "2020-01-01T01:00Z",
              None,
          ],
          "cid": [1, 1, 1, 2, 1, 3, 1],
          "duration": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
      }
  )
  return {"customers": customers, "orders": orders, "visits": visits}


SCHEMA = {
    "tables": {
        "customers": {"primary_key": "cid"},
        "orders": {
            "primary_key": "oid",
            "time_column": "t",
            "foreign_keys": {"cid": "customers"},
            "drop_columns": ["secret"],
        },
        "visits": {"primary_key": "vid", "time_column": "t", "foreign_keys": {"cid": "customers"}},
    },
    "target": {"table": "orders", "column": "label", "task": "binary"},
    "split": {
        "method": "time",
        "valid_start": "2020-01-01T04:00Z",
        "test_start": "2020-01-01T06:00Z",
    },
}
STANDARD = {"numeric_transform": "standard", "datetime_parts": ["hour"]}


def _build(schema=SCHEMA, tables=None, **kw):
  kw.setdefault("preprocessor", STANDARD)
  return build_context_sets(tables or _tables(), schema, max_history=2, **kw)


def test_discovers_parent_and_histories():
  names = [(s.name, s.kind, s.strict) for s in discover_contexts(Schema.from_dict(SCHEMA), 2)]
  assert names == [
      ("cid->customers", "parent", False),
      ("orders.cid=cid", "history", True),
      ("visits.cid=cid", "history", False),
  ]


def test_every_context_set_exactly():
  data = _build()
  c = data.contexts
  np.testing.assert_array_equal(c["cid->customers"].row_index[:, 0], [0, 1, 0, 0, -1, 0, -1])
  # Same customer's earlier orders: strictly before (o2 and o3 share a time and do not see each other).
  np.testing.assert_array_equal(
      c["orders.cid=cid"].row_index,
      [[-1, -1], [-1, -1], [0, -1], [0, -1], [-1, -1], [3, 2], [-1, -1]],
  )
  np.testing.assert_array_equal(
      c["orders.cid=cid"].ages, [[0, 0], [0, 0], [2, 0], [2, 0], [0, 0], [4, 4], [0, 0]]
  )
  # Same customer's visits at or before the order time; the visit with no time is never visible.
  np.testing.assert_array_equal(
      c["visits.cid=cid"].row_index, [[0, -1], [3, -1], [1, 0], [1, 0], [-1, -1], [2, 1], [-1, -1]]
  )
  np.testing.assert_array_equal(
      c["visits.cid=cid"].ages, [[1, 0], [0.5, 0], [0, 3], [0, 3], [0, 0], [3, 4], [0, 0]]
  )
  for ctx in c.values():
    np.testing.assert_array_equal(ctx.mask, ctx.row_index >= 0)
  assert data.split.tolist() == ["train"] * 4 + ["valid", "test", "test"]
  np.testing.assert_array_equal(data.labels, [0, 1, 1, 0, 0, 1, 0])
  assert data.labels.dtype == np.float32 and data.classes == (0, 1)


def test_features_values_and_leaky_columns_absent():
  data = _build()
  info = data.feature_info
  assert info.numeric_names == ("t__hour_sin", "t__hour_cos", "amount")  # table column order
  assert info.categorical_names == ("cid",)  # a foreign key: categorical even though numeric
  assert "secret" not in info.types and "label" not in info.types and "oid" not in info.types
  # Orders' amount is standardised with the 4 training orders only: mean 6.75.
  train_amounts = np.array([5.0, 7.0, 6.0, 9.0])
  expected = (np.array([5.0, 7.0, 6.0, 9.0, 1.0, 2.0, 3.0]) - 6.75) / train_amounts.std()
  np.testing.assert_allclose(data.numeric[:, 2], expected, rtol=1e-6)
  hist = data.contexts["orders.cid=cid"]
  assert hist.feature_info.numeric_names == ("t__hour_sin", "t__hour_cos", "amount", AGE_FEATURE)
  np.testing.assert_allclose(hist.numeric[5, :, 2], expected[[3, 2]], rtol=1e-6)  # o5 sees o3, o2
  np.testing.assert_allclose(hist.numeric[5, :, -1], np.log1p([4.0, 4.0]), rtol=1e-6)
  assert (hist.numeric[~hist.mask] == 0).all() and (hist.categorical[~hist.mask] == 0).all()
  parent = data.contexts["cid->customers"]
  assert parent.feature_info.numeric_names == ("spend",)  # no time on customers: no age feature
  np.testing.assert_allclose(
      parent.numeric[:, 0, 0], [-1.2247449, 0, -1.2247449, -1.2247449, 0, -1.2247449, 0], rtol=1e-5
  )
  # Visits' preprocessor saw only visits before valid_start (durations 1, 2, 3, 4, 6).
  visits = data.contexts["visits.cid=cid"]
  seen = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
  j = visits.feature_info.numeric_names.index("duration")
  np.testing.assert_allclose(visits.numeric[5, 0, j], (3.0 - seen.mean()) / seen.std(), rtol=1e-6)


def test_without_target_time_everything_is_known_but_self():
  schema = {
      **SCHEMA,
      "tables": {
          **SCHEMA["tables"],
          "orders": {
              "primary_key": "oid",
              "foreign_keys": {"cid": "customers"},
              "drop_columns": ["secret", "t"],
          },
      },
      "split": {"method": "random", "valid_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
  }
  data = _build(schema)
  np.testing.assert_array_equal(
      data.contexts["orders.cid=cid"].row_index,
      [[5, 3], [-1, -1], [5, 3], [5, 2], [-1, -1], [3, 2], [-1, -1]],
  )
  # Visits ordered by their own time (null time oldest); all are known.
  np.testing.assert_array_equal(data.contexts["visits.cid=cid"].row_index[0], [4, 2])
  assert (data.contexts["visits.cid=cid"].ages == 0).all()
  assert AGE_FEATURE not in data.contexts["visits.cid=cid"].feature_info.numeric_names


def test_tables_referencing_the_target_are_histories():
  schema = {
      "tables": {
          "customers": {"primary_key": "cid"},
          "visits": {
              "primary_key": "vid",
              "time_column": "t",
              "foreign_keys": {"cid": "customers"},
          },
      },
      "target": {"table": "customers", "column": "segment", "task": "binary"},
  }
  data = _build(schema)
  assert list(data.contexts) == ["visits.cid=cid"]
  np.testing.assert_array_equal(
      data.contexts["visits.cid=cid"].row_index, [[4, 2], [3, -1], [5, -1]]
  )
  assert data.classes == ("a", "b") and data.labels.tolist() == [0, 1, 0]


def test_parent_with_later_time_is_hidden():
  tables = _tables()
  tables["customers"]["joined"] = ["2019-01-01", "2020-01-01T03:00Z", "2019-01-01"]
  schema = {
      **SCHEMA,
      "tables": {**SCHEMA["tables"], "customers": {"primary_key": "cid", "time_column": "joined"}},
  }
  data = _build(schema, tables)
  # Customer 2 joined at 03:00, after order 1 (01:00): not known yet.
  np.testing.assert_array_equal(
      data.contexts["cid->customers"].row_index[:, 0], [0, -1, 0, 0, -1, 0, -1]
  )


def test_select_contexts_max_history_and_errors():
  data = build_context_sets(
      _tables(),
      SCHEMA,
      max_history={"orders.cid=cid": 3},
      contexts=["orders.cid=cid"],
      preprocessor=STANDARD,
  )
  assert list(data.contexts) == ["orders.cid=cid"]
  assert data.contexts["orders.cid=cid"].row_index[5].tolist() == [3, 2, 0]
  with pytest.raises(ValueError, match="unknown context.*'nope'"):
    ContextSetBuilder(Schema.from_dict(SCHEMA), contexts=["nope"])
  with pytest.raises(ValueError, match="max_history names unknown"):
    ContextSetBuilder(Schema.from_dict(SCHEMA), max_history={"x": 2})
  with pytest.raises(RuntimeError, match="not fitted"):
    ContextSetBuilder(Schema.from_dict(SCHEMA)).transform(_tables())


def test_save_load_builder_and_data_predict_time(tmp_path):
  tables = _tables()
  builder = ContextSetBuilder(Schema.from_dict(SCHEMA), max_history=2, preprocessor=STANDARD).fit(
      tables
  )
  data = builder.transform(tables)
  builder.save(tmp_path / "builder")
  loaded = ContextSetBuilder.load(tmp_path / "builder")
  # Prediction: no label column, new values; same features as the original builder.
  new = {**tables, "orders": tables["orders"].drop(columns=["label"])}
  again = loaded.transform(new)
  assert again.labels is None
  np.testing.assert_array_equal(again.numeric, data.numeric)
  for name, ctx in data.contexts.items():
    for field in ("numeric", "numeric_missing", "categorical", "mask", "ages", "row_index"):
      np.testing.assert_array_equal(getattr(again.contexts[name], field), getattr(ctx, field))
  data.save(tmp_path / "data")
  back = RelationalData.load(tmp_path / "data")
  assert (
      back.summary() == data.summary()
      and back.contexts["orders.cid=cid"].spec == data.contexts["orders.cid=cid"].spec
  )
  np.testing.assert_array_equal(
      back.contexts["visits.cid=cid"].numeric, data.contexts["visits.cid=cid"].numeric
  )
  train = data.subset("train")
  assert train.num_rows == 4 and train.arrays()["contexts"]["orders.cid=cid"]["mask"].shape == (
      4,
      2,
  )


def test_window_count_features_of_histories(tmp_path):
  tables = _tables()
  data = _build(count_windows=(1, 3))
  plain = _build()
  names = data.feature_info.numeric_names[-4:]
  assert names == (
      "count[orders.cid=cid,1h]",
      "count[orders.cid=cid,3h]",
      "count[visits.cid=cid,1h]",
      "count[visits.cid=cid,3h]",
  )
  np.testing.assert_array_equal(data.numeric[:, :-4], plain.numeric)
  counts = np.expm1(data.numeric[:, -4:]).round()
  # Earlier orders of the same customer (strict): o2/o3 (02:00) see o0 (00:00, 2 h ago) within 3 h only;
  # o5 (06:00) sees o3 and o2 (4 h ago) in neither window. Visits at or before: o2 sees v1 (02:00) within
  # 1 h and v1, v0 (23:00, 3 h ago: outside (t-3h, t]) -> 1 within 3 h; o5 (06:00): v2 (03:00) is exactly 3 h ago.
  np.testing.assert_array_equal(counts[:, 0], [0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(counts[:, 1], [0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(counts[:, 2], [0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(counts[:, 3], [1, 1, 1, 1, 0, 0, 0])
  builder = ContextSetBuilder(
      Schema.from_dict(SCHEMA), max_history=2, preprocessor=STANDARD, count_windows=(1, 3)
  ).fit(tables)
  builder.save(tmp_path / "b")
  again = ContextSetBuilder.load(tmp_path / "b").transform(tables)
  np.testing.assert_array_equal(again.numeric, data.numeric)
  with pytest.raises(ValueError, match="count_windows"):
    ContextSetBuilder(Schema.from_dict(SCHEMA), count_windows=(0,))


def test_key_count_feature_without_times():
  schema = {
      **SCHEMA,
      "tables": {**SCHEMA["tables"], "orders": {**SCHEMA["tables"]["orders"], "time_column": None}},
      "split": {"method": "random", "valid_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
  }
  data = _build(schema=schema, count_windows=(1,))
  assert data.feature_info.numeric_names[-2] == "count[orders.cid=cid,all]"
  # Other orders of the same customer (never itself): customer 1 has 4 orders, customer 2 one.
  np.testing.assert_array_equal(np.expm1(data.numeric[:, -2]).round(), [3, 0, 3, 3, 0, 3, 0])


# ---------------------------------------------------------------- empty and all-null related tables
def _four_tables():
  """regions <- orders -> customers <- visits; orders (the target) and visits have times."""
  regions = pd.DataFrame({"rid": ["n", "s"], "area": [1.0, 2.0], "kind": ["x", "y"]})
  customers = pd.DataFrame(
      {
          "cid": [1, 2, 3],
          "spend": [10.0, 20.0, 30.0],
          "joined": ["2019-01-01", "2019-06-01", "2020-01-01T02:30Z"],
      }
  )
  orders = pd.DataFrame(
      {
          "oid": range(6),
          "t": [f"2020-01-01T0{h}:00Z" for h in (0, 1, 2, 3, 5, 7)],
          "cid": [1, 2, 1, 3, 2, 1],
          "rid": ["n", "s", "n", "n", "s", "s"],
          "amount": [5.0, 7.0, 6.0, 9.0, 1.0, 2.0],
          "label": [0, 1, 1, 0, 0, 1],
      }
  )
  visits = pd.DataFrame(
      {
          "vid": range(4),
          "t": ["2019-12-31T23:00Z", "2020-01-01T02:00Z", "2020-01-01T00:30Z", "2020-01-01T06:00Z"],
          "cid": [1, 1, 2, 3],
          "duration": [1.0, 2.0, 3.0, 4.0],
          "page": ["p", "q", "p", "q"],
      }
  )
  return {"regions": regions, "customers": customers, "orders": orders, "visits": visits}


FOUR = {
    "tables": {
        "regions": {"primary_key": "rid"},
        "customers": {"primary_key": "cid", "time_column": "joined"},
        "orders": {
            "primary_key": "oid",
            "time_column": "t",
            "foreign_keys": {"cid": "customers", "rid": "regions"},
        },
        "visits": {"primary_key": "vid", "time_column": "t", "foreign_keys": {"cid": "customers"}},
    },
    "target": {"table": "orders", "column": "label", "task": "binary"},
    "split": SCHEMA["split"],
}
# The context(s) each related table fills.
FILLS = {
    "regions": ["rid->regions"],
    "customers": ["cid->customers"],
    "visits": ["visits.cid=cid"],
}


def _via_csv(df):
  """`df` written to CSV and read back, as a user's file: an empty table has object columns."""
  return pd.read_csv(io.StringIO(df.to_csv(index=False)))


def _four_builder(tables):
  builder = ContextSetBuilder(
      Schema.from_dict(FOUR), max_history=2, preprocessor=STANDARD, count_windows=(3,)
  )
  return builder.fit(tables)


def _layout(data):
  own = (data.numeric.shape, data.categorical.shape, data.feature_info)
  return own, {
      k: (c.numeric.shape, c.categorical.shape, c.feature_info) for k, c in data.contexts.items()
  }


@pytest.mark.parametrize("source", ["frame", "csv"])
@pytest.mark.parametrize("table", ["regions", "customers", "visits"])
def test_table_empty_at_fit_gives_empty_contexts_and_keeps_its_layout(table, source, tmp_path):
  full = _four_builder(_four_tables()).transform(_four_tables())
  tables = _four_tables()
  empty = tables[table].iloc[:0]
  tables[table] = _via_csv(empty) if source == "csv" else empty
  with pytest.warns(SchemaWarning, match=f"table '{table}' has no rows") as record:
    builder = _four_builder(tables)
  assert not any("foreign key" in str(w.message) for w in record)  # no orphan warning
  data = builder.transform(tables)
  for name, ctx in data.contexts.items():
    if name in FILLS[table]:
      assert not ctx.mask.any() and (ctx.row_index == -1).all() and (ctx.ages == 0).all()
      assert (ctx.numeric == 0).all() and ctx.categorical.shape[-1] == 0
      # No features learned from no rows; a table with a time keeps its age feature.
      timed = FOUR["tables"][table].get("time_column") is not None
      assert ctx.feature_info.numeric_names == ((AGE_FEATURE,) if timed else ())
    else:
      np.testing.assert_array_equal(ctx.row_index, full.contexts[name].row_index)
  counts = np.isin(data.feature_info.numeric_names, [f"count[{n},3h]" for n in FILLS[table]])
  np.testing.assert_array_equal(data.numeric[:, ~counts], full.numeric[:, ~counts])
  assert (data.numeric[:, counts] == 0).all()  # an empty history counts no rows
  # At prediction time the table has rows: they fill its contexts, in the fit-time layout.
  builder.save(tmp_path)
  for b in (builder, ContextSetBuilder.load(tmp_path)):
    again = b.transform(_four_tables())
    assert _layout(again) == _layout(data)
    for name in FILLS[table]:
      np.testing.assert_array_equal(again.contexts[name].row_index, full.contexts[name].row_index)


@pytest.mark.parametrize("table", ["regions", "customers", "visits"])
def test_table_empty_at_predict_time_gives_empty_contexts(table):
  builder = _four_builder(_four_tables())
  fitted = builder.transform(_four_tables())
  tables = _four_tables()
  tables[table] = _via_csv(tables[table].iloc[:0])
  data = builder.transform(tables)
  assert _layout(data) == _layout(fitted)
  for name in FILLS[table]:
    assert not data.contexts[name].mask.any() and (data.contexts[name].numeric == 0).all()


def test_all_null_columns_and_time_columns_of_related_tables():
  full = _four_builder(_four_tables()).transform(_four_tables())
  tables = _four_tables()
  for table, columns in (("regions", ["area", "kind"]), ("visits", ["t", "duration"])):
    tables[table] = _via_csv(tables[table].assign(**{c: None for c in columns}))
  assert tables["visits"]["t"].dtype == np.float64  # an all-empty CSV column reads as NaN floats
  tables["customers"] = tables["customers"].assign(joined=pd.Series([None] * 3, dtype=object))
  with pytest.warns(SchemaWarning) as record:
    builder = _four_builder(tables)
  assert sorted(str(w.message).split(" has ")[0] for w in record) == [
      "table 'customers'",
      "table 'visits'",
  ]  # no row of either has a time: none is known during training
  data = builder.transform(tables)
  c = data.contexts
  # Rows without a time are never visible; a parent without features still matches.
  assert not c["visits.cid=cid"].mask.any() and not c["cid->customers"].mask.any()
  np.testing.assert_array_equal(
      c["rid->regions"].row_index, full.contexts["rid->regions"].row_index
  )
  assert c["rid->regions"].feature_info.numeric_names == () and c["rid->regions"].mask.all()
  assert c["visits.cid=cid"].feature_info.numeric_names == (AGE_FEATURE,)
  j = data.feature_info.numeric_names.index("count[visits.cid=cid,3h]")
  assert (data.numeric[:, j] == 0).all()  # no visible visit in any window
  # Predicting with times present again: same layout, visits become visible.
  again = builder.transform(_four_tables())
  assert _layout(again) == _layout(data)
  np.testing.assert_array_equal(
      again.contexts["visits.cid=cid"].row_index, full.contexts["visits.cid=cid"].row_index
  )


def test_foreign_keys_of_another_kind_than_the_parent_key_fail_at_fit_warn_at_predict():
  tables = _four_tables()
  tables["regions"] = tables["regions"].assign(rid=[1, 2])  # orders.rid holds "n" / "s"
  with pytest.raises(SchemaError, match="table 'orders': 100% of foreign key 'rid' values"):
    _four_builder(tables)
  builder = _four_builder(_four_tables())
  with pytest.warns(SchemaWarning, match="100% of foreign key 'rid' values .6 of 6."):
    data = builder.transform(tables)  # new rows may reference new entities
  assert not data.contexts["rid->regions"].mask.any()
