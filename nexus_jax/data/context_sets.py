"""Containers for relational context sets: what `relational.ContextSetBuilder` returns.

`RelationalData` holds, for N target rows:

- the target row's own features: ``numeric f32[N, Fn]``, ``numeric_missing bool[N, Fn]``,
  ``categorical i32[N, Fc]`` (codes as in `TabularPreprocessor`) and their `FeatureInfo`;
- ``labels`` `[N]` (float32 for binary 0/1 and regression, int32 class index for multiclass; None
  when the target column is absent, e.g. at prediction time) and ``split`` `[N]` ("train"/"valid"/"test");
- ``contexts``: name -> `ContextArrays` with ``numeric f32[N, M, Fn_c]``, ``numeric_missing
  bool[N, M, Fn_c]``, ``categorical i32[N, M, Fc_c]``, ``mask bool[N, M]`` (True on real rows, real
  rows first, most recent first for histories), ``ages f32[N, M]`` (target time minus row time,
  hours for datetimes; 0 without times and on padding) and ``row_index i64[N, M]`` (position in the
  related table, -1 on padding). Padding slots hold zeros (code 0). Parents have M = 1.
  When the context has times, the last numeric feature is ``__age__ = sign(a) * log1p(|a|)``.

`RelationalData.arrays()` gives a nested dict of numpy arrays (a JAX pytree) for a model;
`take`/`subset` select rows; `save`/`load` write JSON + ``.npz`` (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from nexus_jax.data.preprocess import FeatureInfo

AGE_FEATURE = "__age__"
ARRAY_FIELDS = ("numeric", "numeric_missing", "categorical", "mask", "ages", "row_index")


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


@dataclasses.dataclass
class ContextArrays:
  """Padded rows of one context for N target rows (see the module docstring for shapes)."""

  spec: ContextSpec
  feature_info: FeatureInfo
  numeric: np.ndarray
  numeric_missing: np.ndarray
  categorical: np.ndarray
  mask: np.ndarray
  ages: np.ndarray
  row_index: np.ndarray

  def take(self, idx: np.ndarray) -> "ContextArrays":
    return dataclasses.replace(self, **{f: getattr(self, f)[idx] for f in ARRAY_FIELDS})

  def arrays(self) -> dict[str, np.ndarray]:
    return {f: getattr(self, f) for f in ARRAY_FIELDS if f != "row_index"}


@dataclasses.dataclass
class RelationalData:
  """Everything a model needs for N target rows (see the module docstring)."""

  target_table: str
  task: str
  feature_info: FeatureInfo
  numeric: np.ndarray
  numeric_missing: np.ndarray
  categorical: np.ndarray
  labels: np.ndarray | None
  classes: tuple | None
  split: np.ndarray
  row_index: np.ndarray
  contexts: dict[str, ContextArrays]

  @property
  def num_rows(self) -> int:
    return len(self.row_index)

  def take(self, idx: np.ndarray) -> "RelationalData":
    """Rows `idx` (int positions or a bool mask `[N]`) of every array."""
    return dataclasses.replace(
        self,
        numeric=self.numeric[idx],
        numeric_missing=self.numeric_missing[idx],
        categorical=self.categorical[idx],
        labels=None if self.labels is None else self.labels[idx],
        split=self.split[idx],
        row_index=self.row_index[idx],
        contexts={k: c.take(idx) for k, c in self.contexts.items()},
    )

  def subset(self, split: str) -> "RelationalData":
    """Rows of one split ("train", "valid" or "test")."""
    return self.take(self.split == split)

  def arrays(self) -> dict:
    """Nested dict (pytree) of numpy arrays: {"target": {...}, "contexts": {name: {...}}, "labels"}."""
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

  def summary(self) -> dict:
    """JSON-able description: rows per split, target features and every context's sizes."""
    splits, counts = np.unique(self.split.astype(str), return_counts=True)
    return {
        "rows": self.num_rows,
        "split_rows": dict(zip(splits.tolist(), counts.tolist())),
        "target_features": {
            "numeric": self.numeric.shape[1],
            "categorical": self.categorical.shape[1],
        },
        "contexts": {
            k: {
                "kind": c.spec.kind,
                "table": c.spec.table,
                "max_rows": c.mask.shape[1],
                "numeric": c.numeric.shape[2],
                "categorical": c.categorical.shape[2],
                "mean_rows": float(c.mask.sum(1).mean()) if self.num_rows else 0.0,
                "rows_with_any": float(c.mask.any(1).mean()) if self.num_rows else 0.0,
                "bytes": int(sum(getattr(c, f).nbytes for f in ARRAY_FIELDS)),
            }
            for k, c in self.contexts.items()
        },
        "total_bytes": int(
            sum(a.nbytes for a in (self.numeric, self.numeric_missing, self.categorical))
            + sum(getattr(c, f).nbytes for c in self.contexts.values() for f in ARRAY_FIELDS)
        ),
    }

  # ------------------------------------------------------------------ persistence
  def save(self, directory: str | pathlib.Path) -> None:
    """Writes ``relational_data.json`` and ``relational_data.npz`` (no pickle)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "target_table": self.target_table,
        "task": self.task,
        "feature_info": _info_to_dict(self.feature_info),
        "classes": None if self.classes is None else list(self.classes),
        "contexts": [
            {"spec": dataclasses.asdict(c.spec), "feature_info": _info_to_dict(c.feature_info)}
            for c in self.contexts.values()
        ],
    }
    arrays = {
        "numeric": self.numeric,
        "numeric_missing": self.numeric_missing,
        "categorical": self.categorical,
        "split": self.split.astype(str),
        "row_index": self.row_index,
    }
    if self.labels is not None:
      arrays["labels"] = self.labels
    for i, c in enumerate(self.contexts.values()):
      arrays |= {f"context{i}/{f}": getattr(c, f) for f in ARRAY_FIELDS}
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
    contexts = {}
    for i, c in enumerate(meta["contexts"]):
      spec = ContextSpec(**c["spec"])
      contexts[spec.name] = ContextArrays(
          spec=spec,
          feature_info=_info_from_dict(c["feature_info"]),
          **{f: a[f"context{i}/{f}"] for f in ARRAY_FIELDS},
      )
    return cls(
        target_table=meta["target_table"],
        task=meta["task"],
        feature_info=_info_from_dict(meta["feature_info"]),
        numeric=a["numeric"],
        numeric_missing=a["numeric_missing"],
        categorical=a["categorical"],
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
