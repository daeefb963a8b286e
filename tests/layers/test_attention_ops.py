"""dot_product_attention: xla / chunked / fourier backends vs the float32 reference, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nexus_jax.layers import attention_ops
from nexus_jax.layers.kernels import chunked_attention, fourier_mixing

import layers_testing as lt

MASKINGS = ("none", "key_padding", "segments", "dense", "bias")


@st.composite
def problems(draw, maskings=MASKINGS, dtypes=("float32", "bfloat16")):
  kv = draw(st.sampled_from([1, 2]))
  return dict(
      seed=draw(st.integers(0, 2**16)),
      b=draw(st.integers(1, 2)),
      t=draw(st.integers(1, 40)),
      s=draw(st.integers(1, 40)),
      h=kv * draw(st.sampled_from([1, 2])),
      kv=kv,
      d=draw(st.sampled_from([4, 8, 16])),
      masking=draw(st.sampled_from(maskings)),
      dtype=draw(st.sampled_from(dtypes)),
      causal=draw(st.booleans()),
  )


def _check(backend, p, block_sizes=None, check_bias_grad=False):
  causal, dtype = p.pop("causal"), p["dtype"]
  q, k, v, kw = lt.make_inputs(**p)
  lt.compare_to_reference(
      backend,
      q,
      k,
      v,
      causal=causal,
      dtype=dtype,
      block_sizes=block_sizes,
      check_bias_grad=check_bias_grad,
      **kw,
  )


@settings(max_examples=4, deadline=None)
@given(problems())
def test_xla_matches_reference(p):
  _check("xla", p)


@settings(max_examples=4, deadline=None)
@given(problems())
def test_chunked_matches_reference(p):
  _check("chunked", p, chunked_attention.ChunkSizes(block_q=16, block_k=8), check_bias_grad=True)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(problems())
def test_chunked_matches_reference_many(p):
  _check("chunked", p, chunked_attention.ChunkSizes(block_q=8, block_k=16), check_bias_grad=True)


def test_chunked_broadcast_mask_and_bias_over_queries():
  """A 4-D mask/bias with q_len 1 ([B, 1, 1, S], [1, H, 1, S]) broadcasts; dbias is reduced."""
  q, k, v, kw = lt.make_inputs(0, 2, 19, 23, 2, 2, 8, masking="dense")
  _, _, _, bkw = lt.make_inputs(0, 2, 19, 23, 2, 2, 8, masking="bias")
  lt.compare_to_reference(
      "chunked",
      q,
      k,
      v,
      causal=False,
      check_bias_grad=True,
      block_sizes=chunked_attention.ChunkSizes(8, 8),
      mask=kw["mask"][:, :, :1],
      bias=bkw["bias"][:, :, :1],
  )


def test_fully_masked_rows_are_zero_on_every_backend():
  q, k, v, _ = lt.make_inputs(0, 2, 8, 8, 2, 1, 8)
  mask = jnp.array([[False] * 8, [True] * 3 + [False] * 5])
  for backend in ("xla", "chunked", "pallas"):
    out = jax.jit(
        lambda q, k, v, backend=backend: attention_ops.dot_product_attention(
            q, k, v, mask=mask, backend=backend
        )
    )(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert np.abs(np.asarray(out[1])).max() > 0.1


def test_chunked_temp_memory_grows_linearly():
  """Doubling the length roughly doubles (not quadruples) chunked fwd+bwd temporary memory."""

  def temp_bytes(length, backend):
    x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    f = jax.grad(
        lambda q, k, v: attention_ops.dot_product_attention(
            q,
            k,
            v,
            causal=True,
            backend=backend,
            block_sizes=chunked_attention.ChunkSizes(128, 128) if backend == "chunked" else None,
        ).sum(),
        argnums=(0, 1, 2),
    )
    return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  chunked = [temp_bytes(n, "chunked") for n in (1024, 2048, 4096)]
  xla = [temp_bytes(n, "xla") for n in (1024, 2048)]
  assert chunked[2] / chunked[1] < 2.6 and chunked[1] / chunked[0] < 2.6, chunked
  assert xla[1] / xla[0] > 3.0, xla
  assert chunked[1] < xla[1] / 4


def test_fnet_matches_numpy_dft():
  q, k, v, _ = lt.make_inputs(0, 2, 12, 12, 4, 2, 8)
  out = jax.jit(lambda q, k, v: attention_ops.dot_product_attention(q, k, v, backend="fourier"))(
      q, k, v
  )
  vv = np.repeat(np.asarray(v, np.float64), 2, axis=2).reshape(2, 12, 32)
  expected = np.real(np.fft.fft2(vv, axes=(1, 2), norm="ortho")).reshape(2, 12, 4, 8)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def _fedformer_numpy(q, k, v, modes):
  """Direct DFT-matrix transcription of the FEDformer-style mixing (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  k, v = np.repeat(k, h // kv, 2), np.repeat(v, h // kv, 2)
  mq, mk = min(modes, t // 2 + 1), min(modes, s // 2 + 1)
  ft = lambda n, m: np.exp(-2j * np.pi * np.outer(np.arange(m), np.arange(n)) / n) / np.sqrt(n)
  qf = np.einsum("mt,bthd->bmhd", ft(t, mq), q)
  kf, vf = (np.einsum("ms,bshd->bmhd", ft(s, mk), x) for x in (k, v))
  w = np.exp(np.abs(np.einsum("bmhd,bnhd->bhmn", qf, kf)) / np.sqrt(d))
  w /= w.sum(-1, keepdims=True)
  of = np.zeros((b, t // 2 + 1, h, d), complex)
  of[:, :mq] = np.einsum("bhmn,bnhd->bmhd", w, vf)
  return np.fft.irfft(of, n=t, axis=1, norm="ortho")


@pytest.mark.parametrize("t,s", [(16, 16), (15, 9)])
def test_fedformer_matches_numpy_and_has_gradients(t, s):
  q, k, v, _ = lt.make_inputs(1, 2, t, s, 4, 2, 8)
  f = lambda q, k, v: attention_ops.dot_product_attention(
      q, k, v, backend="fourier", fourier_modes=4
  )
  np.testing.assert_allclose(
      np.asarray(jax.jit(f)(q, k, v)), _fedformer_numpy(q, k, v, 4), atol=2e-5
  )
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0 for g in grads)
  # Only the lowest 4 frequencies of v reach the output: high-frequency v noise changes nothing.
  hi = np.cos(np.pi * np.arange(s))[None, :, None, None] * np.ones(v.shape)  # Nyquist
  if s % 2 == 0:
    np.testing.assert_allclose(np.asarray(f(q, k, v + hi)), np.asarray(f(q, k, v)), atol=1e-5)


def test_fourier_bf16_keeps_dtype():
  q, k, v, _ = lt.make_inputs(0, 1, 8, 8, 2, 2, 4, dtype="bfloat16")
  out = attention_ops.dot_product_attention(q, k, v, backend="fourier", fourier_modes=3)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="flash"), "Unknown attention backend"),
        (dict(q=(2, 8, 3, 4), k=(2, 8, 2, 4)), "must divide query heads"),
        (dict(k=(2, 8, 2, 4), v=(2, 9, 2, 4)), "same shape"),
        (dict(k=(2, 8, 2, 8), v=(2, 8, 2, 8)), "head_dim"),
        (dict(q=(2, 8, 4)), r"\[batch, length, heads, head_dim\]"),
        (dict(backend="fourier", causal=True), "cannot apply causal"),
        (dict(backend="fourier", mask="kpm"), "cannot apply mask"),
        (dict(backend="pallas", bias=(1, 1, 8, 8)), "pallas backend"),
        (dict(mask=(2, 8, 8)), "mask has shape"),
        (dict(bias=(2, 3, 8, 8)), "bias has shape"),
        (dict(segment_ids=(2, 7)), "segment_ids must be"),
        (dict(backend="pallas", block_sizes=chunked_attention.ChunkSizes()), "takes block_sizes"),
    ],
)
def test_bad_input_is_rejected_clearly(kwargs, match):
  shapes = dict(q=(2, 8, 4, 4), k=(2, 8, 2, 4), v=(2, 8, 2, 4))
  shapes.update({n: kwargs.pop(n) for n in ("q", "k", "v") if n in kwargs})
  arrays = {n: jnp.zeros(sh) for n, sh in shapes.items()}
  if kwargs.get("mask") == "kpm":
    kwargs["mask"] = jnp.ones((2, 8), bool)
  elif "mask" in kwargs:
    kwargs["mask"] = jnp.ones(kwargs["mask"], bool)
  for name in ("bias", "segment_ids"):
    if name in kwargs:
      kwargs[name] = jnp.zeros(kwargs[name], jnp.int32 if name == "segment_ids" else jnp.float32)
  with pytest.raises(ValueError, match=match):
    attention_ops.dot_product_attention(arrays["q"], arrays["k"], arrays["v"], **kwargs)


