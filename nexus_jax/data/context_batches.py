"""Relational context sets as a lazily gathered pytree: batches are gathered when sliced.

    arrays = lazy_arrays(data)                     # {"target": {...}, "contexts": {...}} of leaves
    ds = ArrayDataset({**arrays, "y": y}, batch_size=512)   # train/data.py, unchanged
    batch = ds.train_batch(step)                   # numpy arrays [B, ...], gathered now

Every leaf is a `GatheredArray`: it has ``len``, ``shape`` and ``dtype`` like the dense array
`RelationalData.arrays()` would hold, and ``leaf[rows]`` (int positions `[B]`, what
`ArrayDataset` and `batch_inference.predict_arrays` do with ``jax.tree.map(lambda a: a[idx], ...)``)
gathers just those rows from the shared feature tables through the int32 row index
(`RelationalData.batch`). Nothing of size N x M x features is ever held: memory is the index and
one feature table per source table. The leaves of one context share one gather per batch (the
index lookup and ages are computed once for all five arrays of a context).

``np.asarray(leaf)`` still works (it materialises every row, as `arrays()` does), so a caller that
needs the dense form gets it; the training and prediction paths never ask for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexus_jax.data.context_sets import ARRAY_FIELDS, RelationalData


class _Gatherer:
  """Gathers one part ("target" or a context name) of `data` for a batch of rows, caching the
  last batch so the leaves of that part sliced with the same rows share one gather."""

  def __init__(self, data: RelationalData, part: str):
    self.data, self.part = data, part
    self._rows, self._out = None, None

  def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    if self._rows is None or rows.shape != self._rows.shape or not np.array_equal(rows, self._rows):
      if self.part == "target":
        out = self.data.target_batch(rows)
      else:
        out = self.data.contexts[self.part].gather(rows)
      self._rows, self._out = rows.copy(), out
    return self._out


class GatheredArray:
  """One leaf `[N, ...]` of the model's pytree, gathered on demand (see the module docstring).

  Args:
    gatherer: the part's shared gather.
    field: which array of the part ("numeric", "mask", ...).
    shape, dtype: of the dense array (N first).
  """

  def __init__(self, gatherer: _Gatherer, field: str, shape: tuple[int, ...], dtype: np.dtype):
    self._gatherer, self.field = gatherer, field
    self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows: Any) -> np.ndarray:
    """Rows `rows` (int positions `[B]`, a bool mask `[N]` or a slice) as a numpy array."""
    if isinstance(rows, slice):
      rows = np.arange(len(self))[rows]
    elif isinstance(rows, (int, np.integer)):
      return self[np.asarray([rows])][0]
    else:
      rows = np.asarray(rows)
      if rows.dtype == bool:
        if rows.shape != (len(self),):
          raise IndexError(f"bool index of shape {rows.shape} for {len(self)} rows")
        rows = np.flatnonzero(rows)
      elif not np.issubdtype(rows.dtype, np.integer):
        raise IndexError(f"rows must be int positions, a bool mask or a slice, got {rows.dtype}")
    return self._gatherer(rows)[self.field]

  def __array__(self, dtype=None, copy=None):
    out = self[np.arange(len(self))]
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return f"GatheredArray({self._gatherer.part}/{self.field}, shape={self.shape}, {self.dtype})"


def lazy_arrays(data: RelationalData) -> dict[str, Any]:
  """The model's pytree of `data` as `GatheredArray` leaves (labels, if any, as a dense "labels").

  Returns:
    {"target": {"numeric", "numeric_missing", "categorical"}, "contexts": {name: {"numeric",
    "numeric_missing", "categorical", "mask", "ages"}}, "labels"?}, the structure and shapes of
    `data.arrays()`.
  """
  n = data.num_rows
  info = data.feature_info
  target = _Gatherer(data, "target")
  out: dict[str, Any] = {
      "target": {
          "numeric": GatheredArray(target, "numeric", (n, info.num_numeric), np.float32),
          "numeric_missing": GatheredArray(target, "numeric_missing", (n, info.num_numeric), bool),
          "categorical": GatheredArray(
              target, "categorical", (n, info.num_categorical), data.own.categorical.dtype
          ),
      },
      "contexts": {},
  }
  for name, ctx in data.contexts.items():
    g, m, f = _Gatherer(data, name), ctx.max_rows, ctx.feature_info
    shapes = {
        "numeric": ((n, m, f.num_numeric), np.float32),
        "numeric_missing": ((n, m, f.num_numeric), bool),
        "categorical": ((n, m, f.num_categorical), ctx.table.categorical.dtype),
        "mask": ((n, m), bool),
        "ages": ((n, m), np.float32),
    }
    out["contexts"][name] = {k: GatheredArray(g, k, *shapes[k]) for k in ARRAY_FIELDS}
  if data.labels is not None:
    out["labels"] = data.labels
  return out
