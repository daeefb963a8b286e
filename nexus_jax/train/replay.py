"""A fixed-capacity reservoir replay buffer (numpy) that mixes stored examples into batches.

    buffer = ReservoirBuffer(capacity=250, seed=0)
    buffer.add({"x": x_task, "label": y_task})          # a stream of examples, any number at a time
    batch = buffer.mix(batch, 32, rng)                  # the batch + 32 stored rows (when non-empty)

Reservoir sampling (Vitter's Algorithm R): the first `capacity` examples fill the buffer; the n-th
example after that (n > capacity, counting from 1) replaces a uniformly chosen slot with
probability capacity / n. After any stream of N >= capacity examples, every one of them is in the
buffer with probability capacity / N, whatever the order or the way the stream was chunked.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from nexus_jax.train.data import num_examples


class ReservoirBuffer:
  """Uniform reservoir over every example ever `add`ed.

  Args:
    capacity: the number of stored examples (>= 1).
    seed: seed of the replacement decisions.

  Attributes:
    size: examples stored now (min(capacity, num_seen)).
    num_seen: examples offered so far.
    storage: pytree of arrays `[capacity, ...]` (None before the first `add`); rows >= `size`
      are unused.
  """

  def __init__(self, capacity: int, seed: int = 0):
    if int(capacity) != capacity or capacity < 1:
      raise ValueError(f"capacity={capacity} must be an integer >= 1 (examples stored).")
    self.capacity = int(capacity)
    self.rng = np.random.default_rng(seed)
    self.num_seen = 0
    self.size = 0
    self.storage: Any = None

  def add(self, examples: Any) -> None:
    """Offers the rows of `examples` (pytree of arrays `[n, ...]`, the same structure each call)."""
    n = num_examples(examples)
    examples = jax.tree.map(np.asarray, examples)
    if self.storage is None:
      self.storage = jax.tree.map(
          lambda a: np.zeros((self.capacity, *a.shape[1:]), a.dtype), examples
      )
    # Example k of this call is number seen + k + 1 of the stream; it goes to slot j ~ U{0..that-1}
    # and is kept when j < capacity (always, while the buffer is filling).
    counts = self.num_seen + np.arange(1, n + 1)
    slots = np.floor(self.rng.random(n) * counts).astype(np.int64)
    fill = counts <= self.capacity
    slots[fill] = counts[fill] - 1
    keep = slots < self.capacity
    # Later examples overwrite earlier ones in the same slot: keep each slot's last writer.
    rows, targets = np.nonzero(keep)[0], slots[keep]
    last = {}
    for row, slot in zip(rows.tolist(), targets.tolist()):
      last[slot] = row
    if last:
      dst = np.fromiter(last.keys(), np.int64, len(last))
      src = np.fromiter(last.values(), np.int64, len(last))

      def write(store, a):
        store[dst] = a[src]
        return store

      self.storage = jax.tree.map(write, self.storage, examples)
    self.num_seen += n
    self.size = min(self.capacity, self.num_seen)

  def contents(self) -> Any:
    """The stored rows: pytree of arrays `[size, ...]` (copies)."""
    if self.storage is None:
      raise ValueError("the replay buffer is empty: `add` examples first.")
    return jax.tree.map(lambda a: a[: self.size].copy(), self.storage)

  def sample(self, n: int, rng: np.random.Generator) -> Any:
    """`n` stored rows, uniformly (without replacement when n <= size)."""
    if self.size == 0:
      raise ValueError("the replay buffer is empty: `add` examples first.")
    idx = rng.choice(self.size, int(n), replace=int(n) > self.size)
    return jax.tree.map(lambda a: a[idx], self.storage)

  def mix(self, batch: Any, n: int, rng: np.random.Generator) -> Any:
    """`batch` with `n` sampled stored rows appended (`batch` unchanged while empty or n == 0).

    Keys of `batch` the buffer lacks (e.g. `weight`) get 1 for the replayed rows.
    """
    if self.size == 0 or n <= 0:
      return batch
    replay = self.sample(n, rng)
    out = {}
    for key, value in batch.items():
      extra = replay[key] if key in replay else np.ones((n, *np.shape(value)[1:]), value.dtype)
      out[key] = np.concatenate([np.asarray(value), extra])
    return out


__all__ = ["ReservoirBuffer"]
