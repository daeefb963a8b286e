"""common.py: LayerNorm / dense against plain references, hash dropout, input preparation, MASK_VALUE."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tabular_testing import fast_jit
from nexus_jax.models.tabular.common import (
    MASK_VALUE,
    HashDropout,
    dense,
    layer_norm,
    prepare_features,
)


def test_layer_norm_matches_reference_and_nn_layer_norm_params():
  x = jax.random.normal(jax.random.key(0), (4, 6)) * 3 + 1
  norm = layer_norm("norm")
  v = norm.init(jax.random.key(1), x)
  p = nn.unbox(v["params"])
  assert p["scale"].shape == (6,) and v["params"]["scale"].names == ("embed",)
  # Same param tree as nn.LayerNorm (what cross_table's norms used to be).
  ref_tree = jax.tree.map(jnp.shape, nn.LayerNorm().init(jax.random.key(1), x)["params"])
  assert jax.tree.map(jnp.shape, p) == ref_tree
  p = {"scale": jnp.linspace(0.5, 2.0, 6), "bias": jnp.arange(6.0)}
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  ref = (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]
  np.testing.assert_allclose(norm.apply({"params": p}, x), ref, atol=1e-5)
  assert layer_norm("n", jnp.bfloat16).apply({"params": p}, x).dtype == jnp.bfloat16


def test_dense_names_axes_and_bias():
  x = jnp.ones((2, 3))
  v = dense(5, ("embed", "mlp"), "fc").init(jax.random.key(0), x)["params"]
  assert v["kernel"].names == ("embed", "mlp") and v["bias"].names == ("mlp",)
  assert v["kernel"].value.shape == (3, 5) and not np.any(v["bias"].value)
  no_bias = dense(5, ("embed", "mlp"), "fc", use_bias=False).init(jax.random.key(0), x)["params"]
  assert set(no_bias) == {"kernel"}
  zero = dense(4, ("embed", "mlp"), "fc", init=nn.initializers.zeros).init(jax.random.key(0), x)
  assert not np.any(zero["params"]["kernel"].value)


def test_mask_value_gives_masked_keys_exactly_zero_weight():
  logits = jnp.where(jnp.array([True, False, False]), jnp.array([-80.0, 50.0, 3.0]), MASK_VALUE)
  np.testing.assert_array_equal(jax.nn.softmax(logits), [1.0, 0.0, 0.0])
  assert MASK_VALUE == float(jnp.finfo(jnp.float32).min)


def test_hash_dropout_rate_scale_and_keys():
  x = jnp.ones((64, 1000))
  drop = fast_jit(
      lambda key: HashDropout(0.2).apply({}, x, deterministic=False, rngs={"dropout": key})
  )
  a, b, a2 = drop(jax.random.key(1)), drop(jax.random.key(2)), drop(jax.random.key(1))
  kept = np.asarray(a) > 0
  assert abs(kept.mean() - 205 / 256) < 0.01  # keep fraction round(0.8 * 256) / 256
  np.testing.assert_allclose(np.asarray(a)[kept], 256 / 205, rtol=1e-6)  # mean preserved
  assert abs(float(np.mean(a)) - 1.0) < 0.02
  np.testing.assert_array_equal(a, a2)  # a pure function of the rng
  assert 0.6 < np.mean(kept == (np.asarray(b) > 0)) < 0.75  # independent masks agree ~0.8^2 + 0.2^2
  assert (
      abs(np.corrcoef(kept[:, :-1].ravel(), kept[:, 1:].ravel())[0, 1]) < 0.02
  )  # neighbours independent
  np.testing.assert_array_equal(HashDropout(0.2).apply({}, x, deterministic=True), x)


def test_prepare_features_checks_and_cleans():
  x_num = jnp.array([[1.0, jnp.nan], [3.0, 4.0]])
  xn, xc, miss, lead = prepare_features(x_num, None, None, 2, 0)
  assert lead == (2,) and xc.shape == (2, 0) and xc.dtype == jnp.int32
  np.testing.assert_array_equal(xn, [[1.0, 0.0], [3.0, 4.0]])
  np.testing.assert_array_equal(miss, [[False, True], [False, False]])
  _, _, miss2, _ = prepare_features(x_num, None, jnp.array([[True, False], [False, False]]), 2, 0)
  np.testing.assert_array_equal(miss2, [[True, True], [False, False]])
  _, xc3, _, lead3 = prepare_features(None, jnp.ones((2, 3, 1), jnp.int32), None, 0, 1)
  assert lead3 == (2, 3)
  with pytest.raises(ValueError, match=r"x_num \[\.\.\., 3\]"):
    prepare_features(x_num, None, None, 3, 0)
  with pytest.raises(ValueError, match="at least one feature"):
    prepare_features(None, None, None, 0, 0)
