"""Attention module: multi-head / grouped-query / multi-query, self or cross, RoPE, KV cache.

`Attention(num_heads=8, num_kv_heads=2, rotary_fraction=0.5, causal=True)(x)` maps
`x [B, T, E] -> [B, T, out_dim or E]`. Cross-attention (`cross_attention=True`) reads keys/values
from `context [B, S, E_ctx]`. The score computation is `attention_ops.dot_product_attention` with
the module's `backend`.

RoPE is applied to the first `rotary_fraction` of each head's dims of q and k in self-attention
(not in cross-attention, where query and context positions are unrelated), after the optional
qk-norm (RMSNorm over head_dim, Dehghani et al. 2023).

Incremental decoding (`decode=True`) keeps state in the `cache` collection:
- self-attention: `cached_key`/`cached_value [B, L, K, D]` and `cache_index [B]` int32, the
  next write position of each row (rows may sit at different positions: continuous batching).
  Initialise with an input of the maximum length L (`model.init(rng, x_BLE)`), then call with
  `mutable=["cache"]` on chunks `[B, T_step, E]` (a prompt, then one token at a time): row b's
  chunk is written at slots `cache_index[b] + 0..T-1` and its query i sees slots
  `0..cache_index[b] + i`. Keys are rotated at their absolute positions (default: the row's
  cache index onwards) before caching, so RoPE stays correct. Decoding is causal self-attention
  only; it runs the `chunked` backend when selected and `xla` otherwise (a decode step's score
  matrix is small). A `[B, L]` mask over cache slots may be passed.
- cross-attention: the projected context keys/values are cached whenever `context` is given
  (at init and on the prefill call); later steps pass `context=None` and reuse them.
The fourier backend has no KV cache. Writes past slot L - 1 are dropped (never wrapped onto
earlier slots); the host-side `models.decoding.check_fits` and the engine refuse them first.

Params: query `[embed, heads, kv]`, key/value `[embed, kv_heads_axis, kv]`, out
`[heads, kv, embed]` (logical axis names).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers import attention_ops
from nexus_jax.layers import norms
from nexus_jax.layers import rotary
from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.projection import Projection

Dtype = Any


class Attention(nn.Module):
  """Multi-head attention with GQA/MQA, RoPE, qk-norm, cross-attention and a KV cache."""

  num_heads: int
  num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA
  head_dim: int | None = None  # None: embed_dim // num_heads
  out_dim: int | None = None  # None: embed_dim
  causal: bool = False
  cross_attention: bool = False
  rotary_fraction: float = 0.0  # fraction of head dims rotated by RoPE; 0 disables
  rope_theta: float = 10000.0
  qk_norm: bool = False
  use_bias: bool = False
  backend: str = "xla"
  block_sizes: Any = None
  fourier_modes: int | None = None
  decode: bool = False
  kv_heads_axis: str | None = "heads"  # logical axis of the kv-head dim of k/v kernels
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def _dims(self, embed_dim: int) -> tuple[int, int]:
    num_kv = self.num_kv_heads or self.num_heads
    if self.num_heads < 1 or num_kv < 1:
      raise ValueError(f"num_heads ({self.num_heads}) and num_kv_heads ({num_kv}) must be >= 1.")
    if self.num_heads % num_kv:
      raise ValueError(f"num_kv_heads ({num_kv}) must divide num_heads ({self.num_heads}).")
    if self.head_dim is None and embed_dim % self.num_heads:
      raise ValueError(
          f"embed dim {embed_dim} is not divisible by num_heads "
          f"({self.num_heads}); set head_dim explicitly."
      )
    rotary.rotary_dim(2, self.rotary_fraction)  # validates the fraction
    if self.backend == "fourier" and self.decode:
      raise ValueError(
          "The fourier backend has no KV cache: it mixes the whole sequence at "
          "once. Use decode=False, or another backend for decoding."
      )
    if self.decode and not (self.causal or self.cross_attention):
      raise ValueError(
          "decode=True needs causal self-attention (causal=True) or " "cross_attention=True."
      )
    return num_kv, self.head_dim or embed_dim // self.num_heads

  def _proj(self, x, heads: int, head_dim: int, axis_name, name: str):
    """`x [B, T, E] -> [B, T, heads, head_dim]`, as a matmul over the flattened `[B*T, E]`
    tokens (2-D operands keep the weight gradient a plain matmul; see `feedforward`)."""
    y = Projection(
        (heads, head_dim),
        kernel_axes=("embed", axis_name, "kv"),
        use_bias=self.use_bias,
        dtype=self.dtype or x.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name=name,
    )(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], heads, head_dim)

  @nn.compact
  def __call__(
      self,
      x,
      context=None,
      *,
      mask=None,
      segment_ids=None,
      positions=None,
      bias=None,
      deterministic: bool = True,
  ):
    """`x [B, T, E]`, `context [B, S, E_ctx]` -> `[B, T, out_dim or E]`.

    mask / segment_ids / bias follow `attention_ops.dot_product_attention` (keys are the context
    in cross-attention). positions `[B, T]` int for RoPE; default `0..T-1` (decoding: the cache
    index onwards). `deterministic` is accepted for interface symmetry (no dropout here).
    """
    del deterministic
    if x.ndim != 3:
      raise ValueError(f"Attention input must be [batch, length, embed]; got {x.shape}.")
    b, t, e = x.shape
    num_kv, d = self._dims(e)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    q = self._proj(x, self.num_heads, d, "heads", "query")
    if self.qk_norm:
      q = norms.RMSNorm(param_axis="kv", name="q_norm", param_dtype=self.param_dtype)(q)

    if self.cross_attention:
      k, v = self._cross_kv(context, num_kv, d)
    else:
      if context is not None:
        raise ValueError(
            "context was given to a self-attention module; set "
            "cross_attention=True for cross-attention."
        )
      k = self._proj(x, num_kv, d, self.kv_heads_axis, "key")
      v = self._proj(x, num_kv, d, self.kv_heads_axis, "value")
      if self.qk_norm:
        k = norms.RMSNorm(param_axis="kv", name="k_norm", param_dtype=self.param_dtype)(k)

    causal, backend = self.causal, self.backend
    if not self.cross_attention:
      decoding = self.decode and self.has_variable("cache", "cached_key")
      if positions is None and not decoding:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      if decoding:
        if segment_ids is not None:
          raise ValueError("segment_ids are not supported while decoding with a KV cache.")
        index = jnp.broadcast_to(self.get_variable("cache", "cache_index"), (b,))
        if positions is None:
          positions = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      if self.rotary_fraction > 0:
        q = rotary.apply_rope(
            q, positions, rotary_fraction=self.rotary_fraction, theta=self.rope_theta
        )
        k = rotary.apply_rope(
            k, positions, rotary_fraction=self.rotary_fraction, theta=self.rope_theta
        )
      if self.decode:
        k, v, mask = self._update_cache(k, v, mask)
        if decoding:
          causal = False  # the cache mask below already encodes causality
          backend = "chunked" if backend == "chunked" else "xla"
    elif self.causal:
      raise ValueError(
          "causal=True with cross_attention=True: causal masking is for " "self-attention."
      )

    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", self.kv_heads_axis, "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", self.kv_heads_axis, "kv"))
    out = attention_ops.dot_product_attention(
        q,
        k,
        v,
        causal=causal,
        mask=mask,
        segment_ids=segment_ids,
        bias=bias,
        backend=backend,
        block_sizes=self.block_sizes,
        fourier_modes=self.fourier_modes,
    )
    out = Projection(
        self.out_dim or e,
        kernel_axes=("heads", "kv", "embed"),
        axis=(-2, -1),
        use_bias=self.use_bias,
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name="out",
    )(out.reshape(b * t, *out.shape[2:]))
    return nn.with_logical_constraint(out.reshape(b, t, -1), ("batch", "length", "embed"))

  def _cross_kv(self, context, num_kv: int, d: int):
    """Projected context keys/values `[B, S, K, D]`, through the cross cache when decoding."""
    if context is None:
      if not (self.decode and self.has_variable("cache", "cached_key")):
        raise ValueError(
            "cross_attention=True needs `context` (it may be omitted only when "
            "decoding after the context has been cached)."
        )
      return (self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value"))
    if context.ndim != 3 or context.shape[0] == 0:
      raise ValueError(f"context must be [batch, length, embed]; got {context.shape}.")
    context = context.astype(self.dtype or context.dtype)
    k = self._proj(context, num_kv, d, self.kv_heads_axis, "key")
    v = self._proj(context, num_kv, d, self.kv_heads_axis, "value")
    if self.qk_norm:
      k = norms.RMSNorm(param_axis="kv", name="k_norm", param_dtype=self.param_dtype)(k)
    if self.decode:
      ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      ck.value, cv.value = k, v
    return k, v

  def _update_cache(self, k, v, mask):
    """Writes `k/v [B, T, K, D]` at each row's `cache_index [B]`; returns the full cache and the
    `[B, 1, T, L]` visibility mask (causal per row, and the `[B, L]` cache mask if given).

    At init (no cache yet) this creates a cache of length T and returns the inputs unchanged.
    """
    initialised = self.has_variable("cache", "cached_key")
    b, t = k.shape[:2]
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    ci = self.variable("cache", "cache_index", lambda: jnp.zeros((b,), jnp.int32))
    if not initialised:
      return k, v, mask
    max_len = ck.value.shape[1]
    if ck.value.shape[0] != b or ck.value.shape[2:] != k.shape[2:]:
      raise ValueError(
          f"decode input batch/heads {k.shape} do not match the cache "
          f"{ck.value.shape}; re-initialise the cache."
      )
    index = jnp.broadcast_to(ci.value, (b,)).astype(jnp.int32)  # a scalar index: every row
    q_pos = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T] slots written
    rows = jnp.arange(b)[:, None]
    # Out-of-range slots are dropped, never clamped or wrapped onto earlier positions.
    ck.value = ck.value.at[rows, q_pos].set(k.astype(ck.value.dtype), mode="drop")
    cv.value = cv.value.at[rows, q_pos].set(v.astype(cv.value.dtype), mode="drop")
    ci.value = index + t
    # Row b's query i (absolute slot index[b] + i) sees cache slots 0..index[b] + i.
    visible = jnp.arange(max_len)[None, None, :] <= q_pos[:, :, None]  # [B, T, L]
    visible = visible[:, None]  # [B, 1, T, L]
    if mask is not None:
      if mask.shape != (b, max_len):
        raise ValueError(
            f"While decoding, mask must be [batch, cache_len] = {(b, max_len)}; "
            f"got {mask.shape}."
        )
      visible = visible & mask[:, None, None, :]
    return ck.value, cv.value, visible
