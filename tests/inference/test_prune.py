"""Global magnitude pruning: exact amount, one global threshold, what is never pruned, validation."""

import numpy as np
import pytest

from nexus_jax.inference import magnitude_prune, sparsity


def params():
  rng = np.random.default_rng(0)
  return {
      "small": {
          "kernel": 0.01 * rng.normal(size=(20, 10)).astype(np.float32),
          "bias": np.full(10, 1e-6, np.float32),
      },
      "large": {"kernel": rng.normal(size=(20, 10)).astype(np.float32)},
  }


def test_exact_amount_and_global_threshold():
  p = params()
  pruned, report = magnitude_prune(p, 0.4)
  assert report["pruned_weights"] == 160 and report["sparsity"] == pytest.approx(0.4)
  # One threshold for all layers: the small-magnitude layer loses far more than the large one.
  assert report["per_leaf"]["/small/kernel"] > 0.7 and report["per_leaf"]["/large/kernel"] < 0.2
  kept = np.concatenate(
      [np.abs(x[x != 0]).ravel() for x in (pruned["small"]["kernel"], pruned["large"]["kernel"])]
  )
  assert kept.min() >= report["threshold"]
  np.testing.assert_array_equal(
      pruned["small"]["bias"], p["small"]["bias"]
  )  # biases are never pruned
  nonzero = pruned["large"]["kernel"] != 0
  np.testing.assert_array_equal(pruned["large"]["kernel"][nonzero], p["large"]["kernel"][nonzero])
  assert sparsity(pruned) == pytest.approx(0.4)
  assert report["overall_sparsity"] < report["sparsity"]  # biases count in the overall share


def test_amount_zero_and_invalid():
  p = params()
  pruned, report = magnitude_prune(p, 0.0)
  assert report["pruned_weights"] == 0
  np.testing.assert_array_equal(pruned["large"]["kernel"], p["large"]["kernel"])
  with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
    magnitude_prune(p, 1.0)
  with pytest.raises(ValueError, match="no prunable leaves"):
    magnitude_prune({"b": np.ones(3, np.float32)}, 0.5)
