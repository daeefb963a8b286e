"""Tests for nexus_jax.data.datasets.relational_tasks: schemas, splits, cutoffs and leakage of the
nine real relational tasks, on seeded slices (`task.load(max_entities=...)`)."""

import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from nexus_jax.data.datasets.relational_tasks import TASKS, RelationalTask, lahman
from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import Schema, SchemaWarning
from nexus_jax.data.splits import assign_split

NAMES = (
    "lahman_hall_of_fame",
    "lahman_salary",
    "lahman_position",
    "lahman_allstar",
    "lahman_team_wins",
    "pbc_death",
    "wagepan_wage",
    "ohio_wheeze",
    "mathach_school",
)
# Entities per slice: enough for both binary classes and every split, small enough to be quick.
SLICE = {
    "lahman_hall_of_fame": 200,
    "lahman_salary": 150,
    "lahman_position": 300,
    "lahman_allstar": 250,
    "lahman_team_wins": 60,  # all 38 franchises
    "pbc_death": 150,
    "wagepan_wage": 100,
    "ohio_wheeze": 300,
    "mathach_school": 40,
}
TIMED = [n for n in NAMES if TASKS[n].cutoff_column is not None]


@pytest.fixture(scope="module")
def sliced():
  """name -> (tables, schema dict) of each task's slice, loaded once."""
  return {name: TASKS[name].load(max_entities=SLICE[name]) for name in NAMES}


def _builder(tables, schema) -> ContextSetBuilder:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SchemaWarning)
    return ContextSetBuilder(Schema.from_dict(schema), max_history=64).fit(tables)


def test_registry_order_and_names():
  assert tuple(TASKS) == NAMES
  for name, task in TASKS.items():
    assert isinstance(task, RelationalTask) and task.name == name
    assert task.task in ("binary", "multiclass", "regression")
    assert task.description and task.why_safe and task.source
    assert (task.cutoff == "") == (task.cutoff_column is None)


@pytest.mark.parametrize("name", NAMES)
def test_schema_validates_and_target_kind(sliced, name):
  tables, schema = sliced[name]
  task = TASKS[name]
  parsed = Schema.from_dict(schema)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SchemaWarning)
    parsed.validate(tables, require_target=True)
  assert task.task == schema["target"]["task"]
  target = tables[schema["target"]["table"]]
  assert task.entity_column in target.columns
  if task.cutoff_column is not None:
    assert task.cutoff_column in target.columns
  y = target[schema["target"]["column"]]
  assert y.notna().all()
  if task.task == "binary":
    assert set(y.unique()) == {0, 1}
  elif task.task == "multiclass":
    assert y.nunique() >= 3
  else:
    assert pd.api.types.is_float_dtype(y.dtype) and np.isfinite(y.to_numpy()).all()
  assert target[task.entity_column].nunique() <= SLICE[name]


@pytest.mark.parametrize("name", NAMES)
def test_split_keeps_entities_apart_or_times_ordered(sliced, name):
  tables, schema = sliced[name]
  task = TASKS[name]
  parsed = Schema.from_dict(schema)
  target = tables[parsed.target.table]
  split = assign_split(parsed, target)
  assert set(split) == {"train", "valid", "test"}
  if parsed.split.method == "group":
    assert parsed.split.key == task.entity_column
    per_entity = pd.Series(split).groupby(target[task.entity_column].to_numpy()).nunique()
    assert (per_entity == 1).all()
  else:
    times = target[parsed.target_table.time_column].to_numpy(np.float64)
    assert times[split == "train"].max() < times[split == "valid"].min()
    assert times[split == "valid"].max() < times[split == "test"].min()


@pytest.mark.parametrize("name", TIMED)
def test_context_rows_are_before_the_cutoff(sliced, name):
  tables, schema = sliced[name]
  task = TASKS[name]
  builder = _builder(tables, schema)
  data = builder.transform(tables)
  cutoff = tables[schema["target"]["table"]][task.cutoff_column].to_numpy(np.float64)
  checked = 0
  for ctx in data.contexts.values():
    time_column = schema["tables"][ctx.spec.table].get("time_column")
    if time_column is None:
      continue
    rows, _ = np.nonzero(ctx.mask)
    times = tables[ctx.spec.table][time_column].to_numpy(np.float64)[ctx.row_index[ctx.mask]]
    assert (times < cutoff[rows]).all(), ctx.spec.name
    checked += len(rows)
  assert checked > 0


def _banned(schema) -> dict[str, set[str]]:
  """table -> columns that must not be features there (drop columns; the target column)."""
  out = {t: set(spec.get("drop_columns", ())) for t, spec in schema["tables"].items()}
  out[schema["target"]["table"]].add(schema["target"]["column"])
  return out


def _names(info) -> set[str]:
  return set(info.numeric_sources) | set(info.categorical_names)


@pytest.mark.parametrize("name", NAMES)
def test_no_dropped_or_label_column_is_a_feature(sliced, name):
  tables, schema = sliced[name]
  builder = _builder(tables, schema)
  banned = _banned(schema)
  target = schema["target"]["table"]
  own = _names(builder.preprocessors[target].get_feature_info())
  assert schema["target"]["column"] not in own
  for table, pre in builder.preprocessors.items():
    assert not _names(pre.get_feature_info()) & banned[table], table
  extra = {
      "lahman_hall_of_fame": {"votes", "ballots", "needed"},
      "lahman_salary": {"salary"},
      "lahman_team_wins": {"W", "L", "R", "RA", "Rank"},
      "pbc_death": {"futime", "status"},
      "mathach_school": {"MEANSES"},
  }.get(name, set())
  assert not own & extra
  if name == "lahman_position":  # the label's source tables are absent
    assert set(tables) == {"players", "batting"}
    assert not any("POS" in df.columns for df in tables.values())


@pytest.mark.parametrize("name", NAMES)
def test_slice_keeps_every_row_of_its_entities(name):
  task = TASKS[name]
  full, schema = task.load()
  part, _ = task.load(max_entities=SLICE[name] // 3, seed=1)
  again, _ = task.load(max_entities=SLICE[name] // 3, seed=1)
  target = schema["target"]["table"]
  kept = set(part[target][task.entity_column])
  assert len(kept) == min(SLICE[name] // 3, full[target][task.entity_column].nunique())
  for table, df in full.items():
    pd.testing.assert_frame_equal(part[table], again[table])
    if task.entity_column not in df.columns:
      continue
    pk = schema["tables"][table]["primary_key"]
    expected = set(df.loc[df[task.entity_column].isin(kept), pk])
    assert set(part[table][pk]) == expected, table


def test_full_task_sizes():
  seasons, schema = TASKS["lahman_allstar"].load()
  assert len(seasons["seasons"]) >= 50_000
  assert seasons["seasons"]["all_star"].between(0, 1).all()
  patients, _ = TASKS["pbc_death"].load()
  assert 200 <= len(patients["patients"]) <= 312
  assert (patients["patients"]["futime"] > patients["patients"]["landmark"]).all()


def test_lahman_is_read_without_importing_the_package():
  batting = lahman.read_table("Batting")
  batting.loc[:, "yearID"] = 0
  assert (lahman.read_table("Batting")["yearID"] > 1800).all()  # a copy, not the cached frame
  assert "lahman" not in sys.modules


def test_main_position_tie_break():
  fielding = pd.DataFrame(
      {
          "playerID": ["a", "a", "b", "b", "c"],
          "POS": ["OF", "C", "SS", "2B", "DH"],
          "G": [10, 10, 3, 5, 9],
      }
  )
  assert lahman.main_positions(fielding).to_dict() == {"a": "C", "b": "2B"}
