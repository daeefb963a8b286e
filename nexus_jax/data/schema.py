"""Multi-table schema: tables, keys, foreign keys, time columns, target and split; with validation.

The user-facing contract, from a Python dict (`Schema.from_dict`) or a ``schema.json`` file
(`Schema.from_json`)::

    {"tables": {"flights": {"file": "flights.csv", "primary_key": "id", "time_column": "time_hour",
                            "foreign_keys": {"carrier": "airlines", "origin": "airports"},
                            "drop_columns": ["dep_delay"]},
                "airlines": {"file": "airlines.csv", "primary_key": "carrier"}, ...},
     "target": {"table": "flights", "column": "delayed", "task": "binary"},
     "split": {"method": "time", "valid_start": "2013-11-01T04:00Z", "test_start": "2013-12-01T05:00Z"}}

`foreign_keys` maps a column of this table to the table whose primary key it references.
`task` is ``binary | multiclass | regression``; `split.method` is ``time`` (on the target table's time
column), ``random`` (``valid_fraction``, ``test_fraction``, ``seed``) or ``group`` (``key``, a column of
the target table; also ``valid_fraction``, ``test_fraction``, ``seed``).

Two layers of checks, both raising `SchemaError` (a ValueError) that names table and column:

- structure, when the schema is built: unknown keys (typos), a foreign key to an unknown table or
  to a table without ``primary_key``, an unknown target table / task / split method, a time split
  on a target table without ``time_column``, a group split without ``key``, bad fractions;
- data, in `Schema.validate(tables)`: a table absent from ``tables``; a missing column (primary key,
  time, foreign key, drop, target, group key); duplicate or null primary keys; a target column that
  is missing, unlabelled or of an unusable type for the task; a time column that does not parse.

`validate` returns a `ValidationReport`: foreign-key values without a parent row are allowed and
counted (with the join's key normalisation: int 1, float 1.0 and string "1" are one key), and a
target table that reaches no other table is a warning (single-table learning). When more than half
of a column's non-null foreign keys have no parent row that is a `SchemaWarning`; when none has one
(and the parent table has rows) it is a `SchemaError` at training time (``require_target``) --
usually ids of a different kind -- and a warning at prediction time, where new rows may
reference new entities. `validate` also raises on a target table without rows at training time, on
a time column mixing numbers and other values, and on times outside 1677-09-22..2262-04-11 (they
would wrap around as nanoseconds).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from nexus_jax.data import context_index

TASKS = ("binary", "multiclass", "regression")
SPLIT_METHODS = ("time", "random", "group")
_TABLE_KEYS = {"file", "primary_key", "time_column", "foreign_keys", "drop_columns"}
_TARGET_KEYS = {"table", "column", "task"}
# Times are compared as int64 nanoseconds: the days pandas can represent so.
_FIRST_TIME = pd.Timestamp.min.ceil("D").tz_localize("UTC")
_LAST_TIME = pd.Timestamp.max.floor("D").tz_localize("UTC")
_SPLIT_KEYS = {
    "method",
    "valid_start",
    "test_start",
    "valid_fraction",
    "test_fraction",
    "seed",
    "key",
}


class SchemaError(ValueError):
  """A schema or its tables are inconsistent; the message names the table and column."""


class SchemaWarning(UserWarning):
  """Something legal but probably unintended (e.g. a target table linked to no other table)."""


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One table: its file, keys, time column and the columns that must never be features."""

  name: str
  file: str | None = None
  primary_key: str | None = None
  time_column: str | None = None
  foreign_keys: Mapping[str, str] = dataclasses.field(
      default_factory=dict
  )  # column -> parent table
  drop_columns: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  table: str
  column: str
  task: str


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  method: str = "random"
  valid_start: Any = None
  test_start: Any = None
  valid_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  key: str | None = None


@dataclasses.dataclass
class ValidationReport:
  """What `Schema.validate` found that is legal: orphan foreign keys and warnings."""

  row_counts: dict[str, int]
  orphan_foreign_keys: dict[str, int]  # "table.column" -> rows whose non-null key has no parent row
  warnings: list[str]


