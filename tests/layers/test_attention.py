"""Attention module: cached decoding == full pass, packing, cross-attention cache, annotations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers.attention import Attention
from nexus_jax.layers.kernels import chunked_attention

import layers_testing as lt

B, L, E = 2, 7, 16


def _x(seed=0, shape=(B, L, E), dtype=jnp.float32):
  return lt.normal(seed, shape, dtype)


def test_cached_decoding_matches_full_causal_forward():
  """Prefill 3 tokens, then decode one at a time: same outputs as one causal pass (GQA, partial
  RoPE, qk-norm), including RoPE positions continuing from the cache index."""
  kw = dict(num_heads=4, num_kv_heads=2, causal=True, rotary_fraction=0.5, qk_norm=True)
  x = _x()
  params = jax.jit(Attention(**kw).init)(lt.key(1), x)["params"]
  full = jax.jit(Attention(**kw).apply)({"params": params}, x)

  dec = Attention(**kw, decode=True)
  cache = jax.jit(dec.init)(lt.key(1), x)["cache"]  # sized by x: max length L
  step = jax.jit(lambda c, xs: dec.apply({"params": params, "cache": c}, xs, mutable=["cache"]))
  outs = []
  for lo, hi in [(0, 3)] + [(i, i + 1) for i in range(3, L)]:
    y, state = step(cache, x[:, lo:hi])
    cache = state["cache"]
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), atol=1e-5)
  np.testing.assert_array_equal(cache["cache_index"], [L] * B)  # one index per row


def test_rows_decode_at_their_own_cache_positions_and_overflow_is_dropped():
  """A per-row `cache_index [B]`: each row writes, rotates (RoPE) and attends at its own
  position, matching the full causal pass; a row at the end of the cache writes nothing."""
  kw = dict(num_heads=4, num_kv_heads=2, causal=True, rotary_fraction=1.0)
  x = _x(8)
  params = jax.jit(Attention(**kw).init)(lt.key(1), x)["params"]
  full = np.asarray(jax.jit(Attention(**kw).apply)({"params": params}, x))
  dec = Attention(**kw, decode=True)
  step = jax.jit(lambda c, xs: dec.apply({"params": params, "cache": c}, xs, mutable=["cache"]))
  _, state = step(jax.jit(dec.init)(lt.key(1), x)["cache"], x[:, :5])
  index = np.array([2, 4])  # rewind the rows to different positions; later slots are stale
  cache = {**state["cache"], "cache_index": jnp.asarray(index, jnp.int32)}
  for _ in range(2):
    y, state = step(cache, x[np.arange(B), index][:, None])
    np.testing.assert_allclose(y[:, 0], full[np.arange(B), index], atol=1e-5)
    cache, index = state["cache"], index + 1
  np.testing.assert_array_equal(cache["cache_index"], index)
  full_cache = {**cache, "cache_index": jnp.array([L - 1, L], jnp.int32)}  # row 1 is full
  _, state = step(full_cache, x[:, :1])
  np.testing.assert_array_equal(state["cache"]["cached_key"][1], full_cache["cached_key"][1])
  assert not np.array_equal(state["cache"]["cached_key"][0, L - 1], cache["cached_key"][0, L - 1])


def test_cached_decoding_with_chunked_backend_and_padding_mask():
  kw = dict(
      num_heads=2,
      causal=True,
      rotary_fraction=1.0,
      backend="chunked",
      block_sizes=chunked_attention.ChunkSizes(4, 4),
  )
  x = _x(1)
  pad = jnp.arange(L)[None, :] < jnp.array([[L], [5]])  # row 1: last 2 keys are padding
  params = jax.jit(Attention(**kw).init)(lt.key(1), x)["params"]
  full = jax.jit(lambda p, x: Attention(**kw).apply({"params": p}, x, mask=pad))(params, x)
  dec = Attention(**kw, decode=True)
  cache = jax.jit(dec.init)(lt.key(1), x)["cache"]
  step = jax.jit(
      lambda c, xs: dec.apply({"params": params, "cache": c}, xs, mask=pad, mutable=["cache"])
  )
  outs = []
  for i in range(L):
    y, state = step(cache, x[:, i : i + 1])
    cache, outs = state["cache"], outs + [y]
  np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), atol=1e-5)


def test_cross_attention_cache_matches_uncached():
  kw = dict(num_heads=4, num_kv_heads=1, cross_attention=True)
  x, ctx = _x(2), _x(3, (B, 5, 12))
  params = jax.jit(Attention(**kw).init)(lt.key(1), x, ctx)["params"]
  full = jax.jit(Attention(**kw).apply)({"params": params}, x, ctx)
  dec = Attention(**kw, decode=True)
  cache = jax.jit(dec.init)(lt.key(1), x, ctx)["cache"]
  prefill = jax.jit(lambda v, x, c: dec.apply(v, x, c, mutable=["cache"]))
  step = jax.jit(lambda v, x: dec.apply(v, x, mutable=["cache"]))
  first, state = prefill({"params": params, "cache": cache}, x[:, :2], ctx)
  rest, _ = step({"params": params, "cache": state["cache"]}, x[:, 2:])
  np.testing.assert_allclose(np.concatenate([first, rest], 1), np.asarray(full), atol=1e-5)


def test_packed_sequences_equal_separate_sequences():
  """Two sequences packed in one row (segment ids + restarting positions) = run separately."""
  kw = dict(num_heads=2, causal=True, rotary_fraction=1.0)
  a, b = _x(4, (1, 4, E)), _x(5, (1, 3, E))
  module = Attention(**kw)
  params = jax.jit(module.init)(lt.key(1), a)
  apply = jax.jit(module.apply)
  packed = apply(
      params,
      jnp.concatenate([a, b], 1),
      segment_ids=jnp.array([[1, 1, 1, 1, 2, 2, 2]]),
      positions=jnp.array([[0, 1, 2, 3, 0, 1, 2]]),
  )
  np.testing.assert_allclose(packed[:, :4], apply(params, a), atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:], apply(params, b), atol=1e-5)


def test_backends_agree_inside_the_module_in_bf16():
  x = _x(6, dtype=jnp.bfloat16)
  outs = {}
  for backend in ("xla", "chunked", "pallas"):
    m = Attention(
        num_heads=4,
        num_kv_heads=2,
        causal=True,
        rotary_fraction=1.0,
        backend=backend,
        dtype=jnp.bfloat16,
    )
    params = jax.jit(m.init)(lt.key(1), x)
    y = jax.jit(m.apply)(params, x)
    assert y.dtype == jnp.bfloat16
    outs[backend] = np.asarray(y, np.float32)
  np.testing.assert_allclose(outs["chunked"], outs["xla"], atol=5e-2)
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=5e-2)


def test_params_carry_logical_axis_names():
  m = Attention(num_heads=4, num_kv_heads=2, qk_norm=True)
  boxed = jax.eval_shape(m.init, lt.key(0), _x())["params"]
  names = {k: v.names for k, v in boxed.items() if isinstance(v, nn.LogicallyPartitioned)}
  names.update({k: v["kernel"].names for k, v in boxed.items() if "kernel" in v})
  names.update({k: v["scale"].names for k, v in boxed.items() if "scale" in v})
  assert names == {
      "query": ("embed", "heads", "kv"),
      "key": ("embed", "heads", "kv"),
      "value": ("embed", "heads", "kv"),
      "out": ("heads", "kv", "embed"),
      "q_norm": ("kv",),
      "k_norm": ("kv",),
  }


def test_fourier_backend_in_module_and_no_cache():
  x = _x(7)
  m = Attention(num_heads=2, backend="fourier", fourier_modes=3)
  params = jax.jit(m.init)(lt.key(0), x)
  assert jax.jit(m.apply)(params, x).shape == x.shape
  with pytest.raises(ValueError, match="fourier backend has no KV cache"):
    Attention(num_heads=2, backend="fourier", causal=True, decode=True).init(lt.key(0), x)


@pytest.mark.parametrize(
    "kwargs,call,match",
    [
        (dict(num_heads=3), {}, "not divisible by num_heads"),
        (dict(num_heads=4, num_kv_heads=3), {}, "must divide num_heads"),
        (dict(num_heads=2, decode=True), {}, "decode=True needs causal"),
        (dict(num_heads=2), dict(context=True), "cross_attention=True for cross-attention"),
        (dict(num_heads=2, cross_attention=True), {}, "needs `context`"),
        (dict(num_heads=2, rotary_fraction=1.5), {}, "rotary_fraction"),
        (dict(num_heads=2, backend="cudnn"), {}, "Unknown attention backend"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, call, match):
  x = _x()
  if call.get("context"):
    call = {"context": x}
  with pytest.raises(ValueError, match=match):
    Attention(**kwargs).init(lt.key(0), x, **call)
