"""The one relational pipeline: builder-settings precedence, data.* honoured for runner and estimator."""

import pytest
from relational_testing import SCHEMA

from nexus_jax.data.datasets import nycflights13
from nexus_jax.nexusflow import pipeline
from nexus_jax.nexusflow.config import DEFAULT_MAX_CATEGORIES, tabular_config
from nexus_jax.nexusflow.estimator import NexusFlowClassifier


def test_builder_settings_precedence():
  dc = tabular_config().data
  recommended = {
      "max_history": {"a": 3},
      "count_windows": (1.0,),
      "preprocessor": {"max_categories": 9},
  }
  kw = pipeline.builder_settings(dc, recommended)
  assert kw["max_history"] == {"a": 3} and kw["count_windows"] == (1.0,)  # the dataset's
  assert kw["preprocessor"]["max_categories"] == 9
  assert pipeline.builder_settings(dc, {})["max_history"] == dc.max_history  # library default
  dc.count_windows, dc.history_rows, dc.max_categories = "2,4", 5, 7  # config fields that are set
  kw = pipeline.builder_settings(dc, recommended)
  assert kw["count_windows"] == (2.0, 4.0) and kw["max_history"] == 5
  assert kw["preprocessor"]["max_categories"] == 7
  kw = pipeline.builder_settings(dc, recommended, {"max_history": 2, "preprocessor": {"x": 1}})
  assert kw["max_history"] == 2 and kw["preprocessor"]["max_categories"] == 7  # overrides last
  assert kw["preprocessor"]["x"] == 1
  with pytest.raises(
      ValueError, match=r"builder_kwargs: unknown ContextSetBuilder argument\(s\) \['max_hist'\]"
  ):
    pipeline.builder_settings(dc, {}, {"max_hist": 3})


def test_estimator_honours_data_fields_through_the_pipeline(tables):
  est = NexusFlowClassifier(
      config_overrides={"data.count_windows": "1,24", "data.drop_columns": "orders.channel"}
  )
  prepared = pipeline.prepare(est.make_config(SCHEMA), tables, SCHEMA, est.builder_kwargs)
  assert prepared.builder.config["count_windows"] == [1.0, 24.0]
  names = prepared.splits["train"].feature_info.numeric_names
  assert any(n.startswith("count[events.customer_id=customer_id,24") for n in names)
  assert "channel" in prepared.schema.tables["orders"].drop_columns
  assert not any("channel" in n for n in prepared.splits["train"].feature_info.categorical_names)


def test_max_categories_zero_takes_the_datasets_recommendation():
  dc = tabular_config().data
  assert dc.max_categories == 0
  flights = pipeline.preprocessor_settings(dc, nycflights13.PREPROCESSOR)
  assert flights["max_categories"] == 50 and flights["numeric_transform"] == dc.numeric_transform
  assert flights["datetime_parts"] == ["hour", "weekday"]  # the config's parts win
  assert pipeline.preprocessor_settings(dc, {})["max_categories"] == DEFAULT_MAX_CATEGORIES
  dc.max_categories = 7
  assert pipeline.preprocessor_settings(dc, nycflights13.PREPROCESSOR)["max_categories"] == 7


def test_drop_columns_and_count_windows_settings():
  schema = pipeline.with_dropped_columns(nycflights13.schema(), "flights.day, weather.humid")
  assert {"day", "month"} <= set(schema.tables["flights"].drop_columns)
  assert schema.tables["weather"].drop_columns[-1] == "humid"
  with pytest.raises(ValueError, match="unknown table 'flight'"):
    pipeline.with_dropped_columns(nycflights13.schema(), "flight.day")
  with pytest.raises(ValueError, match="not 'table.column'"):
    pipeline.with_dropped_columns(nycflights13.schema(), "day")
  assert pipeline.parse_count_windows("1, 3,24") == (1.0, 3.0, 24.0)
  assert pipeline.parse_count_windows("none") == ()
  for bad in ("1,x", "0", ","):
    with pytest.raises(ValueError, match="config.data.count_windows"):
      pipeline.parse_count_windows(bad)


@pytest.mark.parametrize(
    "split",
    [
        {"method": "time", "valid_start": "2024-03-16", "test_start": "2024-03-16"},
        {"method": "group", "key": "customer_id", "valid_fraction": 0.0, "test_fraction": 0.2},
        {"method": "random", "valid_fraction": 0.0, "test_fraction": 0.2},
    ],
)
def test_a_split_without_validation_rows_carves_them_from_training(tables, split):
  import copy

  import numpy as np

  schema = copy.deepcopy(SCHEMA)
  schema["split"] = split
  config = NexusFlowClassifier().make_config(schema)
  prepared = pipeline.prepare(config, tables, schema)
  train, valid = prepared.splits["train"], prepared.splits["valid"]
  n = train.num_rows + valid.num_rows
  assert prepared.carved_validation == valid.num_rows and 0.05 * n <= valid.num_rows <= 0.3 * n
  assert not set(train.row_index) & set(valid.row_index)
  orders = tables["orders"]
  if split["method"] == "time":  # the latest training rows
    assert orders["time"].iloc[valid.row_index].min() >= orders["time"].iloc[train.row_index].max()
  if split["method"] == "group":  # whole customers
    assert not set(orders["customer_id"].iloc[valid.row_index]) & set(
        orders["customer_id"].iloc[train.row_index]
    )
  assert (valid.split == "valid").all() and np.isin(train.split, ["train"]).all()
