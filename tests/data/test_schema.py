"""Tests for nexus_jax.data.schema: every validation error, warnings, orphan counts, JSON round trip."""

import copy
import json
import warnings

import numpy as np
import pandas as pd
import pytest

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