def _shown(value: Any) -> str:
  """A key value for a message: `repr` of the plain Python value (``1`` vs ``'1'``)."""
  return repr(value.item() if isinstance(value, np.generic) else value)


def _check_keys(where: str, given: Mapping, allowed: set) -> None:
  if not isinstance(given, Mapping):
    raise SchemaError(f"{where} must be a JSON object / dict, got {type(given).__name__}")
  unknown = set(given) - allowed
  if unknown:
    raise SchemaError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def parse_time(series: pd.Series, where: str) -> pd.Series:
  """A time column as UTC datetimes, or as float64 if numeric.

  Raises `SchemaError` (naming `where`) if a value does not parse, if an object column mixes
  numbers with other values, or if a time falls outside the nanosecond range (1677-09-22..2262-04-11).

  Returns:
    `[N]` datetime64[UTC] or float64 series (NaT/NaN where the value was null).
  """
  if pd.api.types.is_bool_dtype(series.dtype):
    raise SchemaError(
        f"{where}: time column is boolean; expected datetimes, date strings or numbers"
    )
  if pd.api.types.is_object_dtype(series.dtype) and pd.api.types.infer_dtype(
      series, skipna=True
  ).startswith("mixed"):
    series = _one_kind_of_time(series, where)
  if pd.api.types.is_numeric_dtype(series.dtype):
    return series.astype(np.float64)
  if pd.api.types.is_datetime64_any_dtype(series.dtype):
    parsed = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
  else:
    parsed = pd.to_datetime(series, utc=True, format="ISO8601", errors="coerce")
    bad = parsed.isna() & series.notna()
    if bad.any():
      parsed = pd.to_datetime(series, utc=True, format="mixed", errors="coerce")
      bad = parsed.isna() & series.notna()
    if bad.any():
      examples = series[bad].astype(str).unique()[:3].tolist()
      raise SchemaError(
          f"{where}: {int(bad.sum())} value(s) do not parse as times, e.g. {examples}; "
          "use ISO-8601 strings, datetimes or numbers"
      )
  # Times are compared as int64 nanoseconds: years outside ~1678-2261 would silently wrap around.
  outside = (parsed < _FIRST_TIME) | (parsed > _LAST_TIME)
  if outside.any():
    examples = series[outside.to_numpy()].astype(str).unique()[:3].tolist()
    raise SchemaError(
        f"{where}: {int(outside.sum())} time(s) outside {_FIRST_TIME:%Y-%m-%d}.."
        f"{_LAST_TIME:%Y-%m-%d}, e.g. {examples}; leave unknown times empty, not placeholder dates"
    )
  return parsed


def _one_kind_of_time(series: pd.Series, where: str) -> pd.Series:
  """An object time column: numbers only -> float64; numbers mixed with other values -> error."""
  nonnull = series.dropna()
  is_number = nonnull.map(
      lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
  ).to_numpy(bool)
  if is_number.all():
    return series.astype(np.float64)
  if is_number.any():
    raise SchemaError(
        f"{where}: time column mixes numbers (e.g. {_shown(nonnull[is_number].iloc[0])}) with "
        f"other values (e.g. {_shown(nonnull[~is_number].iloc[0])}); use one kind: datetimes / "
        "date strings, or numbers"
    )
  return series


def parse_cutoff(value: Any, like: pd.Series, where: str) -> Any:
  """A split boundary in the same representation as `parse_time(...)` returned (`like`)."""
  if pd.api.types.is_datetime64_any_dtype(like.dtype):
    try:
      ts = pd.Timestamp(value)
    except (ValueError, TypeError) as e:
      raise SchemaError(f"{where}: {value!r} does not parse as a time ({e})") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise SchemaError(
        f"{where}: {value!r} is not a number, but the time column is numeric"
    ) from None


