"""Frequency-domain token mixing, the `fourier` backend of `dot_product_attention`.

Two variants, both global and non-causal (every output position depends on every input
position), so they accept no causal flag, mask, segment ids or bias, and cannot be decoded with a
KV cache:

- FNet (Lee-Thorp et al., 2021), `modes=None`: `out = Re(FFT2(v))` over (length, heads*head_dim),
  with orthonormal scaling so activations keep their magnitude. q and k are not used (their
  gradients are zero); requires `S == T`.
- FEDformer-style frequency attention (Zhou et al., 2022), `modes=M`: q, k, v are rFFT'd along
  length, only the lowest M frequencies are kept, attention weights are
  `softmax(|Q_f K_f^T| / sqrt(D))` over key frequencies, the mixed value spectrum is zero-padded
  and inverse-rFFT'd back to length T. Supports S != T (cross mixing) and grouped kv heads.
  (FEDformer uses a complex tanh; the softmax of magnitudes is the bounded variant.)

Shapes: q `[B, T, H, D]`, k/v `[B, S, K, D]`, output `[B, T, H, D]`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def fnet_mixing(v_BTHD):
  """`Re(FFT2)` over length and the flattened head*head_dim axis, orthonormal."""
  b, t, h, d = v_BTHD.shape
  x = v_BTHD.astype(jnp.float32).reshape(b, t, h * d)
  return jnp.real(jnp.fft.fft2(x, axes=(1, 2), norm="ortho")).reshape(b, t, h, d)


def fedformer_mixing(q_BTHD, k_BSKD, v_BSKD, modes: int):
  """Attention among the lowest `modes` frequencies of q, k, v, mapped back to length T."""
  b, t, h, d = q_BTHD.shape
  s, num_kv = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // num_kv
  mq, mk = min(modes, t // 2 + 1), min(modes, s // 2 + 1)
  qf = jnp.fft.rfft(q_BTHD.astype(jnp.float32), axis=1, norm="ortho")[:, :mq]
  kf = jnp.fft.rfft(k_BSKD.astype(jnp.float32), axis=1, norm="ortho")[:, :mk]
  vf = jnp.fft.rfft(v_BSKD.astype(jnp.float32), axis=1, norm="ortho")[:, :mk]
  qf = qf.reshape(b, mq, num_kv, g, d)
  scores = jnp.einsum("bmkgd,bnkd->bkgmn", qf, kf)
  w = jnp.exp(jnp.abs(scores) / math.sqrt(d))
  w = w / jnp.sum(w, axis=-1, keepdims=True)
  out_f = jnp.einsum("bkgmn,bnkd->bmkgd", w.astype(vf.dtype), vf).reshape(b, mq, h, d)
  out_f = jnp.pad(out_f, ((0, 0), (0, t // 2 + 1 - mq), (0, 0), (0, 0)))
  return jnp.fft.irfft(out_f, n=t, axis=1, norm="ortho")


def fourier_mixing(q_BTHD, k_BSKD, v_BSKD, *, modes: int | None = None):
  """FNet mixing of v (`modes=None`) or FEDformer-style attention over `modes` frequencies."""
  t, h = q_BTHD.shape[1], q_BTHD.shape[2]
  s, num_kv = k_BSKD.shape[1], k_BSKD.shape[2]
  if modes is None:
    if s != t:
      raise ValueError(
          f"FNet mixing (fourier_modes=None) needs kv_len == q_len; got {s} vs {t}. "
          "Pass fourier_modes=M for FEDformer-style cross mixing."
      )
    out = fnet_mixing(jnp.repeat(v_BSKD, h // num_kv, axis=2))
  else:
    if modes < 1:
      raise ValueError(f"fourier_modes must be >= 1 (or None for FNet); got {modes}.")
    out = fedformer_mixing(q_BTHD, k_BSKD, v_BSKD, modes)
  return out.astype(q_BTHD.dtype)
