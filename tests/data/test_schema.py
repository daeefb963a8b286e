"""Tests for nexus_jax.data.schema: every validation error, warnings, orphan counts, JSON round trip."""

import copy
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from nexus_jax.data import context_index as ci
from nexus_jax.data.schema import Schema, SchemaError, SchemaWarning

BASE = {
    "tables": {
        "users": {"file": "users.csv", "primary_key": "uid"},
        "events": {
            "file": "events.csv",
            "primary_key": "eid",
            "time_column": "ts",
            "foreign_keys": {"uid": "users"},
            "drop_columns": ["outcome"],
        },
    },
    "target": {"table": "events", "column": "y", "task": "binary"},
    "split": {"method": "time", "valid_start": "2021-01-03", "test_start": "2021-01-04"},
}


def _tables():
  users = pd.DataFrame({"uid": ["a", "b", "c"], "age": [30, 40, 50]})
  events = pd.DataFrame(
      {
          "eid": [1, 2, 3, 4],
          "ts": ["2021-01-01", "2021-01-02", "2021-01-03", "2021-01-04"],
          "uid": ["a", "b", "zz", None],
          "outcome": [1, 2, 3, 4],
          "y": [0, 1, 0, 1],
      }
  )
  return {"users": users, "events": events}


def _schema(edit=None):
  d = copy.deepcopy(BASE)
  if edit:
    edit(d)
  return Schema.from_dict(d)


def test_valid_schema_reports_orphans_and_roundtrips(tmp_path):
  schema = _schema()
  report = schema.validate(_tables())
  assert report.orphan_foreign_keys == {"events.uid": 1}  # "zz" has no user; null is not an orphan
  assert report.row_counts == {"users": 3, "events": 4} and report.warnings == []
  assert Schema.from_dict(schema.to_dict()) == schema
  schema.to_json(tmp_path / "schema.json")
  assert Schema.from_json(tmp_path / "schema.json") == schema
  assert schema.feature_columns("events", _tables()["events"]) == ["ts", "uid"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["tables"]["events"]["foreign_keys"].update(uid="people"),
            "table 'events': foreign key 'uid' references unknown table 'people'",
        ),
        (
            lambda d: d["tables"]["users"].pop("primary_key"),
            "foreign key 'uid' references table 'users', which has no primary_key",
        ),
        (
            lambda d: d["tables"]["events"].update(primray_key="eid"),
            "schema.tables.events: unknown field",
        ),
        (lambda d: d["target"].update(table="nope"), "target: unknown table 'nope'"),
        (lambda d: d["target"].update(task="ranking"), "task 'ranking' unknown"),
        (lambda d: d["target"].pop("column"), "schema.target: missing field"),
        (
            lambda d: d["target"].update(column="outcome"),
            "column 'outcome' of table 'events' is in drop_columns",
        ),
        (lambda d: d["split"].update(method="kfold"), "method 'kfold' unknown"),
        (
            lambda d: d["tables"]["events"].pop("time_column"),
            "method 'time' needs a time_column on target table 'events'",
        ),
        (lambda d: d["split"].pop("test_start"), "needs 'valid_start' and 'test_start'"),
        (lambda d: d.update(split={"method": "group"}), "method 'group' needs 'key'"),
        (
            lambda d: d.update(
                split={"method": "random", "valid_fraction": 0.6, "test_fraction": 0.5}
            ),
            "sum below 1",
        ),
        (lambda d: d.pop("target"), "needs 'tables' and 'target'"),
    ],
)
def test_structure_errors(edit, message):
  with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _schema(edit)


def _with(table, **columns):
  tables = _tables()
  df = tables[table].copy()
  for name, values in columns.items():
    if values is None:
      df = df.drop(columns=[name])
    else:
      df[name] = values
  tables[table] = df
  return tables