@dataclasses.dataclass(frozen=True)
class Schema:
  """Tables, target and split of a multi-table prediction task (see the module docstring)."""

  tables: Mapping[str, TableSpec]
  target: TargetSpec
  split: SplitSpec

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_dict(cls, d: Mapping) -> "Schema":
    _check_keys("schema", d, {"tables", "target", "split"})
    if "tables" not in d or "target" not in d:
      raise SchemaError("schema: needs 'tables' and 'target'")
    _check_keys("schema.tables", d["tables"], set(d["tables"]))
    tables = {}
    for name, t in d["tables"].items():
      _check_keys(f"schema.tables.{name}", t, _TABLE_KEYS)
      fks = t.get("foreign_keys") or {}
      _check_keys(f"schema.tables.{name}.foreign_keys", fks, set(fks))
      tables[name] = TableSpec(
          name=name,
          file=t.get("file"),
          primary_key=t.get("primary_key"),
          time_column=t.get("time_column"),
          foreign_keys=dict(fks),
          drop_columns=tuple(t.get("drop_columns") or ()),
      )
    _check_keys("schema.target", d["target"], _TARGET_KEYS)
    missing = _TARGET_KEYS - set(d["target"])
    if missing:
      raise SchemaError(f"schema.target: missing field(s) {sorted(missing)}")
    target = TargetSpec(**d["target"])
    split_d = dict(d.get("split") or {"method": "random"})
    _check_keys("schema.split", split_d, _SPLIT_KEYS)
    split = SplitSpec(**split_d)
    schema = cls(tables=tables, target=target, split=split)
    schema._check_structure()
    return schema

  @classmethod
  def from_json(cls, path: str | pathlib.Path) -> "Schema":
    path = pathlib.Path(path)
    try:
      d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise SchemaError(f"{path}: not valid JSON ({e})") from None
    return cls.from_dict(d)

  def to_dict(self) -> dict:
    tables = {}
    for name, t in self.tables.items():
      entry = {
          k: v
          for k, v in (
              ("file", t.file),
              ("primary_key", t.primary_key),
              ("time_column", t.time_column),
          )
          if v is not None
      }
      if t.foreign_keys:
        entry["foreign_keys"] = dict(t.foreign_keys)
      if t.drop_columns:
        entry["drop_columns"] = list(t.drop_columns)
      tables[name] = entry
    split = {k: v for k, v in dataclasses.asdict(self.split).items() if v is not None}
    return {"tables": tables, "target": dataclasses.asdict(self.target), "split": split}

  def to_json(self, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2))

  def _check_structure(self) -> None:
    for name, t in self.tables.items():
      for column, parent in t.foreign_keys.items():
        if parent not in self.tables:
          raise SchemaError(
              f"table {name!r}: foreign key {column!r} references unknown table "
              f"{parent!r}; known tables: {sorted(self.tables)}"
          )
        if self.tables[parent].primary_key is None:
          raise SchemaError(
              f"table {name!r}: foreign key {column!r} references table {parent!r}, "
              f"which has no primary_key; give {parent!r} a primary_key"
          )
      if t.primary_key is not None and t.primary_key in t.drop_columns:
        raise SchemaError(f"table {name!r}: primary key {t.primary_key!r} is also in drop_columns")
    tgt = self.target
    if tgt.table not in self.tables:
      raise SchemaError(f"target: unknown table {tgt.table!r}; known tables: {sorted(self.tables)}")
    if tgt.task not in TASKS:
      raise SchemaError(f"target: task {tgt.task!r} unknown; choose from {TASKS}")
    if tgt.column in self.tables[tgt.table].drop_columns:
      raise SchemaError(f"target: column {tgt.column!r} of table {tgt.table!r} is in drop_columns")
    s = self.split
    if s.method not in SPLIT_METHODS:
      raise SchemaError(f"split: method {s.method!r} unknown; choose from {SPLIT_METHODS}")
    if s.method == "time":
      if self.tables[tgt.table].time_column is None:
        raise SchemaError(f"split: method 'time' needs a time_column on target table {tgt.table!r}")
      if s.valid_start is None or s.test_start is None:
        raise SchemaError("split: method 'time' needs 'valid_start' and 'test_start'")
    else:
      if not (
          0 <= s.valid_fraction < 1
          and 0 <= s.test_fraction < 1
          and s.valid_fraction + s.test_fraction < 1
      ):
        raise SchemaError(
            f"split: valid_fraction={s.valid_fraction}, test_fraction={s.test_fraction}; "
            "each must be in [0, 1) and their sum below 1"
        )
    if s.method == "group" and not s.key:
      raise SchemaError(
          f"split: method 'group' needs 'key', a column of target table {tgt.table!r}"
      )

  # ------------------------------------------------------------------ graph
  @property
  def target_table(self) -> TableSpec:
    return self.tables[self.target.table]

  def children_of(self, table: str) -> list[tuple[str, str]]:
    """``(child table, foreign-key column)`` for every foreign key that references `table`."""
    return [
        (name, col)
        for name, t in self.tables.items()
        for col, parent in t.foreign_keys.items()
        if parent == table
    ]

  def reachable_tables(self, start: str) -> set[str]:
    """Tables linked to `start` by foreign keys in either direction (excluding `start`)."""
    seen, frontier = {start}, [start]
    while frontier:
      name = frontier.pop()
      linked = set(self.tables[name].foreign_keys.values()) | {c for c, _ in self.children_of(name)}
      frontier += sorted(linked - seen)
      seen |= linked
    return seen - {start}

  def feature_columns(self, table: str, df: pd.DataFrame) -> list[str]:
    """Columns of `df` that may become features: not dropped, not the target, not the primary key."""
    spec = self.tables[table]
    banned = set(spec.drop_columns) | {spec.primary_key}
    if table == self.target.table:
      banned.add(self.target.column)
    return [c for c in df.columns if c not in banned]

  # ------------------------------------------------------------------ data checks
  def validate(
      self, tables: Mapping[str, pd.DataFrame], require_target: bool = True
  ) -> ValidationReport:
    """Checks `tables` against the schema (see the module docstring); raises `SchemaError`.

    Args:
      tables: table name -> DataFrame, one per table of the schema (extra tables are ignored).
      require_target: whether the target column must be present and fully labelled.
    Returns:
      `ValidationReport` with row counts, orphan foreign-key counts and warnings (also emitted
      as `SchemaWarning`).
    """
    absent = [n for n in self.tables if n not in tables]
    if absent:
      raise SchemaError(
          f"table(s) {absent} are in the schema but not in the tables given " f"({sorted(tables)})"
      )
    for name, spec in self.tables.items():
      df = tables[name]
      if not isinstance(df, pd.DataFrame):
        raise SchemaError(f"table {name!r}: expected a pandas DataFrame, got {type(df).__name__}")
      roles = [("primary_key", spec.primary_key), ("time_column", spec.time_column)]
      roles += [("foreign key", c) for c in spec.foreign_keys] + [
          ("drop_columns", c) for c in spec.drop_columns
      ]
      if self.split.method == "group" and name == self.target.table:
        roles.append(("split key", self.split.key))
      for role, column in roles:
        if column is not None and column not in df.columns:
          raise SchemaError(
              f"table {name!r}: {role} column {column!r} is missing; "
              f"columns: {list(df.columns)}"
          )
      if spec.primary_key is not None:
        pk = df[spec.primary_key]
        if pk.isna().any():
          raise SchemaError(
              f"table {name!r}: primary key {spec.primary_key!r} has "
              f"{int(pk.isna().sum())} null value(s)"
          )
        dup = pk[pk.duplicated()]
        if len(dup):
          raise SchemaError(
              f"table {name!r}: primary key {spec.primary_key!r} has {len(dup)} "
              f"duplicate value(s), e.g. {dup.astype(str).unique()[:3].tolist()}"
          )
      if spec.time_column is not None:
        times = parse_time(df[spec.time_column], f"table {name!r} column {spec.time_column!r}")
        if name == self.target.table and times.isna().any():
          raise SchemaError(
              f"table {name!r}: time column {spec.time_column!r} has "
              f"{int(times.isna().sum())} null value(s); every target row needs a time"
          )
    self._validate_target(tables[self.target.table], require_target)
    orphans, report_warnings = self._check_foreign_keys(tables, require_target)
    if not self.reachable_tables(self.target.table):
      report_warnings.append(
          f"target table {self.target.table!r} reaches no other table through foreign "
          "keys: learning from that table alone"
      )
    for message in report_warnings:
      warnings.warn(message, SchemaWarning, stacklevel=2)
    return ValidationReport(
        row_counts={n: len(tables[n]) for n in self.tables},
        orphan_foreign_keys=orphans,
        warnings=report_warnings,
    )

  def _check_foreign_keys(
      self, tables: Mapping[str, pd.DataFrame], require_target: bool
  ) -> tuple[dict[str, int], list[str]]:
    """Orphan counts per ``"table.column"`` and warnings; raises when no key of a column matches.

    Keys are matched exactly as the context sets join them (`context_index.parent_match`), so
    int 1, float 1.0 and string "1" are one key here too.
    """
    orphans, messages = {}, []
    for name, spec in self.tables.items():
      for column, parent in spec.foreign_keys.items():
        values = tables[name][column]
        parent_keys = tables[parent][self.tables[parent].primary_key]
        index, has_key = context_index.parent_match(values, parent_keys)
        orphan = has_key & (index < 0)
        n_keys, n_orphans = int(has_key.sum()), int(orphan.sum())
        orphans[f"{name}.{column}"] = n_orphans
        if len(parent_keys) == 0 or 2 * n_orphans <= n_keys:
          continue  # an empty parent table is warned about by the builder
        share = 100 if n_orphans == n_keys else min(100 * n_orphans // n_keys, 99)
        message = (
            f"table {name!r}: {share}% of foreign key {column!r} values ({n_orphans} of "
            f"{n_keys}) match no row of {parent!r}"
        )
        if n_orphans == n_keys and require_target:
          raise SchemaError(
              f"{message}, e.g. {_shown(values[orphan].iloc[0])} vs {parent!r} keys like "
              f"{_shown(parent_keys.iloc[0])}; check that both columns hold the same ids"
          )
        messages.append(message)
    return orphans, messages

  def _validate_target(self, df: pd.DataFrame, require_target: bool) -> None:
    tgt = self.target
    where = f"target: table {tgt.table!r} column {tgt.column!r}"
    if require_target and len(df) == 0:
      raise SchemaError(f"target: table {tgt.table!r} has no rows; training needs labelled rows")
    if tgt.column not in df.columns:
      if require_target:
        raise SchemaError(f"{where} is missing; columns: {list(df.columns)}")
      return
    y = df[tgt.column]
    if require_target and y.isna().any():
      raise SchemaError(
          f"{where} has {int(y.isna().sum())} null label(s); drop unlabelled rows first"
      )
    y = y.dropna()
    n_unique = y.nunique()
    if tgt.task == "regression":
      if pd.api.types.is_bool_dtype(y.dtype) or not pd.api.types.is_numeric_dtype(y.dtype):
        raise SchemaError(f"{where}: task 'regression' needs a numeric column, got dtype {y.dtype}")
      if not np.isfinite(y.to_numpy(dtype=np.float64)).all():
        raise SchemaError(f"{where}: task 'regression' labels contain inf")
    elif tgt.task == "binary" and require_target and n_unique != 2:
      raise SchemaError(
          f"{where}: task 'binary' needs exactly 2 distinct labels, found {n_unique}: "
          f"{y.unique()[:5].tolist()}"
      )
    elif tgt.task == "binary" and n_unique > 2:
      raise SchemaError(f"{where}: task 'binary' but {n_unique} distinct labels")
    elif tgt.task == "multiclass":
      if pd.api.types.is_float_dtype(y.dtype) and not np.all(
          y.to_numpy() == np.round(y.to_numpy())
      ):
        raise SchemaError(
            f"{where}: task 'multiclass' needs integer or string labels, got non-integral floats"
        )
      if require_target and n_unique < 2:
        raise SchemaError(f"{where}: task 'multiclass' needs at least 2 classes, found {n_unique}")
