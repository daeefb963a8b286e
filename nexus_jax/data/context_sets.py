"""Containers for relational context sets: what `relational.ContextSetBuilder` returns.

A context set is kept as an *index*, not as copies: every source table is preprocessed ONCE into a
`FeatureTable` (its rows plus one zero padding row at the end, which index -1 reads), and every
context keeps only which rows of that table each target row sees. Features are gathered per batch
(`RelationalData.batch(rows)`, or lazily by `context_batches.lazy_arrays` inside the input
pipeline), so memory grows with N x M int32 slots rather than N x M x features.

`RelationalData` holds, for N target rows:

- the target table's `FeatureTable` (``own``; the target rows are ``row_index i64[N]`` of it) plus
  the window counts of the target row (``extra_numeric f32[N, K]``, ``extra_missing bool[N, K]``),
  appended after the table's own numeric features; their `FeatureInfo`;
- ``labels`` `[N]` (float32 for binary 0/1 and regression, int32 class index for multiclass; None
  when the target column is absent, e.g. at prediction time) and ``split`` `[N]` ("train"/"valid"/"test");
- ``contexts``: name -> `ContextArrays`: ``row_index i32[N, M]`` (position in the related table,
  -1 on padding; real rows first, most recent first for histories), the related table's
  `FeatureTable` (shared by every context reading that table) and the target rows' times.

Gathered, a context gives ``numeric f32[B, M, Fn_c]``, ``numeric_missing bool[B, M, Fn_c]``,
``categorical i32[B, M, Fc_c]``, ``mask bool[B, M]`` and ``ages f32[B, M]`` (target time minus row
time, hours for datetimes; 0 without times and on padding). Padding slots hold zeros (code 0).
Parents have M = 1. When the context has times, the last numeric feature is
``__age__ = sign(a) * log1p(|a|)``.

`RelationalData.batch(rows)` gathers the model's pytree for some rows; `RelationalData.arrays()`
materialises it for all rows (the dense form, as the builder once stored it: small data, tests).
`take`/`subset` select rows (index only); `save`/`load` write JSON + ``.npz`` (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from nexus_jax.data import context_index as ci
from nexus_jax.data.preprocess import FeatureInfo

AGE_FEATURE = "__age__"
ARRAY_FIELDS = ("numeric", "numeric_missing", "categorical", "mask", "ages")
TABLE_FIELDS = ("numeric", "numeric_missing", "categorical")


@dataclasses.dataclass(frozen=True)
class ContextSpec:
  """One context of the target table.

  Attributes:
    name: e.g. ``"origin->airports"`` (parent) or ``"flights.tailnum=tailnum"`` (rows of `flights`
      whose `tailnum` equals the target row's `tailnum`).
    kind: ``"parent"`` (0 or 1 row through a foreign key) or ``"history"`` (up to M rows).
    table: the related table that fills the context.
    target_column: column of the target table holding the key.
    context_column: column of `table` matched against it.
    strict: `table` is the target table itself: rows strictly before the target time only.
    max_rows: M.
  """

  name: str
  kind: str
  table: str
  target_column: str
  context_column: str
  strict: bool
  max_rows: int


def _info_to_dict(info: FeatureInfo) -> dict:
  return {
      k: [list(x) if isinstance(x, tuple) else x for x in v]
      for k, v in dataclasses.asdict(info).items()
  }


def _info_from_dict(d: dict) -> FeatureInfo:
  return FeatureInfo(
      **{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) for k, v in d.items()}
  )


def _signed_log1p(x: np.ndarray) -> np.ndarray:
  return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureTable:
  """The preprocessed features of one source table: R rows plus a zero padding row at the end.

  Attributes:
    numeric: f32 `[R + 1, Fn]`; numeric_missing: bool `[R + 1, Fn]`; categorical: i32 `[R + 1, Fc]`.
    ticks: the rows' times `[R + 1]` (`context_index.time_ticks`: int64 ns or float64; 0 where
      null and on the padding row), or None when the table has no time column.
    is_datetime: the ticks are datetimes (ages in hours).
  """

  numeric: np.ndarray
  numeric_missing: np.ndarray
  categorical: np.ndarray
  ticks: np.ndarray | None = None
  is_datetime: bool = False

  @property
  def nbytes(self) -> int:
    arrays = [getattr(self, f) for f in TABLE_FIELDS] + [self.ticks]
    return int(sum(a.nbytes for a in arrays if a is not None))


@dataclasses.dataclass(eq=False)
class ContextArrays:
  """One context of N target rows: an int32 row index into a shared `FeatureTable`.

  Attributes:
    spec, feature_info: the context and the layout of its gathered numeric / categorical features
      (the age feature included when the context has times).
    table: the related table's features (shared; never copied by `take`).
    row_index: i32 `[N, M]` rows of `table`, -1 on padding.
    target_ticks: the target rows' times `[N]` (same kind as `table.ticks`), or None.
  """

  spec: ContextSpec
  feature_info: FeatureInfo
  table: FeatureTable
  row_index: np.ndarray
  target_ticks: np.ndarray | None = None

  @property
  def timed(self) -> bool:
    """Whether ages (and the age feature) come from times."""
    return self.target_ticks is not None and self.table.ticks is not None

  def take(self, idx: np.ndarray) -> "ContextArrays":
    t = None if self.target_ticks is None else self.target_ticks[idx]
    return dataclasses.replace(self, row_index=self.row_index[idx], target_ticks=t)

  def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The gathered arrays (module docstring) of target rows `rows` (int positions `[B]`)."""
    index = self.row_index[rows]  # [B, M]
    mask = index >= 0
    table, (b, m) = self.table, index.shape
    n_num = table.numeric.shape[1]
    if self.timed:
      ages = np.where(
          mask,
          ci.ages_between(self.target_ticks[rows][:, None], table.ticks[index], table.is_datetime),
          np.float32(0.0),
      )
      numeric = np.empty((b, m, n_num + 1), np.float32)
      numeric[..., :n_num] = table.numeric[index]
      numeric[..., n_num] = _signed_log1p(ages)
      missing = np.zeros((b, m, n_num + 1), bool)
      missing[..., :n_num] = table.numeric_missing[index]
    else:
      ages = np.zeros((b, m), np.float32)
      numeric, missing = table.numeric[index], table.numeric_missing[index]
    return {
        "numeric": numeric,
        "numeric_missing": missing,
        "categorical": table.categorical[index],
        "mask": mask,
        "ages": ages,
    }

  def arrays(self) -> dict[str, np.ndarray]:
    """The dense arrays of all N rows, computed as the builder once stored them (whole-array
    `np.take` with an int64 index, ages over every row): the reference `gather` must equal."""
    index = self.row_index.astype(np.int64)
    mask = index >= 0
    table = self.table
    if self.timed:
      r_ticks = table.ticks
      ages = np.where(
          mask, ci.ages_between(self.target_ticks[:, None], r_ticks[index], table.is_datetime), 0.0
      ).astype(np.float32)
    else:
      ages = np.zeros(index.shape, np.float32)
    numeric = np.take(table.numeric, index, axis=0)
    missing = np.take(table.numeric_missing, index, axis=0)
    if self.timed:
      numeric = np.concatenate([numeric, _signed_log1p(ages)[..., None]], axis=-1)
      missing = np.concatenate([missing, np.zeros(ages.shape + (1,), bool)], axis=-1)
    return {
        "numeric": numeric,
        "numeric_missing": missing,
        "categorical": np.take(table.categorical, index, axis=0),
        "mask": mask,
        "ages": ages,
    }

  # Dense views of all N rows (materialised on every access: for small data and tests).
  numeric = property(lambda self: self.arrays()["numeric"])
  numeric_missing = property(lambda self: self.arrays()["numeric_missing"])
  categorical = property(lambda self: self.arrays()["categorical"])
  ages = property(lambda self: self.arrays()["ages"])
  mask = property(lambda self: self.row_index >= 0)

  @property
  def max_rows(self) -> int:
    return int(self.row_index.shape[1])


