"""Predict from a saved artifact on a folder of tables; writes one CSV row per predicted target row.

    python -m nexus_jax.nexusflow.predict_cli --artifact runs/x/artifact --data new_tables/ --output preds.csv
    python -m nexus_jax.nexusflow.predict_cli ... --predict-from 2013-12-01T05:00Z   # earlier rows = history only
    python -m nexus_jax.nexusflow.predict_cli ... --overwrite      # replace an existing --output file

`--data` holds one file per table of the schema (``<table>.csv``, ``.csv.gz``, ``.csv.zip`` or
``.parquet``, or the schema's ``file`` name). Rows of the target table whose time is before
`--predict-from` only serve as history (e.g. a plane's previous flights); all others are predicted.
The output has the target table's primary key (if any), ``prediction`` and, for classifiers, one
``proba_<class>`` column per class.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np
import pandas as pd

from nexus_jax.data.datasets.folder import read_table, table_path
from nexus_jax.data.schema import SchemaError, parse_cutoff, parse_time
from nexus_jax.nexusflow.artifact import ArtifactError, load_artifact


def read_tables(folder: str | pathlib.Path, schema) -> dict[str, pd.DataFrame]:
  """Every table of `schema` from `folder` (by the schema's file name, else by table name)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise SchemaError(f"--data {folder}: not a folder")
  tables = {}
  for name, spec in schema.tables.items():
    file = spec.file if spec.file and (folder / spec.file).exists() else None
    tables[name] = read_table(table_path(folder, name, file), name)
  return tables


def predict_folder(
    artifact: str | pathlib.Path, data: str | pathlib.Path, predict_from: str | None = None
) -> pd.DataFrame:
  """Predictions as a DataFrame (see the module docstring for the columns)."""
  predictor = load_artifact(artifact)
  return predict_tables(predictor, read_tables(data, predictor.schema), predict_from)


def predict_tables(
    predictor, tables: dict[str, pd.DataFrame], predict_from: str | None = None
) -> pd.DataFrame:
  """`predict_folder` on tables already read (the server's JSON rows, a notebook's DataFrames)."""
  schema = predictor.schema
  tables = dict(tables)
  target = schema.target.table
  if target not in tables:
    raise SchemaError(
        f"table {target!r} (the target table) is missing; it holds the rows to predict"
    )
  rows, history = tables[target], None
  if predict_from:
    column = schema.target_table.time_column
    if column is None:
      raise SchemaError(f"--predict-from needs a time column on table {target!r}; it has none")
    if column not in rows.columns:
      raise SchemaError(f"table {target!r}: column {column!r} (its time column) is missing")
    where = f"table {target!r} column {column!r}"
    times = parse_time(rows[column], where)
    early = (times < parse_cutoff(predict_from, times, where)).to_numpy()
    history, rows = rows[early].reset_index(drop=True), rows[~early].reset_index(drop=True)
  tables[target] = rows
  out = pd.DataFrame(index=range(len(rows)))
  pk = schema.target_table.primary_key
  if pk is not None and pk in rows.columns:
    out[pk] = rows[pk].to_numpy()
  if predictor.task == "regression":
    out["prediction"] = predictor.predict(tables, history)
  else:
    proba = predictor.predict_proba(tables, history)
    classes = list(predictor.classes)
    out["prediction"] = np.asarray(classes, dtype=object)[proba.argmax(1)]
    for j, c in enumerate(classes):
      out[f"proba_{c}"] = proba[:, j]
  return out


def check_output(output: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
  """The --output file, checked before any work: its folder exists and is writable, it is not a
  folder, and an existing file is replaced only with --overwrite. Raises SchemaError."""
  path = pathlib.Path(output)
  if path.is_dir():
    raise SchemaError(f"--output {path} is a folder; give a CSV file name")
  if path.exists() and not overwrite:
    raise SchemaError(f"--output {path} already exists; pass --overwrite to replace it")
  folder = path.parent if str(path.parent) else pathlib.Path(".")
  if not folder.is_dir():
    raise SchemaError(f"--output {path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise SchemaError(f"--output {path}: folder {folder} is not writable")
  return path


def write_csv(frame: pd.DataFrame, path: pathlib.Path) -> None:
  """Writes beside `path`, then renames: a failed write never leaves half a file."""
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
  os.close(fd)
  try:
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of this command (shared with `nexusflow predict`)."""
  parser.add_argument(
      "--artifact",
      "--model",
      dest="artifact",
      required=True,
      help="folder written by save_artifact / estimator.save (--model is the same flag)",
  )
  parser.add_argument("--data", required=True, help="folder with one file per table")
  parser.add_argument("--output", required=True, help="CSV file to write")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
  parser.add_argument(
      "--predict-from", default=None, help="target-table rows before this time are history only"
  )


def run(args: argparse.Namespace) -> int:
  """Predicts and writes --output; raises ArtifactError / SchemaError naming the problem."""
  output = check_output(args.output, args.overwrite)
  out = predict_folder(args.artifact, args.data, args.predict_from)
  write_csv(out, output)
  print(f"wrote {len(out)} predictions to {output}")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog="example: python -m nexus_jax.nexusflow.predict_cli --artifact runs/x/artifact "
      "--data new_tables/ --output preds.csv",
  )
  add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    return run(args)
  except (ArtifactError, SchemaError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
