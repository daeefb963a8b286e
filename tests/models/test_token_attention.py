"""token_attention.py: fused q/k/v == separate projections, key masks, the block against a plain reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tabular_testing import fast_jit, randomize, reference_transformer_block
from nexus_jax.models.tabular.token_attention import MultiHeadAttention, TransformerBlock


def test_fused_attention_matches_separate_projections():
  """q, k, v from one stacked matmul == three separate projections, with and without CLS-only queries."""
  x = jax.random.normal(jax.random.key(3), (4, 5, 16))
  mha = MultiHeadAttention(n_heads=2)
  v = fast_jit(lambda x: mha.init(jax.random.key(0), x, x))(x)
  p = nn.unbox(v["params"])

  def reference(x_q, x_kv):
    proj = lambda x, n: jnp.einsum("ntd,dhk->nthk", x, p[n]["kernel"]) + p[n]["bias"]  # noqa: E731
    q, k, val = proj(x_q, "query"), proj(x_kv, "key"), proj(x_kv, "value")
    probs = jax.nn.softmax(jnp.einsum("nqhk,nthk->nhqt", q, k) / np.sqrt(8), axis=-1)
    out = jnp.einsum("nhqt,nthk->nqhk", probs, val)
    return jnp.einsum("nqhk,hkd->nqd", out, p["out"]["kernel"]) + p["out"]["bias"], probs

  apply = fast_jit(lambda v, x: mha.apply(v, x, x))
  apply_cls = fast_jit(lambda v, x: mha.apply(v, x[:, :1], x))
  for (out, probs), (ref_out, ref_probs) in (
      (apply(v, x), reference(x, x)),
      (apply_cls(v, x), reference(x[:, :1], x)),
  ):
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-6)


def test_transformer_block_matches_reference_and_ignores_masked_keys():
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  mask = jnp.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  block = TransformerBlock(n_heads=2, d_ffn=12)
  params = randomize(nn.unbox(block.init(jax.random.key(1), x, mask))["params"])
  apply = fast_jit(lambda x: block.apply({"params": params}, x, mask))
  out, probs = apply(x)
  ref_out, ref_probs = reference_transformer_block(params, x, mask, n_heads=2)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
  assert np.all(np.asarray(probs)[np.broadcast_to(~mask[:, None, None, :], probs.shape)] == 0)
  out2, _ = apply(jnp.where(mask[..., None], x, 1e3))  # masked tokens changed
  np.testing.assert_allclose(np.asarray(out2)[mask], np.asarray(out)[mask], atol=1e-5)
