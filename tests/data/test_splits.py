"""Tests for nexus_jax.data.splits."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_jax.data.schema import Schema, SchemaError
from nexus_jax.data.splits import assign_split


def _schema(split, time_column="t"):
  table = {"primary_key": "id"} | ({"time_column": time_column} if time_column else {})
  return Schema.from_dict(
      {
          "tables": {"rows": table},
          "target": {"table": "rows", "column": "y", "task": "binary"},
          "split": split,
      }
  )


def test_time_split_boundaries_are_half_open():
  df = pd.DataFrame(
      {
          "id": range(5),
          "t": [
              "2013-10-31T23:00Z",
              "2013-11-01T04:00Z",
              "2013-11-30T12:00Z",
              "2013-12-01T05:00Z",
              "2013-12-31T00:00Z",
          ],
      }
  )
  split = assign_split(
      _schema(
          {"method": "time", "valid_start": "2013-11-01T04:00Z", "test_start": "2013-12-01T05:00Z"}
      ),
      df,
  )
  assert split.tolist() == ["train", "valid", "valid", "test", "test"]
  numeric = pd.DataFrame({"id": range(4), "t": [1, 5, 9, 10]})
  split = assign_split(_schema({"method": "time", "valid_start": 5, "test_start": 10}), numeric)
  assert split.tolist() == ["train", "valid", "valid", "test"]
  with pytest.raises(SchemaError, match="test_start .* is before valid_start"):
    assign_split(_schema({"method": "time", "valid_start": 10, "test_start": 5}), numeric)
  with pytest.raises(SchemaError, match="split.valid_start"):
    assign_split(_schema({"method": "time", "valid_start": "soon", "test_start": "2013-12-01"}), df)


def test_random_split_fractions_and_seed():
  df = pd.DataFrame({"id": range(1000)})
  schema = _schema(
      {"method": "random", "valid_fraction": 0.2, "test_fraction": 0.1, "seed": 3}, None
  )
  split = assign_split(schema, df)
  assert (split == "valid").sum() == 200 and (split == "test").sum() == 100
  np.testing.assert_array_equal(split, assign_split(schema, df))
  other = assign_split(
      _schema({"method": "random", "valid_fraction": 0.2, "test_fraction": 0.1, "seed": 4}, None),
      df,
  )
  assert (other != split).any()


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(st.one_of(st.none(), st.integers(0, 20)), min_size=1, max_size=80),
    valid=st.floats(0, 0.45),
    test=st.floats(0, 0.45),
    seed=st.integers(0, 5),
)
def test_group_split_never_spans_splits(keys, valid, test, seed):
  df = pd.DataFrame({"id": range(len(keys)), "user": pd.Series(keys, dtype=object)})
  schema = _schema(
      {
          "method": "group",
          "key": "user",
          "valid_fraction": valid,
          "test_fraction": test,
          "seed": seed,
      },
      None,
  )
  split = pd.Series(assign_split(schema, df))
  groups = split.groupby(df["user"].fillna("<null>")).nunique()
  assert (groups == 1).all()
  if test == 0:
    assert not (split == "test").any()
  if test > 0:
    assert (split == "test").any()
