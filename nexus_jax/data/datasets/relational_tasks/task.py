"""One task of the relational benchmark suite: real related tables, a schema, and its cutoff.

    task = TASKS["lahman_salary"]
    tables, schema = task.load()                 # full task: {name: DataFrame}, schema dict
    tables, schema = task.load(max_entities=200)  # a small slice (quick runs, tests)

A task's `cutoff_column` is a column of its target table holding the cutoff c of each row: every
row of a timed related table that a target row may see (through the context sets, or through the
flat join's aggregates) has time < c. The schema encodes it through the target table's time column
(visible rows have time <= target time, so integer years use time = c - 1); tests check the built
context sets against `cutoff_column` itself, independently of that encoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pandas as pd

Loader = Callable[[int | None, int], tuple[dict[str, pd.DataFrame], dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class RelationalTask:
  """A benchmark task (see the module docstring).

  Attributes:
    name: registry key, e.g. "lahman_salary".
    task: "binary" | "multiclass" | "regression" (as in the schema).
    source: where the tables come from (package and dataset names).
    description: the prediction question in one sentence.
    cutoff: what each target row may see, in words ("" for a task without time).
    why_safe: why the cutoff / drop columns leave no outcome information in the features.
    cutoff_column: target-table column with each row's cutoff (None for a task without time).
    entity_column: target-table column naming the entity the split keeps together.
    loader: `loader(max_entities, seed)` -> (tables, schema dict); `max_entities` keeps a seeded
      random subset of the split entities (all rows of each), None = all.
  """

  name: str
  task: str
  source: str
  description: str
  cutoff: str
  why_safe: str
  cutoff_column: str | None
  entity_column: str
  loader: Loader

  def load(
      self, max_entities: int | None = None, seed: int = 0
  ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """(tables, schema dict) of the task; see `loader`."""
    return self.loader(max_entities, seed)