@dataclasses.dataclass(eq=False)
class RelationalData:
  """Everything a model needs for N target rows (see the module docstring)."""

  target_table: str
  task: str
  feature_info: FeatureInfo
  own: FeatureTable
  extra_numeric: np.ndarray
  extra_missing: np.ndarray
  labels: np.ndarray | None
  classes: tuple | None
  split: np.ndarray
  row_index: np.ndarray
  contexts: dict[str, ContextArrays]

  @property
  def num_rows(self) -> int:
    return len(self.row_index)

  def take(self, idx: np.ndarray) -> "RelationalData":
    """Rows `idx` (int positions or a bool mask `[N]`): per-row indexes only, tables shared."""
    return dataclasses.replace(
        self,
        extra_numeric=self.extra_numeric[idx],
        extra_missing=self.extra_missing[idx],
        labels=None if self.labels is None else self.labels[idx],
        split=self.split[idx],
        row_index=self.row_index[idx],
        contexts={k: c.take(idx) for k, c in self.contexts.items()},
    )

  def subset(self, split: str) -> "RelationalData":
    """Rows of one split ("train", "valid" or "test")."""
    return self.take(self.split == split)

  def target_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The target rows' own features for positions `rows` `[B]`: numeric f32[B, Fn + K] (the
    table's features, then the window counts), numeric_missing, categorical."""
    r = self.row_index[rows]
    own, k = self.own, self.extra_numeric.shape[1]
    n_own = own.numeric.shape[1]
    numeric = np.empty((len(r), n_own + k), own.numeric.dtype)
    numeric[:, :n_own], numeric[:, n_own:] = own.numeric[r], self.extra_numeric[rows]
    missing = np.empty((len(r), n_own + k), bool)
    missing[:, :n_own], missing[:, n_own:] = own.numeric_missing[r], self.extra_missing[rows]
    return {"numeric": numeric, "numeric_missing": missing, "categorical": own.categorical[r]}

  def batch(self, rows: np.ndarray) -> dict:
    """The model's pytree for target rows `rows` (int positions `[B]`), gathered now:
    {"target": {...}, "contexts": {name: {...}}, "labels"?}; equals `arrays()` at `rows`."""
    rows = np.asarray(rows)
    out = {
        "target": self.target_batch(rows),
        "contexts": {k: c.gather(rows) for k, c in self.contexts.items()},
    }
    if self.labels is not None:
      out["labels"] = self.labels[rows]
    return out

  # Dense target features of all N rows (as the builder once stored them).
  numeric = property(
      lambda self: np.concatenate(
          [np.take(self.own.numeric, self.row_index, axis=0), self.extra_numeric], axis=1
      )
  )
  numeric_missing = property(
      lambda self: np.concatenate(
          [np.take(self.own.numeric_missing, self.row_index, axis=0), self.extra_missing], axis=1
      )
  )
  categorical = property(lambda self: np.take(self.own.categorical, self.row_index, axis=0))

  def arrays(self) -> dict:
    """The dense pytree of all N rows (materialised; memory N x M x features per context):
    {"target": {...}, "contexts": {name: {...}}, "labels"}. Prefer `batch` / `lazy_arrays`."""
    out = {
        "target": {
            "numeric": self.numeric,
            "numeric_missing": self.numeric_missing,
            "categorical": self.categorical,
        },
        "contexts": {k: c.arrays() for k, c in self.contexts.items()},
    }
    if self.labels is not None:
      out["labels"] = self.labels
    return out

  def _tables(self) -> dict[int, FeatureTable]:
    tables = {id(self.own): self.own}
    tables.update({id(c.table): c.table for c in self.contexts.values()})
    return tables

  def summary(self) -> dict:
    """JSON-able description: rows per split, target features, every context's sizes and bytes
    held (row indexes, feature tables once each, per-row arrays)."""
    splits, counts = np.unique(self.split.astype(str), return_counts=True)
    index_bytes = sum(c.row_index.nbytes for c in self.contexts.values())
    table_bytes = sum(t.nbytes for t in self._tables().values())
    row_bytes = sum(
        a.nbytes for a in (self.extra_numeric, self.extra_missing, self.row_index, self.split)
    ) + sum(c.target_ticks.nbytes for c in self.contexts.values() if c.target_ticks is not None)
    return {
        "rows": self.num_rows,
        "split_rows": dict(zip(splits.tolist(), counts.tolist())),
        "target_features": {
            "numeric": self.feature_info.num_numeric,
            "categorical": self.feature_info.num_categorical,
        },
        "contexts": {
            k: {
                "kind": c.spec.kind,
                "table": c.spec.table,
                "max_rows": c.max_rows,
                "numeric": c.feature_info.num_numeric,
                "categorical": c.feature_info.num_categorical,
                "mean_rows": float(c.mask.sum(1).mean()) if self.num_rows else 0.0,
                "rows_with_any": float(c.mask.any(1).mean()) if self.num_rows else 0.0,
                "index_bytes": int(c.row_index.nbytes),
                # what the dense per-row copies of `arrays()` would take
                "dense_bytes": int(
                    self.num_rows
                    * c.max_rows
                    * (5 * c.feature_info.num_numeric + 4 * c.feature_info.num_categorical + 5)
                ),
            }
            for k, c in self.contexts.items()
        },
        "index_bytes": int(index_bytes),
        "feature_table_bytes": int(table_bytes),
        "total_bytes": int(index_bytes + table_bytes + row_bytes),
    }

  # ------------------------------------------------------------------ persistence
  def save(self, directory: str | pathlib.Path) -> None:
    """Writes ``relational_data.json`` and ``relational_data.npz`` (no pickle): each feature
    table once, the row indexes and the per-row arrays."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tables = self._tables()
    slot = {key: i for i, key in enumerate(tables)}
    meta = {
        "target_table": self.target_table,
        "task": self.task,
        "feature_info": _info_to_dict(self.feature_info),
        "classes": None if self.classes is None else list(self.classes),
        "tables": [
            {"has_ticks": t.ticks is not None, "is_datetime": bool(t.is_datetime)}
            for t in tables.values()
        ],
        "own_table": slot[id(self.own)],
        "contexts": [
            {
                "spec": dataclasses.asdict(c.spec),
                "feature_info": _info_to_dict(c.feature_info),
                "table": slot[id(c.table)],
                "has_target_ticks": c.target_ticks is not None,
            }
            for c in self.contexts.values()
        ],
    }
    arrays = {
        "extra_numeric": self.extra_numeric,
        "extra_missing": self.extra_missing,
        "split": self.split.astype(str),
        "row_index": self.row_index,
    }
    if self.labels is not None:
      arrays["labels"] = self.labels
    for i, t in enumerate(tables.values()):
      arrays |= {f"table{i}/{f}": getattr(t, f) for f in TABLE_FIELDS}
      if t.ticks is not None:
        arrays[f"table{i}/ticks"] = t.ticks
    for i, c in enumerate(self.contexts.values()):
      arrays[f"context{i}/row_index"] = c.row_index
      if c.target_ticks is not None:
        arrays[f"context{i}/target_ticks"] = c.target_ticks
    (directory / "relational_data.json").write_text(
        json.dumps(meta, indent=1, default=_json_default)
    )
    np.savez(directory / "relational_data.npz", **arrays)

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> "RelationalData":
    directory = pathlib.Path(directory)
    meta = json.loads((directory / "relational_data.json").read_text())
    with np.load(directory / "relational_data.npz", allow_pickle=False) as z:
      a = {k: z[k] for k in z.files}
    tables = [
        FeatureTable(
            *(a[f"table{i}/{f}"] for f in TABLE_FIELDS),
            ticks=a[f"table{i}/ticks"] if t["has_ticks"] else None,
            is_datetime=t["is_datetime"],
        )
        for i, t in enumerate(meta["tables"])
    ]
    contexts = {}
    for i, c in enumerate(meta["contexts"]):
      spec = ContextSpec(**c["spec"])
      contexts[spec.name] = ContextArrays(
          spec=spec,
          feature_info=_info_from_dict(c["feature_info"]),
          table=tables[c["table"]],
          row_index=a[f"context{i}/row_index"],
          target_ticks=a[f"context{i}/target_ticks"] if c["has_target_ticks"] else None,
      )
    return cls(
        target_table=meta["target_table"],
        task=meta["task"],
        feature_info=_info_from_dict(meta["feature_info"]),
        own=tables[meta["own_table"]],
        extra_numeric=a["extra_numeric"],
        extra_missing=a["extra_missing"],
        labels=a.get("labels"),
        classes=None if meta["classes"] is None else tuple(meta["classes"]),
        split=a["split"].astype(object),
        row_index=a["row_index"],
        contexts=contexts,
    )


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")
