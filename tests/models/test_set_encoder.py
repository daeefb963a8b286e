"""Set encoder ("standard"): masking, permutation invariance, recency, empty contexts, fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tabular_testing import CARDS, fast_jit, fit, init_variables, synthetic_rows
from nexus_jax.models.tabular.set_encoder import SetEncoder, StandardEncoder, recency_features

B, M, D = 4, 6, 5


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  rows = jnp.asarray(rng.normal(size=(B, M, D)), jnp.float32)
  mask = jnp.asarray(
      [[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], bool
  )
  ages = jnp.asarray(rng.uniform(0, 48, size=(B, M)), jnp.float32)
  return rows, mask, ages


@pytest.fixture(scope="module")
def set_encoder():
  """(variables, jitted apply(rows, mask, ages)) of a small SetEncoder."""
  model = SetEncoder(d_model=16, d_out=8, n_blocks=2, n_heads=2)
  rows, mask, ages = _inputs()
  v = init_variables(model, rows, mask, ages)
  return v, fast_jit(lambda rows, mask, ages=None: model.apply(v, rows, mask, ages))


def test_shapes_and_aux(set_encoder):
  _, apply = set_encoder
  rows, mask, ages = _inputs()
  pooled, aux = apply(rows, mask, ages)
  assert (
      pooled.shape == (B, 8) and aux["rows"].shape == (B, M, 8) and aux["attention"].shape == (B, M)
  )
  np.testing.assert_array_equal(aux["empty"], [False, True, False, False])
  np.testing.assert_array_equal(np.asarray(aux["rows"])[~np.asarray(mask)], 0.0)
  np.testing.assert_array_equal(np.asarray(aux["attention"])[~np.asarray(mask)], 0.0)
  assert recency_features(ages, 8).shape == (B, M, 17)


def test_masked_rows_are_ignored(set_encoder):
  _, apply = set_encoder
  rows, mask, ages = _inputs()
  pooled, aux = apply(rows, mask, ages)
  junk = jnp.where(mask[..., None], rows, jnp.nan)  # masked rows may hold anything, NaN included
  pooled2, aux2 = apply(junk, mask, jnp.where(mask, ages, 1e9))
  np.testing.assert_allclose(pooled2, pooled, atol=1e-5)
  np.testing.assert_allclose(aux2["rows"], aux["rows"], atol=1e-5)


def test_empty_context_is_finite_and_learned(set_encoder):
  _, apply = set_encoder
  rows, mask, ages = _inputs()
  none = jnp.zeros_like(mask)
  pooled, _ = apply(rows, none, ages)
  pooled_other, _ = apply(rows * 3 + 1, none, ages + 5)
  assert np.isfinite(np.asarray(pooled)).all()
  np.testing.assert_allclose(
      pooled, jnp.broadcast_to(pooled[:1], pooled.shape), atol=1e-6
  )  # same for all
  np.testing.assert_allclose(pooled_other, pooled, atol=1e-6)
  assert np.abs(np.asarray(pooled)).max() > 0  # a learned representation, not silently zero


def test_permutation_invariance_and_recency(set_encoder):
  _, apply = set_encoder
  rows, mask, ages = _inputs()
  perm = np.array([3, 0, 5, 1, 4, 2])
  pooled, aux = apply(rows, mask)  # no ages: a set
  pooled_p, aux_p = apply(rows[:, perm], mask[:, perm])
  np.testing.assert_allclose(pooled_p, pooled, atol=1e-5)
  np.testing.assert_allclose(aux_p["rows"], aux["rows"][:, perm], atol=1e-5)
  with_age, _ = apply(rows, mask, ages)  # ages travel with their rows: still invariant
  with_age_p, _ = apply(rows[:, perm], mask[:, perm], ages[:, perm])
  np.testing.assert_allclose(with_age_p, with_age, atol=1e-5)
  older, _ = apply(rows, mask, ages + 100.0)  # but the ages themselves matter
  assert not np.allclose(older[0], with_age[0], atol=1e-4)


def test_gradients_finite_with_nan_padding(set_encoder):
  v, _ = set_encoder
  model = SetEncoder(d_model=16, d_out=8, n_blocks=2, n_heads=2)
  rows, mask, ages = _inputs()
  junk = jnp.where(mask[..., None], rows, jnp.nan)
  grads = fast_jit(
      jax.grad(lambda p: jnp.sum(model.apply({"params": p}, junk, mask, ages)[0] ** 2))
  )(v["params"])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_standard_encoder_on_tables():
  x_num, x_cat, _ = synthetic_rows(12)
  model = StandardEncoder(
      num_numeric=3, cat_cardinalities=CARDS, d_out=8, d_token=4, d_model=16, n_blocks=1, n_heads=2
  )
  assert StandardEncoder.pools_rows
  v = init_variables(model, x_num.reshape(3, 4, 3), x_cat.reshape(3, 4, 2))
  apply = fast_jit(lambda xn, xc, mask, ages: model.apply(v, xn, xc, None, mask, ages))
  mask = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  pooled, aux = apply(x_num.reshape(3, 4, 3), x_cat.reshape(3, 4, 2), mask, jnp.ones((3, 4)))
  assert pooled.shape == (3, 8) and aux["rows"].shape == (3, 4, 8)
  junk_num = x_num.reshape(3, 4, 3).at[0, 2:].set(jnp.nan)
  junk_cat = x_cat.reshape(3, 4, 2).at[1].set(99)
  pooled2, _ = apply(junk_num, junk_cat, mask, jnp.ones((3, 4)))
  np.testing.assert_allclose(pooled2, pooled, atol=1e-5)
  single, _ = fast_jit(
      lambda: model.apply(v, x_num[:3], x_cat[:3])
  )()  # [batch, F]: one row per example
  as_set, _ = apply(x_num[:3, None], x_cat[:3, None], jnp.ones((3, 1), bool), None)
  np.testing.assert_allclose(single, as_set, atol=1e-5)


def test_set_encoder_fits_recency_weighted_sum():
  """y = sum over valid rows of x0 * exp(-age / 10): needs masking, pooling and the ages."""
  rng = np.random.default_rng(0)
  n, m = 256, 6
  rows = rng.normal(size=(n, m, 2)).astype(np.float32)
  mask = rng.random((n, m)) < 0.6
  ages = rng.uniform(0, 30, size=(n, m)).astype(np.float32)
  y = np.sum(np.where(mask, rows[..., 0] * np.exp(-ages / 10), 0.0), axis=1)
  y = jnp.asarray((y - y.mean()) / y.std(), jnp.float32)
  model = SetEncoder(
      d_model=16, d_out=8, n_blocks=1, n_heads=2, attention_dropout=0.0, ffn_dropout=0.0
  )
  first, last = fit(
      model, (jnp.asarray(rows), jnp.asarray(mask), jnp.asarray(ages)), y, steps=200, lr=3e-3
  )
  assert last < 0.5 * first and last < 0.5, (first, last)
