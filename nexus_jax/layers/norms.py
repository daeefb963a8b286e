"""Normalisation layers: LayerNorm, RMSNorm and AdaptiveNorm (scale/shift from a condition).

`make_norm(kind)` builds any of them by name: "layer", "rms", or "adaptive_layer" /
"adaptive_rms" (an `AdaptiveNorm` over that base norm, called as `norm(x, condition)`);
`apply_norm(norm, x, condition)` calls either kind.

Statistics are always computed in float32 and the result is cast to `dtype` (default: the input
dtype), so bfloat16 activations normalise stably. Scale/bias params carry the logical axis
`param_axis` ("embed" for hidden states, "kv" when normalising per head as in qk-norm).
Pre-norm vs post-norm placement is a property of the block (`blocks.TransformerBlock`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORMS = ("layer", "rms")
ADAPTIVE_NORMS = ("adaptive_layer", "adaptive_rms")


def _param(module: nn.Module, name: str, init, size: int):
  init = nn.with_logical_partitioning(init, (module.param_axis,))
  return module.param(name, init, (size,), module.param_dtype)


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x^2) + eps) * scale` over the last axis. `[..., E] -> [..., E]`."""

  epsilon: float = 1e-6
  use_scale: bool = True
  param_axis: str = "embed"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    if self.use_scale:
      y = y * _param(self, "scale", nn.initializers.ones, x.shape[-1]).astype(jnp.float32)
    return y.astype(dtype)


class LayerNorm(nn.Module):
  """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis. `[..., E] -> [..., E]`."""

  epsilon: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  param_axis: str = "embed"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * _param(self, "scale", nn.initializers.ones, x.shape[-1]).astype(jnp.float32)
    if self.use_bias:
      y = y + _param(self, "bias", nn.initializers.zeros, x.shape[-1]).astype(jnp.float32)
    return y.astype(dtype)


def make_norm(kind: str, **kwargs) -> nn.Module:
  """`"layer"` -> LayerNorm, `"rms"` -> RMSNorm, `"adaptive_layer"` / `"adaptive_rms"` ->
  AdaptiveNorm over that norm; kwargs go to the constructor."""
  if kind == "layer":
    return LayerNorm(**kwargs)
  if kind == "rms":
    return RMSNorm(**kwargs)
  if kind in ADAPTIVE_NORMS:
    return AdaptiveNorm(norm=kind.removeprefix("adaptive_"), **kwargs)
  raise ValueError(f"Unknown norm {kind!r}; choose one of {NORMS + ADAPTIVE_NORMS}.")


def apply_norm(norm: nn.Module, x, condition=None):
  """`norm(x)`, or `norm(x, condition)` for an AdaptiveNorm (`condition [B, C]` required)."""
  if isinstance(norm, AdaptiveNorm):
    if condition is None:
      raise ValueError("an adaptive norm needs `condition` [batch, cond_dim]; got None.")
    return norm(x, condition)
  return norm(x)


class AdaptiveNorm(nn.Module):
  """Norm whose scale and shift are produced from a conditioning vector (adaLN).

  `x [B, ..., E], cond [B, C] -> norm(x) * (1 + scale(cond)) + shift(cond)`, broadcast over the
  middle axes. The projections are zero-initialised, so at init this is the plain norm without
  affine params (adaLN-Zero).
  """

  norm: str = "layer"
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    if cond.ndim != 2 or cond.shape[0] != x.shape[0]:
      raise ValueError(
          f"AdaptiveNorm cond must be [batch, cond_dim] with batch {x.shape[0]}; "
          f"got {cond.shape}."
      )
    dtype = self.dtype or x.dtype
    kw = dict(epsilon=self.epsilon, use_scale=False, dtype=jnp.float32)
    if self.norm == "layer":
      kw["use_bias"] = False
    y = make_norm(self.norm, **kw)(x)
    dense = lambda name: nn.Dense(
        x.shape[-1],
        name=name,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )
    c = cond.astype(jnp.float32)
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    scale, shift = dense("scale")(c)[expand], dense("shift")(c)[expand]
    return (y * (1.0 + scale) + shift).astype(dtype)
