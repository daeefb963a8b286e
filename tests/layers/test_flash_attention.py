"""Pallas flash attention (interpret mode on CPU) vs the reference and vs jax's own Pallas mha."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas.ops.gpu import attention as jax_mha

from nexus_jax.layers import attention_ops
from nexus_jax.layers.kernels import flash_attention as fa

import layers_testing as lt

TINY = fa.BlockSizes(16, 16, 16, 16, 16, 16)


@st.composite
def problems(draw):
  kv = draw(st.sampled_from([1, 2]))
  return dict(
      seed=draw(st.integers(0, 2**16)),
      b=draw(st.integers(1, 2)),
      t=draw(st.integers(1, 40)),
      s=draw(st.integers(1, 40)),
      h=kv * draw(st.sampled_from([1, 2])),
      kv=kv,
      d=draw(st.sampled_from([4, 8, 16])),
      masking=draw(st.sampled_from(["none", "key_padding", "segments"])),
      dtype=draw(st.sampled_from(["float32", "bfloat16"])),
      causal=draw(st.booleans()),
  )


def _check(p, sizes=TINY):
  causal, dtype = p.pop("causal"), p["dtype"]
  q, k, v, kw = lt.make_inputs(**p)
  lt.compare_to_reference("pallas", q, k, v, causal=causal, dtype=dtype, block_sizes=sizes, **kw)


@settings(max_examples=3, deadline=None)
@given(problems())
def test_pallas_matches_reference(p):
  _check(p)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(problems())
def test_pallas_matches_reference_many(p):
  _check(p, fa.BlockSizes(16, 8, 8, 16, 16, 8))


def test_pallas_gqa_segments_causal_odd_lengths_mixed_blocks():
  """Fixed hard case: G=3 query heads per kv head, padding on both lengths, unequal tiles."""
  q, k, v, kw = lt.make_inputs(3, 2, 37, 29, 6, 2, 12, masking="segments")
  lt.compare_to_reference(
      "pallas", q, k, v, causal=True, block_sizes=fa.BlockSizes(16, 8, 8, 16, 16, 8), **kw
  )


def test_pallas_matches_jax_reference_kernel():
  """Same numbers as `jax.experimental.pallas.ops.gpu.attention.mha` where it applies."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 32, 2, 16)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(np.repeat([[0, 1]], 16, axis=1).repeat(2, axis=0))
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  sizes = jax_mha.BlockSizes(
      block_q=16, block_k=16, block_q_dkv=16, block_kv_dkv=16, block_q_dq=16, block_kv_dq=16
  )
  theirs = lambda q, k, v: jax_mha.mha(
      q, k, v, seg, sm_scale=0.25, causal=True, block_sizes=sizes, interpret=True
  )
  ours = lambda q, k, v: fa.flash_attention(
      q, k, v, seg, seg, causal=True, scale=0.25, block_sizes=TINY, interpret=True
  )
  for fn in (theirs, ours):
    fn.vg = jax.jit(
        jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2))
    )
  (l1, g1), (l2, g2) = theirs.vg(q, k, v), ours.vg(q, k, v)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize(
    "b,t,s,h,kv,d,causal,seg",
    [
        (2, 256, 256, 4, 2, 64, True, True),
        (1, 100, 77, 6, 2, 40, False, True),  # G=3, padded lengths and head_dim
        (1, 128, 128, 8, 1, 128, True, False),  # MQA
        (1, 5, 9, 2, 1, 8, True, False),  # shorter than one Triton tile
    ],
)
def test_kernels_lower_for_gpu(b, t, s, h, kv, d, causal, seg):
  """Forward, dq and dk/dv kernels lower through Triton for CUDA (no GPU needed to lower)."""
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, s, kv, d), jnp.bfloat16)
  qs = jax.ShapeDtypeStruct((b, t), jnp.int32) if seg else None
  ks = jax.ShapeDtypeStruct((b, s), jnp.int32) if seg else None
  loss = (
      lambda q, k, v, qs, ks: fa.flash_attention(
          q,
          k,
          v,
          qs,
          ks,
          causal=causal,
          scale=0.125,
          interpret=False,
          block_sizes=fa.default_block_sizes(d, "gpu"),
      )
      .astype(jnp.float32)
      .sum()
  )
  lowered = (
      jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      .trace(q, k, k, qs, ks)
      .lower(lowering_platforms=("cuda",))
  )
  assert lowered.as_text().count("xla.gpu.triton") == 3  # fwd, dq, dkv


def test_default_block_sizes_are_the_tuned_gpu_tiles_only_where_they_fit():
  tuned = fa.default_block_sizes(128, "gpu")
  assert (tuned.block_q, tuned.block_k, tuned.block_q_dq, tuned.block_k_dkv) == (128, 64, 64, 64)
  assert (tuned.num_warps, tuned.num_stages) == (4, 3)
  assert fa.default_block_sizes(256, "gpu") == fa.BlockSizes()
  assert fa.default_block_sizes(64, "cpu") == fa.BlockSizes()


def test_tuned_gpu_tiles_match_reference_in_interpret_mode():
  """The GPU default tiles (q 128, k 64) on lengths that are not multiples of them."""
  q, k, v, kw = lt.make_inputs(
      seed=3, b=1, t=150, s=70, h=2, kv=1, d=16, masking="segments", dtype="float32"
  )
  lt.compare_to_reference(
      "pallas",
      q,
      k,
      v,
      causal=True,
      dtype="float32",
      block_sizes=fa.default_block_sizes(16, "gpu"),
      **kw,
  )


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="power of two"):
    fa.BlockSizes(block_q=48)


def test_segment_ids_both_or_neither():
  x = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match="both q and kv segment ids"):
    fa.flash_attention(x, x, x, jnp.zeros((1, 8), jnp.int32), None, causal=False, scale=1.0)


def test_dispatch_uses_pallas_without_segment_ids():
  q, k, v, _ = lt.make_inputs(0, 1, 20, 20, 2, 1, 8)
  out = jax.jit(
      lambda q, k, v: attention_ops.dot_product_attention(
          q, k, v, causal=True, backend="pallas", block_sizes=TINY
      )
  )(q, k, v)
  ref = attention_ops.reference_attention(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
