"""Generic dataset: a folder of CSV/Parquet files plus ``schema.json`` (see `nexus_jax.data.schema`).

    my_task/
      schema.json          {"tables": {"orders": {"file": "orders.csv", ...}, ...}, "target": ..., "split": ...}
      orders.csv
      customers.parquet

A table's ``file`` is relative to the folder; without one, ``<table>.csv``, ``.csv.gz``, ``.csv.zip``
or ``.parquet`` is looked up. Parquet needs ``pyarrow`` (or ``fastparquet``) installed.
`save_folder` writes tables + schema in this layout (CSV), e.g. to export a bundled dataset.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

from nexus_jax.data.schema import Schema, SchemaError

SCHEMA_FILE = "schema.json"
_SUFFIXES = (".csv", ".csv.gz", ".csv.zip", ".parquet")


def read_table(path: pathlib.Path, table: str) -> pd.DataFrame:
  """One table file (CSV, TSV or Parquet) as a DataFrame; SchemaError naming `table` otherwise."""
  name = path.name.lower()
  if name.endswith(".parquet") or name.endswith(".pq"):
    try:
      return pd.read_parquet(path)
    except ImportError as e:
      raise ImportError(
          f"table {table!r}: reading {path} needs a Parquet engine: pip install pyarrow ({e})"
      ) from None
  if any(name.endswith(s) for s in (".csv", ".csv.gz", ".csv.zip", ".csv.bz2", ".tsv")):
    return pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
  raise SchemaError(f"table {table!r}: file {path.name!r} is neither CSV nor Parquet")


def table_path(folder: pathlib.Path, table: str, file: str | None) -> pathlib.Path:
  """Where table `table` lives in `folder`; raises SchemaError naming the table if absent."""
  if file is not None:
    path = folder / file
    if not path.exists():
      raise SchemaError(f"table {table!r}: file {file!r} not found in {folder}")
    return path
  for suffix in _SUFFIXES:
    if (folder / f"{table}{suffix}").exists():
      return folder / f"{table}{suffix}"
  raise SchemaError(
      f"table {table!r}: no 'file' in schema.json and none of "
      f"{[table + s for s in _SUFFIXES]} in {folder}"
  )


def sample_target_rows(
    tables: Mapping[str, pd.DataFrame], schema: Schema, max_rows: int | None, seed: int = 0
) -> dict[str, pd.DataFrame]:
  """Keeps a random `max_rows` of the target table (in their original order); others untouched."""
  tables = dict(tables)
  target = schema.target.table
  df = tables[target]
  if max_rows is not None and max_rows < len(df):
    keep = np.sort(np.random.default_rng(seed).choice(len(df), size=max_rows, replace=False))
    tables[target] = df.iloc[keep].reset_index(drop=True)
  return tables


def load_folder(
    path: str | pathlib.Path, max_target_rows: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], Schema]:
  """Reads ``schema.json`` and every table of `path`.

  Args:
    path: the folder.
    max_target_rows: if set, a random subset of that many target rows (quick runs).
    seed: seed of that subset.
  Returns:
    (tables, schema): table name -> DataFrame, validated `Schema`.
  """
  folder = pathlib.Path(path)
  if not (folder / SCHEMA_FILE).exists():
    raise SchemaError(
        f"{folder}: no {SCHEMA_FILE}; a dataset folder holds schema.json and the table files"
    )
  schema = Schema.from_json(folder / SCHEMA_FILE)
  tables = {
      name: read_table(table_path(folder, name, spec.file), name)
      for name, spec in schema.tables.items()
  }
  tables = sample_target_rows(tables, schema, max_target_rows, seed)
  schema.validate(tables, require_target=True)
  return tables, schema


def save_folder(
    tables: Mapping[str, pd.DataFrame], schema: Schema | Mapping, path: str | pathlib.Path
) -> pathlib.Path:
  """Writes every table as ``<table>.csv`` and ``schema.json`` (with those file names) to `path`."""
  schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
  folder = pathlib.Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  d = schema.to_dict()
  for name in schema.tables:
    tables[name].to_csv(folder / f"{name}.csv", index=False)
    d["tables"][name]["file"] = f"{name}.csv"
  Schema.from_dict(d).to_json(folder / SCHEMA_FILE)
  return folder
