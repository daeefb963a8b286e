"""Byte-level LM data shared by the lm and hybrid experiments and the LM benchmarks.

splits, files, train, valid, test, test_bytes, seconds = load_byte_lm_data(config)
xz_bits_per_byte(test_bytes)        # the compression baseline on exactly the scored bytes
"""

from __future__ import annotations

import lzma
import time
from typing import Any

import numpy as np

from nexus_jax.data.datasets import text
from nexus_jax.train.data import ArrayDataset


def xz_bits_per_byte(data: bytes) -> float:
  """8 * len(lzma.compress(data, preset=9 | PRESET_EXTREME)) / len(data)."""
  return 8.0 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


def eval_windows(data: np.ndarray, num_bytes: int, seq_len: int, batch: int) -> ArrayDataset:
  """Consecutive windows of `seq_len + 1` bytes of the first `num_bytes` (0 = all) of `data`."""
  data = data[:num_bytes] if num_bytes else data
  return ArrayDataset({"tokens": text.windows(data, seq_len + 1)}, batch)


def load_byte_lm_data(
    config: Any,
) -> tuple[dict, dict, ArrayDataset, ArrayDataset, ArrayDataset, bytes, float]:
  """The byte-level LM data of `config.data` (shared by the lm and hybrid experiments).

  Returns (splits {name: uint8 bytes}, files {name: paths}, train (random windows of seq_len + 1,
  num_steps * batch_size of them), valid, test (consecutive windows), the test bytes scored, seconds).
  """
  dc, tc = config.data, config.train
  t0 = time.perf_counter()
  splits, files = text.load_text_splits(
      dc.root or None,
      pattern=dc.pattern,
      valid_fraction=dc.valid_fraction,
      test_fraction=dc.test_fraction,
  )
  seq, bs = int(dc.seq_len), int(tc.batch_size)
  train = ArrayDataset(
      {
          "tokens": text.random_windows(
              splits["train"], seq + 1, int(tc.num_steps) * bs, int(config.seed)
          )
      },
      bs,
      seed=int(config.seed),
  )
  valid = eval_windows(splits["valid"], int(dc.valid_bytes), seq, bs)
  test = eval_windows(splits["test"], int(dc.test_bytes), seq, bs)
  scored = test.arrays["tokens"]
  test_bytes = np.concatenate([scored[0], scored[1:, 1:].reshape(-1)]).tobytes()
  return splits, files, train, valid, test, test_bytes, time.perf_counter() - t0
