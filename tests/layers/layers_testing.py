"""Shared helpers for the layer tests: cheap keys/inputs, attention inputs and reference checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.layers import attention_ops


def key(seed: int = 0):
  """An `rbg` PRNG key: compiling param init with it is several times faster than threefry."""
  return jax.random.key(seed, impl="rbg")


def normal(seed: int, shape, dtype=jnp.float32):
  """Standard-normal test input made with numpy (no per-shape random-number compilation)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# Tolerances, relative to max(1, max |reference|). float32 differences come from summation order
# only; bfloat16 ones from rounding the probabilities (and outputs) to 8 mantissa bits.
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}
GRAD_TOLERANCE = {"float32": 5e-5, "bfloat16": 6e-2}


def make_inputs(seed, b, t, s, h, kv, d, *, masking="none", dtype="float32"):
  """q, k, v and masking kwargs for `dot_product_attention`; `masking` picks the kind."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  kw = {}
  if masking == "key_padding":  # includes fully padded rows (length 0)
    lengths = rng.integers(0, s + 1, size=(b, 1))
    kw["mask"] = jnp.asarray(np.arange(s)[None, :] < lengths)
  elif masking == "segments":
    kw["segment_ids"] = (
        jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1)),
        jnp.asarray(np.sort(rng.integers(0, 3, size=(b, s)), axis=1)),
    )
  elif masking == "dense":
    kw["mask"] = jnp.asarray(rng.random(size=(b, 1, t, s)) < 0.7)
  elif masking == "bias":
    kw["bias"] = jnp.asarray(rng.normal(size=(1, h, t, s)), jnp.float32)
  return q, k, v, kw


def compare_to_reference(
    backend, q, k, v, *, causal, dtype="float32", block_sizes=None, check_bias_grad=False, **kw
):
  """Asserts backend values and q/k/v (and bias) gradients match `reference_attention`."""
  bias = kw.pop("bias", None)
  ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def loss(fn, q, k, v, bias):
    out = fn(q, k, v, causal=causal, bias=bias, **kw)
    return jnp.sum(out.astype(jnp.float32) * ct), out

  fn = functools.partial(
      attention_ops.dot_product_attention, backend=backend, block_sizes=block_sizes
  )
  argnums = (0, 1, 2, 3) if (check_bias_grad and bias is not None) else (0, 1, 2)
  run = jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums, has_aux=True))
  ref_q, ref_k, ref_v = (x.astype(jnp.float32) for x in (q, k, v))
  ref = jax.jit(
      jax.value_and_grad(
          functools.partial(loss, attention_ops.reference_attention), argnums, has_aux=True
      )
  )
  (_, out), grads = run(q, k, v, bias)
  (_, ref_out), ref_grads = ref(ref_q, ref_k, ref_v, bias)
  assert out.dtype == q.dtype and out.shape == q.shape
  _close(out, ref_out, TOLERANCE[dtype], "output")
  for name, g, rg in zip("qkvb", grads, ref_grads):
    _close(g, rg, GRAD_TOLERANCE[dtype], f"d{name}")


def _close(x, ref, tol, what):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.isfinite(x)), f"{what} has non-finite values"
  scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
  err = float(np.abs(x - ref).max(initial=0.0))
  assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol * scale:.3g}"
