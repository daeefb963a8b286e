"""Deterministic batching of in-memory arrays.

`ArrayDataset` holds a pytree of numpy arrays that share their leading (example) dimension. The
training batch for step `s` depends only on (seed, s): epoch `s // steps_per_epoch` uses its own
permutation. A run resumed at step `s` therefore sees exactly the batches an uninterrupted run
would have seen. Evaluation batches are padded to the fixed batch size (static shapes under jit)
and carry a `weight` array that is 1 for real rows and 0 for padding.

Across processes (`train/distributed.py`) each process asks only for its own `rows` of every
global batch: the global batch is the same for any number of processes, and only those rows are
gathered (leaves are sliced with `leaf[idx]`, so lazily gathered leaves build just them).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np


def num_examples(arrays: Any) -> int:
  sizes = {len(a) for a in jax.tree.leaves(arrays)}
  if len(sizes) != 1:
    raise ValueError(
        f"all arrays of a dataset must share their first dimension, got sizes {sorted(sizes)}."
    )
  return sizes.pop()


class ArrayDataset:
  """Shuffled fixed-size training batches and padded evaluation batches.

  Args:
    arrays: pytree (usually a dict) of arrays `[N, ...]`.
    batch_size: rows per batch.
    seed: shuffling seed.
  """

  def __init__(self, arrays: Any, batch_size: int, seed: int = 0):
    self.arrays = arrays
    self.size = num_examples(arrays)
    if self.size == 0:
      raise ValueError("the dataset is empty: no rows to train or evaluate on.")
    self.batch_size = int(batch_size)
    if self.batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.seed = int(seed)
    self._perm_epoch, self._perm = -1, None

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per epoch (at least 1: a tiny dataset repeats rows within its batch)."""
    return max(self.size // self.batch_size, 1)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      perm = rng.permutation(self.size)
      if self.size < self.batch_size:
        perm = np.resize(perm, self.batch_size)
      self._perm_epoch, self._perm = epoch, perm
    return self._perm

  def _rows(self, rows: slice | None) -> slice:
    """`rows` checked to be one block of a batch's rows (None: all of them)."""
    if rows is None:
      return slice(0, self.batch_size)
    start, stop = rows.start or 0, self.batch_size if rows.stop is None else rows.stop
    if rows.step not in (None, 1) or not 0 <= start < stop <= self.batch_size:
      raise ValueError(f"rows={rows} is not a block of the {self.batch_size} rows of a batch.")
    return slice(start, stop)

  def train_batch(self, step: int, rows: slice | None = None) -> Any:
    """The batch for global step `step` (with `weight` = 1 for every row).

    `rows` (default: all `batch_size`): only those rows of that batch (one process's share).
    """
    rows = self._rows(rows)
    epoch, offset = divmod(int(step), self.steps_per_epoch)
    idx = self._permutation(epoch)[offset * self.batch_size : (offset + 1) * self.batch_size]
    idx = idx[rows]
    batch = jax.tree.map(lambda a: a[idx], self.arrays)
    batch["weight"] = np.ones(len(idx), np.float32)
    return batch

  def eval_batches(self, rows: slice | None = None) -> Iterator[Any]:
    """All rows in order, in batches padded to `batch_size` (padding rows have weight 0).

    `rows` (default: all): only those rows of every padded batch (one process's share).
    """
    rows = self._rows(rows)
    for start in range(0, self.size, self.batch_size):
      idx = np.arange(start, min(start + self.batch_size, self.size))
      real = len(idx)
      idx = np.pad(idx, (0, self.batch_size - real), mode="edge")[rows]
      batch = jax.tree.map(lambda a: a[idx], self.arrays)
      batch["weight"] = (np.arange(self.batch_size)[rows] < real).astype(np.float32)
      yield batch
