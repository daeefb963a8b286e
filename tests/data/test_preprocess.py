"""Tests for nexus_jax.data.preprocess (TabularPreprocessor) and nexus_jax.data.column_types."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.preprocessing import QuantileTransformer

from nexus_jax.data import column_types as ct
from nexus_jax.data.preprocess import FeatureInfo, TabularPreprocessor, quantile_normal


def _frame(n=200, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=n)
  x[::17] = np.nan
  return pd.DataFrame(
      {
          "x": x,
          "count": rng.integers(0, 50, size=n),
          "color": pd.Series(rng.choice(["red", "green", "blue"], size=n), dtype="string"),
          "flag": rng.integers(0, 2, size=n),
          "yes_no": rng.choice(["yes", "no"], size=n),
          "when": pd.Series(
              pd.date_range("2013-01-01", periods=n, freq="7h", tz="UTC").strftime(
                  "%Y-%m-%dT%H:%M:%SZ"
              ),
              dtype="string",
          ),
          "row_id": np.arange(n),
          "name": [f"person {i}" for i in range(n)],
          "const": 3.0,
      }
  )


def test_detects_every_type():
  info = TabularPreprocessor().fit(_frame()).get_feature_info()
  assert info.types == {
      "x": "numeric",
      "count": "numeric",
      "color": "categorical",
      "flag": "boolean",
      "yes_no": "boolean",
      "when": "datetime",
      "row_id": "identifier",
      "name": "identifier",
      "const": "constant",
  }
  assert set(info.dropped_columns) == {"row_id", "name", "const"}
  assert ct.detect_column_type(pd.Series([True, False, None])) == "boolean"
  assert (
      ct.detect_column_type(pd.Series(pd.to_datetime(["2020-01-01", "2020-02-01"]))) == "datetime"
  )
  assert (
      ct.detect_column_type(pd.Series(["2013", "2014", "2015"])) == "categorical"
  )  # not ISO dates
  assert ct.detect_column_type(pd.Series([np.nan, np.nan])) == "constant"


def test_output_shapes_dtypes_and_feature_info():
  df = _frame()
  pre = TabularPreprocessor().fit(df)
  out = pre.transform(df)
  info = pre.get_feature_info()
  n = len(df)
  assert out["numeric"].dtype == np.float32 and out["numeric"].shape == (n, info.num_numeric)
  assert out["numeric_missing"].dtype == bool and out["numeric_missing"].shape == (
      n,
      info.num_numeric,
  )
  assert out["categorical"].dtype == np.int32 and out["categorical"].shape == (
      n,
      info.num_categorical,
  )
  assert not np.isnan(out["numeric"]).any()
  assert info.numeric_names[:2] == ("x", "count")
  assert info.numeric_names[2:] == tuple(
      f"when__{p}"
      for p in [
          "epoch",
          "hour_sin",
          "hour_cos",
          "weekday_sin",
          "weekday_cos",
          "yearday_sin",
          "yearday_cos",
      ]
  )
  assert info.numeric_sources[2:] == ("when",) * 7
  assert info.categorical_names == ("color", "flag", "yes_no")
  assert info.categorical_cardinalities == (5, 4, 4)
  assert (out["categorical"] < np.array(info.categorical_cardinalities)).all()
  np.testing.assert_array_equal(out["numeric_missing"][:, 0], df["x"].isna().to_numpy())
  with pytest.raises(dataclasses.FrozenInstanceError):
    info.numeric_names = ()


def test_datetime_cyclical_parts_exact():
  df = pd.DataFrame({"t": ["2013-01-01T06:00:00Z", "2013-01-02T18:30:00Z", "2013-03-05T00:00:00Z"]})
  pre = TabularPreprocessor(numeric_transform="standard").fit(df)
  info = pre.get_feature_info()
  num = pre.transform(df)["numeric"]
  col = {name: num[:, i] for i, name in enumerate(info.numeric_names)}
  hours = np.array([6.0, 18.5, 0.0])
  np.testing.assert_allclose(col["t__hour_sin"], np.sin(2 * np.pi * hours / 24), atol=1e-6)
  np.testing.assert_allclose(col["t__hour_cos"], np.cos(2 * np.pi * hours / 24), atol=1e-6)
  weekday = np.array([1.0, 2.0, 1.0])  # 2013-01-01 was a Tuesday
  np.testing.assert_allclose(col["t__weekday_sin"], np.sin(2 * np.pi * weekday / 7), atol=1e-6)
  days = np.array([15706.25, 15707 + 18.5 / 24, 15769.0])
  np.testing.assert_allclose(col["t__epoch"], (days - days.mean()) / days.std(), atol=1e-5)
  # Date-only column: the hour part never varies, so it is left out.
  dates = pd.DataFrame({"d": ["2013-01-01", "2013-01-05", "2013-02-11"]})
  names = TabularPreprocessor().fit(dates).get_feature_info().numeric_names
  assert "d__hour_sin" not in names and "d__weekday_sin" in names


def test_placeholder_dates_beyond_pandas_nanoseconds_are_plain_values():
  # 9999-12-31 ("no end date") is past 2262, the last nanosecond timestamp.
  for column in (
      pd.Series(["2013-01-01", "2013-01-03", "9999-12-31", None]),
      pd.to_datetime(pd.Series(["2013-01-01", "2013-01-03", "9999-12-31", None])),
  ):
    df = pd.DataFrame({"end": column})
    pre = TabularPreprocessor(numeric_transform="standard", datetime_parts=["epoch"]).fit(df)
    out = pre.transform(df)
    days = np.array([15706.0, 15708.0, 2932896.0])  # days since 1970-01-01
    np.testing.assert_allclose(out["numeric"][:3, 0], (days - days.mean()) / days.std(), rtol=1e-5)
    assert out["numeric_missing"][:, 0].tolist() == [False, False, False, True]


def test_quantile_matches_sklearn_and_standard_moments():
  rng = np.random.default_rng(1)
  train = pd.DataFrame(
      {"a": rng.exponential(size=500), "b": rng.integers(0, 5, size=500).astype(float)}
  )
  test = pd.DataFrame(
      {"a": np.r_[rng.exponential(size=50), -3.0, 99.0], "b": np.r_[np.arange(52) % 7]}
  )
  pre = TabularPreprocessor(n_quantiles=100).fit(train)
  qt = QuantileTransformer(n_quantiles=100, output_distribution="normal", subsample=10**9).fit(
      train.to_numpy()
  )
  np.testing.assert_allclose(
      pre.transform(test)["numeric"], qt.transform(test.to_numpy()), atol=1e-5
  )
  np.testing.assert_allclose(
      quantile_normal(test.to_numpy(float), qt.quantiles_, qt.references_),
      qt.transform(test.to_numpy()),
      atol=1e-12,
  )
  std = TabularPreprocessor(numeric_transform="standard").fit(train).transform(train)["numeric"]
  np.testing.assert_allclose(std.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(std.std(0), 1.0, atol=1e-5)


def test_unseen_category_nan_and_inf_at_predict_time():
  train = pd.DataFrame(
      {"c": ["a", "b", "a", "c"], "x": [1.0, 2.0, 3.0, 4.0], "f": [True, False, True, True]}
  )
  pre = TabularPreprocessor(numeric_transform="standard").fit(train)
  test = pd.DataFrame(
      {
          "c": ["b", "zzz", None, "a"],
          "x": [np.nan, np.inf, -np.inf, "oops"],
          "f": [None, True, "maybe", False],
      }
  )
  out = pre.transform(test)
  assert out["categorical"][:, 0].tolist() == [3, 1, 0, 2]  # vocab by frequency: a, b, c
  assert out["categorical"][:, 1].tolist() == [0, 3, 1, 2]  # missing, true, unknown, false
  assert out["numeric_missing"][:, 0].all()  # NaN, +inf, -inf, unparsable -> missing
  np.testing.assert_allclose(out["numeric"][:, 0], (2.5 - 2.5) / np.std([1, 2, 3, 4.0]))


def test_max_categories_and_min_count_map_rare_to_unknown():
  train = pd.DataFrame({"c": ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"]})
  pre = TabularPreprocessor(max_categories=2).fit(train)
  assert pre.get_feature_info().categorical_cardinalities == (4,)
  assert pre.transform(pd.DataFrame({"c": ["a", "b", "c", "d"]}))["categorical"][:, 0].tolist() == [
      2,
      3,
      1,
      1,
  ]
  pre = TabularPreprocessor(min_category_count=3).fit(train)
  assert pre.transform(pd.DataFrame({"c": ["c", "d"]}))["categorical"][:, 0].tolist() == [4, 1]


def test_integer_keys_survive_nan_upcast():
  train = pd.DataFrame({"k": pd.Series([1, 2, 2, 3], dtype="int64")})
  pre = TabularPreprocessor(column_types={"k": "categorical"}).fit(train)
  out = pre.transform(pd.DataFrame({"k": [2.0, np.nan, 7.0, 1.0]}))  # float after a CSV NaN
  assert out["categorical"][:, 0].tolist() == [2, 0, 1, 3]


def test_statistics_come_from_fit_rows_only():
  train = pd.DataFrame({"x": [1.0, 2.0, 3.0, np.nan], "c": ["a", "a", "b", "b"]})
  later = pd.DataFrame({"x": [100.0, 200.0, np.nan], "c": ["z", "z", "z"]})
  pre = TabularPreprocessor(numeric_transform="standard").fit(train)
  out = pre.transform(pd.concat([train, later], ignore_index=True))
  scale = np.std([1.0, 2.0, 3.0])
  np.testing.assert_allclose(
      out["numeric"][:, 0], (np.array([1, 2, 3, 2, 100, 200, 2.0]) - 2) / scale, rtol=1e-6
  )
  assert (out["categorical"][4:, 0] == 1).all()  # 'z' was never seen while fitting
  q = TabularPreprocessor().fit(train).transform(later)["numeric"][:, 0]
  assert q[0] == q[1] > 5  # beyond the training max: clipped to the top of the normal
  assert q[2] == pytest.approx(0.0, abs=1e-6)  # imputed with the training median 2.0


def test_save_load_roundtrip_is_exact(tmp_path):
  df = _frame(300, seed=3)
  for transform in ("quantile", "standard"):
    pre = TabularPreprocessor(numeric_transform=transform, max_categories=2).fit(df.iloc[:200])
    pre.save(tmp_path / transform)
    files = sorted(p.name for p in (tmp_path / transform).iterdir())
    assert files == ["preprocessor.json", "preprocessor_arrays.npz"]
    json.loads((tmp_path / transform / "preprocessor.json").read_text())
    loaded = TabularPreprocessor.load(tmp_path / transform)
    a, b = pre.transform(df), loaded.transform(df)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert loaded.get_feature_info() == pre.get_feature_info()


def test_errors_name_the_problem():
  pre = TabularPreprocessor().fit(_frame())
  with pytest.raises(ValueError, match="'color'"):
    pre.transform(_frame().drop(columns=["color"]))
  pre.transform(_frame().drop(columns=["row_id", "const"]))  # dropped columns are not required
  with pytest.raises(RuntimeError, match="not fitted"):
    TabularPreprocessor().transform(_frame())
  with pytest.raises(ValueError, match="numeric_transform"):
    TabularPreprocessor(numeric_transform="log")
  with pytest.raises(ValueError, match="'nope'"):
    TabularPreprocessor(column_types={"nope": "numeric"}).fit(_frame())
  with pytest.raises(ValueError, match="column_types\\['x'\\]"):
    TabularPreprocessor(column_types={"x": "float"})
  empty = TabularPreprocessor().fit(_frame().iloc[:0])  # nothing to learn: no features
  assert set(empty.get_feature_info().types.values()) == {"constant"}
  assert empty.transform(_frame())["numeric"].shape == (200, 0)
  with pytest.raises(TypeError, match="DataFrame"):
    TabularPreprocessor().fit(np.zeros((3, 2)))


def test_ignore_columns_and_overrides():
  pre = TabularPreprocessor(ignore_columns=["x"], column_types={"count": "categorical"}).fit(
      _frame()
  )
  info = pre.get_feature_info()
  assert "x" not in info.types and info.types["count"] == "categorical"
  out = pre.transform(_frame().drop(columns=["x"]))
  assert out["categorical"].shape[1] == info.num_categorical == 4


_cells = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), data=st.data(), transform=st.sampled_from(["quantile", "standard"]))
def test_property_outputs_consistent(n, data, transform):
  numbers = data.draw(st.lists(_cells, min_size=n, max_size=n))
  words = data.draw(
      st.lists(st.one_of(st.none(), st.sampled_from("abcde")), min_size=n, max_size=n)
  )
  df = pd.DataFrame({"num": pd.Series(numbers, dtype=float), "cat": pd.Series(words, dtype=object)})
  pre = TabularPreprocessor(numeric_transform=transform).fit(df)
  info = pre.get_feature_info()
  new = pd.DataFrame({"num": [np.nan, 1e30, -1.0], "cat": ["q", None, "a"]})
  for frame in (df, new):
    out = pre.transform(frame)
    assert out["numeric"].shape == out["numeric_missing"].shape == (len(frame), info.num_numeric)
    assert np.isfinite(out["numeric"]).all()
    assert out["categorical"].shape == (len(frame), info.num_categorical)
    assert (
        (out["categorical"] >= 0) & (out["categorical"] < np.array(info.categorical_cardinalities))
    ).all()
  assert isinstance(info, FeatureInfo)