def test_fnet_rejects_cross_lengths_and_bad_modes():
  q, k, v, _ = lt.make_inputs(0, 1, 8, 6, 2, 2, 4)
  with pytest.raises(ValueError, match="kv_len == q_len"):
    fourier_mixing.fourier_mixing(q, k, v)
  with pytest.raises(ValueError, match="fourier_modes must be >= 1"):
    fourier_mixing.fourier_mixing(q, k, v, modes=0)


def test_cudnn_rejection_falls_back_to_xla_and_logs_once_per_configuration(monkeypatch, caplog):
  calls = []

  def rejecting_cudnn(q, k, v, scale, causal):
    calls.append(q.shape)
    raise ValueError("cuDNN does not support head_dim=4\nsecond line")

  monkeypatch.setattr(attention_ops, "_cudnn_usable", lambda q: True)
  monkeypatch.setattr(attention_ops, "_cudnn_attention", rejecting_cudnn)
  monkeypatch.setattr(attention_ops, "_CUDNN_REJECTED", set())
  rng = np.random.default_rng(0)
  make = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  q, k, v = make(2, 8, 2, 4), make(2, 8, 2, 4), make(2, 8, 2, 4)
  with caplog.at_level("WARNING", logger=attention_ops.__name__):
    outs = [attention_ops.dot_product_attention(q, k, v, causal=True) for _ in range(3)]
    attention_ops.dot_product_attention(q, k, v, causal=False)  # another configuration
  assert len(calls) == 4  # cuDNN was tried every time, and rejected
  messages = [r.getMessage() for r in caplog.records if r.name == attention_ops.__name__]
  assert len(messages) == 2, messages  # once per configuration
  assert "[2, 8, 2, 4]" in messages[0] and "bfloat16" in messages[0]
  assert "causal=True" in messages[0] and "causal=False" in messages[1]
  assert "head_dim=4" in messages[0] and "second line" not in messages[0]
  ref = attention_ops.reference_attention(q, k, v, causal=True)
  for out in outs:  # the XLA fallback still computes attention
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )
