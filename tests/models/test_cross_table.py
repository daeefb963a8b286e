"""cross_table.py: the cross-table block is the shared pre-norm block (checked against a plain reference),
masked keys and MASK_VALUE, ContextPooling's masks and ages, the refiner's one shared block."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tabular_testing import fast_jit, randomize, reference_transformer_block
from nexus_jax.models.tabular import common, cross_table, token_attention
from nexus_jax.models.tabular.cross_table import ContextPooling, CrossTableRefiner, cross_table_block

MASK = jnp.array(
    [[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool
)  # the target token (0) is present


def test_block_matches_plain_reference_and_ignores_masked_tokens():
  x = jax.random.normal(jax.random.key(0), (3, 4, 8))
  block = cross_table_block(n_heads=2, d_ffn=12, attention_dropout=0.3, dropout=0.2)
  params = randomize(nn.unbox(block.init(jax.random.key(1), x, MASK))["params"])
  apply = fast_jit(lambda x: block.apply({"params": params}, x, MASK))
  out, probs = apply(x)
  assert out.shape == (3, 4, 8) and probs.shape == (3, 2, 4, 4) and probs.dtype == jnp.float32
  ref_out, ref_probs = reference_transformer_block(params, x, MASK, n_heads=2)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
  masked_keys = np.broadcast_to(~np.asarray(MASK)[:, None, None, :], probs.shape)
  assert np.all(np.asarray(probs)[masked_keys] == 0)
  out2, probs2 = apply(jnp.where(MASK[..., None], x, -50.0))  # other values in the masked tokens
  np.testing.assert_allclose(np.asarray(out2)[MASK], np.asarray(out)[MASK], atol=1e-5)
  np.testing.assert_allclose(probs2[:, :, 0], probs[:, :, 0], atol=1e-6)


def test_block_dropout_is_random_in_training_only():
  x = jax.random.normal(jax.random.key(0), (3, 4, 8))
  block = cross_table_block(n_heads=2, d_ffn=12, attention_dropout=0.3, dropout=0.5)
  v = block.init(jax.random.key(1), x, MASK)
  train = fast_jit(lambda k: block.apply(v, x, MASK, deterministic=False, rngs={"dropout": k})[0])
  assert not np.allclose(train(jax.random.key(2)), train(jax.random.key(3)))
  np.testing.assert_array_equal(train(jax.random.key(2)), train(jax.random.key(2)))


def test_one_mask_value_everywhere():
  assert cross_table.MASK_VALUE is common.MASK_VALUE is token_attention.MASK_VALUE
  # ContextPooling: all rows but one masked -> the pooled weights are exactly 1 on that row.
  rng = np.random.default_rng(0)
  pool = ContextPooling(8, n_heads=2)
  rows_ = rng.normal(size=(2, 5, 8)).astype(np.float32) * 30
  mask = np.zeros((2, 5), bool)
  mask[0, 3] = mask[1, 0] = True
  ages = rng.random((2, 5)).astype(np.float32)
  query = rng.normal(size=(2, 8)).astype(np.float32) * 30
  v = nn.unbox(fast_jit(lambda *a: pool.init(jax.random.key(0), *a))(rows_, mask, ages, query))
  _, w = fast_jit(pool.apply)(v, rows_, mask, ages, query)
  np.testing.assert_array_equal(w, mask.astype(np.float32))


def test_pooling_uses_ages_and_ignores_padding():
  rng = np.random.default_rng(0)
  pool = ContextPooling(8, n_heads=2)
  rows_ = rng.normal(size=(2, 4, 8)).astype(np.float32)
  mask = np.array([[True, True, False, False], [False] * 4])
  ages = np.array([[1.0, 5.0, 0.0, 0.0], [0.0] * 4], np.float32)
  query = rng.normal(size=(2, 8)).astype(np.float32)
  v = nn.unbox(fast_jit(lambda *a: pool.init(jax.random.key(0), *a))(rows_, mask, ages, query))
  apply = fast_jit(pool.apply)
  a, w = apply(v, rows_, mask, ages, query)
  rows2 = rows_.copy()
  rows2[0, 2:] = 99.0
  b, _ = apply(v, rows2, mask, ages, query)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(a[1], v["params"]["empty"], rtol=1e-6)  # no rows -> the empty token
  c, _ = apply(v, rows_, mask, ages * 10, query)
  assert not np.allclose(a[0], c[0])
  assert np.all(np.asarray(w)[1] == 0)


def test_refiner_recycles_one_shared_block():
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 8))
  refiner = CrossTableRefiner(8, n_heads=2, d_ffn=12, iterations=3)
  params = nn.unbox(refiner.init(jax.random.key(1), x0, MASK))["params"]
  assert sorted(params) == ["block", "recycle", "recycle_norm"]
  assert sorted(params["block"]) == ["attention", "attention_norm", "ffn", "ffn_norm"]
  params = randomize(params, seed=2, scale=0.3)
  x, probs, iterations, _ = fast_jit(lambda p: refiner.apply({"params": p}, x0, MASK))(params)
  block = cross_table_block(2, 12)
  ref = jnp.zeros_like(x0)
  for _ in range(3):  # x_{r+1} = Block(x0 + W LN(x_r)) with the same block params every time
    recycled = common.layer_norm("n").apply({"params": params["recycle_norm"]}, ref)
    recycled = recycled @ params["recycle"]["kernel"] + params["recycle"]["bias"]
    ref, ref_probs = block.apply({"params": params["block"]}, x0 + recycled, MASK)
  np.testing.assert_allclose(x, ref, atol=1e-5)
  np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
  np.testing.assert_array_equal(iterations, 3)