@pytest.mark.parametrize(
    "tables, message",
    [
        (lambda: {"events": _tables()["events"]}, r"table\(s\) \['users'\] are in the schema"),
        (lambda: _with("users", uid=None), "table 'users': primary_key column 'uid' is missing"),
        (lambda: _with("events", ts=None), "table 'events': time_column column 'ts' is missing"),
        (lambda: _with("events", uid=None), "table 'events': foreign key column 'uid' is missing"),
        (
            lambda: _with("events", outcome=None),
            "table 'events': drop_columns column 'outcome' is missing",
        ),
        (
            lambda: _with("users", uid=["a", "b", "a"]),
            "table 'users': primary key 'uid' has 1 duplicate value",
        ),
        (
            lambda: _with("users", uid=["a", None, "c"]),
            "table 'users': primary key 'uid' has 1 null value",
        ),
        (
            lambda: _with("events", ts=["2021-01-01", "yesterday", "2021-01-03", "x"]),
            "table 'events' column 'ts': 2 value\\(s\\) do not parse as times",
        ),
        (
            lambda: _with("events", ts=["2021-01-01", None, "2021-01-03", "2021-01-04"]),
            "table 'events': time column 'ts' has 1 null value",
        ),
        (lambda: _with("events", y=None), "target: table 'events' column 'y' is missing"),
        (
            lambda: _with("events", y=[0, 1, 2, 1]),
            "task 'binary' needs exactly 2 distinct labels, found 3",
        ),
        (lambda: _with("events", y=[0, 1, np.nan, 1]), "column 'y' has 1 null label"),
    ],
)
def test_data_errors(tables, message):
  with pytest.raises(SchemaError, match=message):
    _schema().validate(tables())


def test_target_type_errors_per_task():
  regression = _schema(lambda d: d["target"].update(task="regression"))
  regression.validate(_with("events", y=[0.5, 1.5, 2.0, 3.0]))
  with pytest.raises(SchemaError, match="task 'regression' needs a numeric column"):
    regression.validate(_with("events", y=["a", "b", "c", "d"]))
  multiclass = _schema(lambda d: d["target"].update(task="multiclass"))
  multiclass.validate(_with("events", y=["x", "y", "z", "x"]))
  with pytest.raises(SchemaError, match="task 'multiclass' needs integer or string labels"):
    multiclass.validate(_with("events", y=[0.5, 1.0, 2.0, 1.0]))
  with pytest.raises(SchemaError, match="at least 2 classes"):
    multiclass.validate(_with("events", y=[1, 1, 1, 1]))
  # At prediction time the target may be absent.
  _schema().validate(_with("events", y=None), require_target=False)


def test_group_split_key_must_exist_and_json_errors(tmp_path):
  schema = _schema(lambda d: d.update(split={"method": "group", "key": "session"}))
  with pytest.raises(SchemaError, match="table 'events': split key column 'session' is missing"):
    schema.validate(_tables())
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(SchemaError, match="not valid JSON"):
    Schema.from_json(tmp_path / "bad.json")


def test_isolated_target_table_is_a_warning_not_an_error():
  schema = Schema.from_dict(
      {"tables": {"rows": {}}, "target": {"table": "rows", "column": "y", "task": "regression"}}
  )
  with pytest.warns(SchemaWarning, match="reaches no other table"):
    report = schema.validate({"rows": pd.DataFrame({"x": [1.0, 2.0], "y": [0.1, 0.2]})})
  assert len(report.warnings) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _schema().validate(_tables())  # linked tables: no warning


def test_reachable_tables_and_children():
  schema = _schema()
  assert schema.children_of("users") == [("events", "uid")]
  assert schema.reachable_tables("events") == {"users"} and schema.reachable_tables("users") == {
      "events"
  }
  assert json.loads(json.dumps(schema.to_dict())) == schema.to_dict()


# ---------------------------------------------------------------- orphan foreign keys
def _keyed(child_keys, parent_keys):
  """BASE's tables with one event per key of `child_keys` and users.uid = `parent_keys`."""
  n = len(child_keys)
  events = pd.DataFrame(
      {
          "eid": range(n),
          "ts": pd.date_range("2021-01-01", periods=n, freq="h"),
          "uid": child_keys,
          "outcome": 0,
          "y": [i % 2 for i in range(n)],
      }
  )
  return {"users": pd.DataFrame({"uid": parent_keys, "age": 30}), "events": events}


