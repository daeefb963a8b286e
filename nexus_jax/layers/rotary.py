"""Rotary position embeddings (RoPE, Su et al. 2021) on a fraction of the head dims.

The first `rot_dim = 2 * floor(rotary_fraction * D / 2)` dims of each head are rotated with the
"half" layout (GPT-NeoX / Llama): dims `i` and `i + rot_dim/2` form a pair rotated by angle
`position * theta^(-2i/rot_dim)`; the remaining dims pass through unchanged. Since every pair
rotates by an angle linear in position, `<rope(q, m), rope(k, n)>` depends on `m - n` only.
"""

from __future__ import annotations

import jax.numpy as jnp


def rotary_dim(head_dim: int, rotary_fraction: float) -> int:
  """Number of rotated dims (even) for a head of size `head_dim`."""
  if not 0.0 <= rotary_fraction <= 1.0:
    raise ValueError(f"rotary_fraction must be in [0, 1]; got {rotary_fraction}.")
  return int(head_dim * rotary_fraction) // 2 * 2


def apply_rope(x_BTHD, positions_BT, *, rotary_fraction: float = 1.0, theta: float = 10000.0):
  """Rotates `x [B, T, H, D]` by integer `positions [B, T]`; returns `[B, T, H, D]`, x's dtype."""
  d = x_BTHD.shape[-1]
  rot = rotary_dim(d, rotary_fraction)
  if rot == 0:
    return x_BTHD
  half = rot // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angle = positions_BT.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x = x_BTHD.astype(jnp.float32)
  x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x_BTHD.dtype)