@pytest.mark.parametrize(
    "child, parent",
    [
        (pd.Series([1, 2, 3, 2], dtype=np.int64), ["1", "2", "3"]),  # from two different CSVs
        (pd.Series([1.0, 2.0, np.nan, 3.0]), pd.Series([1, 2, 3], dtype=np.int64)),
    ],
)
def test_orphans_are_counted_with_the_join_key_normalisation(child, parent):
  tables = _keyed(child, parent)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report = _schema().validate(tables)
  assert report.orphan_foreign_keys == {"events.uid": 0}
  index = ci.parent_index(tables["events"]["uid"], tables["users"]["uid"])
  np.testing.assert_array_equal(index, np.where(child.isna(), -1, child.fillna(0) - 1))


def test_mostly_orphan_keys_warn_with_table_column_and_share():
  keys = ["a", "b", "c", "a", "x", "y", "z", "x", "w", "v"]  # 6 of 10 have no user
  with pytest.warns(SchemaWarning) as record:
    report = _schema().validate(_keyed(keys, ["a", "b", "c"]))
  assert [str(w.message) for w in record] == [
      "table 'events': 60% of foreign key 'uid' values (6 of 10) match no row of 'users'"
  ]
  assert report.orphan_foreign_keys == {"events.uid": 6} and len(report.warnings) == 1
  with warnings.catch_warnings():  # half or fewer: counted, no warning
    warnings.simplefilter("error")
    assert _schema().validate(_keyed(keys[:8], ["a", "b", "c"])).orphan_foreign_keys == {
        "events.uid": 4
    }


def test_keys_that_never_match_are_an_error_at_fit_and_a_warning_at_predict():
  tables = _keyed(pd.Series([10, 20, None, 30], dtype="Int64"), ["a", "b", "c"])
  with pytest.raises(SchemaError) as error:
    _schema().validate(tables, require_target=True)
  message = str(error.value)
  assert message.startswith(
      "table 'events': 100% of foreign key 'uid' values (3 of 3) match no row of 'users', "
      "e.g. 10 vs 'users' keys like 'a'"
  )
  assert "\n" not in message and len(message) < 200
  with pytest.warns(SchemaWarning, match=r"100% of foreign key 'uid' values \(3 of 3\)"):
    report = _schema().validate(tables, require_target=False)
  assert report.orphan_foreign_keys == {"events.uid": 3}


@pytest.mark.parametrize(
    "tables, require_target, orphans",
    [
        (lambda: _keyed([None, None, None, None], ["a", "b"]), True, 0),  # all-null column
        (lambda: _keyed([], ["a", "b"]), False, 0),  # empty child (here the target) table
        (lambda: _keyed(["a", "b", "c"], pd.Series([], dtype=object)), True, 3),  # empty parent
    ],
)
def test_null_keys_and_empty_tables_give_no_orphan_warning_or_error(
    tables, require_target, orphans
):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report = _schema().validate(tables(), require_target=require_target)
  assert report.orphan_foreign_keys == {"events.uid": orphans}


# ---------------------------------------------------------------- other user-data mistakes
@pytest.mark.parametrize(
    "tables, message",
    [
        (
            lambda: _with(
                "events", ts=pd.Series(["2021-01-01", 5, "2021-01-03", "x"], dtype=object)
            ),
            "table 'events' column 'ts': time column mixes numbers (e.g. 5) with other values "
            "(e.g. '2021-01-01')",
        ),
        (
            lambda: _with("events", ts=["2021-01-01", "2021-01-02", "2021-01-03", "9999-12-31"]),
            "table 'events' column 'ts': 1 time(s) outside 1677-09-22..2262-04-11, e.g. "
            "['9999-12-31']",
        ),
        (
            lambda: {**_tables(), "events": _tables()["events"].iloc[:0]},
            "target: table 'events' has no rows; training needs labelled rows",
        ),
    ],
)
def test_user_data_mistakes_are_one_line_schema_errors(tables, message):
  with pytest.raises(SchemaError) as error:
    _schema().validate(tables())
  assert str(error.value).startswith(message) and "\n" not in str(error.value)
