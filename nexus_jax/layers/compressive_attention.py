"""Segment-recurrent causal attention with a compressed memory (Compressive Transformer).

Rae et al. 2020, on keys/values: the sequence is cut into segments of `segment_length` W tokens.
Each segment attends causally within itself, fully to the raw K/V of the previous segment, and to
a compressed memory of `memory_slots` M slots. When a segment's raw K/V are evicted (after the
next segment has used them) they are compressed at rate c = `compression_rate` into W / c slots
and written into the memory, a ring buffer of M / (W / c) such chunks (the oldest is
overwritten). `memory_slots=0` is the window-only baseline: previous segment + current segment.

    attn = CompressiveAttention(num_heads=4, segment_length=128, memory_slots=32,
                                compression_rate=16)
    memory = init_memory(batch, attn, embed_dim)            # zeros, segment 0
    out_BWE, memory = attn.apply(variables, x_BWE, memory)  # one segment at a time

Compression (`compression`): "mean" (strided mean pooling, no params) or "conv" (a learned
strided conv over time, kernel = stride = c, per-head-dim mixing shared over heads, separate for
k and v, initialised to mean pooling). RoPE (`rotary_fraction`) rotates q and k at their absolute
positions `segment * W + i` before anything is stored, so pooled keys keep their rotation.

Attention-reconstruction loss (the paper's auxiliary loss): with stop-gradient on the current
queries and the evicted raw K/V, `coef * mean((attn(q, k_ev, v_ev) - attn(q, f(k_ev), f(v_ev)))^2)`
is sown as `aux_loss/compression_reconstruction` (already multiplied by `reconstruction_coef`;
zero on segment 0, which evicts nothing). Only the conv compression has params it can train.

Memory (training): a dict `k, v [B, W, K, D]` (previous segment), `mem_k, mem_v [B, M, K, D]`
and `segment` (int32 scalar, the index of the next segment). Gradients flow through it within a
training sequence unless `memory_stop_gradient=True` (Transformer-XL's truncated backprop).

Decoding (`decode=True`, one token per call, `[B, 1, E]`, every row at the same position): the
`cache` collection holds `cur_k/cur_v [B, W, K, D]` (the segment being filled, slot `pos % W`),
`prev_k/prev_v [B, W, K, D]`, `mem_k/mem_v [B, M, K, D]` (the same ring buffer) and `index`
(int32 scalar). Shapes never change, so one compiled step serves every position and the cache is
`(2 W + M) * 2 * K * D` values per row whatever the length. Initialise with any `[B, 1, E]` input.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers import attention_ops
from nexus_jax.layers import rotary
from nexus_jax.layers.feedforward import default_kernel_init

Dtype = Any
COMPRESSIONS = ("mean", "conv")


def check_config(segment_length: int, memory_slots: int, compression_rate: int, compression: str):
  """Raises a ValueError naming the offending field; returns the slots per compressed segment."""
  if segment_length < 1:
    raise ValueError(f"segment_length must be >= 1; got {segment_length}.")
  if compression_rate < 1:
    raise ValueError(f"compression_rate must be >= 1; got {compression_rate}.")
  if memory_slots < 0:
    raise ValueError(f"memory_slots must be >= 0 (0: window only); got {memory_slots}.")
  if compression not in COMPRESSIONS:
    raise ValueError(f"compression={compression!r}; choose one of {COMPRESSIONS}.")
  if memory_slots == 0:
    return 0
  if segment_length % compression_rate:
    raise ValueError(
        f"compression_rate ({compression_rate}) must divide segment_length ({segment_length}): "
        f"an evicted segment compresses into segment_length / compression_rate slots."
    )
  chunk = segment_length // compression_rate
  if memory_slots % chunk:
    fix = max(chunk, memory_slots // chunk * chunk)
    raise ValueError(
        f"memory_slots ({memory_slots}) must be a multiple of segment_length / compression_rate "
        f"= {chunk} (whole compressed segments); e.g. memory_slots={fix}."
    )
  return chunk


def init_memory(batch: int, attn: "CompressiveAttention", embed_dim: int, dtype=jnp.float32):
  """The empty training memory of `attn` (segment 0): zeros of the shapes in the docstring."""
  num_kv, d = attn.dims(embed_dim)
  w, m = attn.segment_length, attn.memory_slots
  zeros = lambda n: jnp.zeros((batch, n, num_kv, d), dtype)
  return {
      "k": zeros(w),
      "v": zeros(w),
      "mem_k": zeros(m),
      "mem_v": zeros(m),
      "segment": jnp.zeros((), jnp.int32),
  }


class CompressiveAttention(nn.Module):
  """Compressive-Transformer attention over segments; see the module docstring."""

  num_heads: int
  segment_length: int = 128
  memory_slots: int = 0  # 0: window-only (previous + current segment)
  compression_rate: int = 4
  compression: str = "mean"  # mean | conv
  num_kv_heads: int | None = None  # None: = num_heads
  head_dim: int | None = None  # None: embed_dim // num_heads
  rotary_fraction: float = 1.0
  rope_theta: float = 10000.0
  reconstruction_coef: float = 1.0  # weight of the sown attention-reconstruction loss
  memory_stop_gradient: bool = False  # True: no gradient into the carried memory (TXL)
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def dims(self, embed_dim: int) -> tuple[int, int]:
    """`(num_kv_heads, head_dim)` after validating every field."""
    check_config(self.segment_length, self.memory_slots, self.compression_rate, self.compression)
    num_kv = self.num_kv_heads or self.num_heads
    if self.num_heads < 1 or num_kv < 1 or self.num_heads % num_kv:
      raise ValueError(
          f"num_kv_heads ({num_kv}) must be >= 1 and divide num_heads ({self.num_heads})."
      )
    if self.head_dim is None and embed_dim % self.num_heads:
      raise ValueError(f"embed dim {embed_dim} is not divisible by num_heads ({self.num_heads}).")
    rotary.rotary_dim(2, self.rotary_fraction)
    return num_kv, self.head_dim or embed_dim // self.num_heads

  def _proj(self, x, heads: int, d: int, name: str):
    y = nn.Dense(
        heads * d,
        use_bias=False,
        dtype=self.dtype or x.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name=name,
    )(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], heads, d)

  def _compressor_kernels(self, d: int):
    """The conv kernels `{"k", "v": [c, D, D]}` (initialised to mean pooling), or None."""
    if self.compression != "conv" or self.memory_slots == 0:
      return None
    c = self.compression_rate
    mean_init = lambda _, shape, dtype: jnp.broadcast_to(jnp.eye(d, dtype=dtype) / c, shape)
    return {n: self.param(f"compress_{n}", mean_init, (c, d, d), self.param_dtype) for n in "kv"}

  def _compress(self, x_BWKD, kernel):
    """`[B, W, K, D] -> [B, W / c, K, D]`: strided mean pooling (kernel None) or the conv."""
    b, w, k, d = x_BWKD.shape
    c = self.compression_rate
    x = x_BWKD.reshape(b, w // c, c, k, d)
    if kernel is None:
      return jnp.mean(x, axis=2)
    return jnp.einsum("bnckd,cde->bnke", x, kernel.astype(x.dtype))

  def _evict(self, kernels, prev_k, prev_v, mem_k, mem_v, segment):
    """Compresses the previous segment into ring chunk `(segment - 1) % n` (if segment >= 1)."""
    if self.memory_slots == 0:
      return mem_k, mem_v
    kernels = kernels or {"k": None, "v": None}
    ck, cv = self._compress(prev_k, kernels["k"]), self._compress(prev_v, kernels["v"])
    chunk = ck.shape[1]
    slot = jnp.remainder(segment - 1, self.memory_slots // chunk) * chunk
    write = lambda mem, c: jax.lax.dynamic_update_slice_in_dim(mem, c.astype(mem.dtype), slot, 1)
    evict = segment >= 1
    return (
        jnp.where(evict, write(mem_k, ck), mem_k),
        jnp.where(evict, write(mem_v, cv), mem_v),
    )

  def _attend(self, q, k_cur, v_cur, prev_k, prev_v, mem_k, mem_v, segment, cur_visible):
    """q `[B, T, H, D]` over `[memory, previous, current]`; `cur_visible [T, W]` bool."""
    t = q.shape[1]
    m, w = mem_k.shape[1], prev_k.shape[1]
    chunk = self.segment_length // self.compression_rate if m else 1
    mem_visible = jnp.arange(m) // chunk < jnp.maximum(segment - 1, 0)  # chunks written so far
    visible = jnp.concatenate(
        [
            jnp.broadcast_to(mem_visible, (t, m)),
            jnp.broadcast_to(segment >= 1, (t, w)),
            cur_visible,
        ],
        axis=-1,
    )
    k = jnp.concatenate([mem_k, prev_k, k_cur.astype(prev_k.dtype)], axis=1)
    v = jnp.concatenate([mem_v, prev_v, v_cur.astype(prev_v.dtype)], axis=1)
    return attention_ops.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=visible[None, None]
    )

  @nn.compact
  def __call__(self, x, memory=None):
    """Training: `x [B, W, E]` (one segment), `memory` (None: empty) -> `(out [B, W, E], memory)`.
    Decoding: `x [B, 1, E]` -> `(out [B, 1, E], None)`, state in the `cache` collection."""
    if x.ndim != 3:
      raise ValueError(f"CompressiveAttention input must be [batch, length, embed]; got {x.shape}.")
    b, t, e = x.shape
    num_kv, d = self.dims(e)
    kernels = self._compressor_kernels(d)
    w = self.segment_length
    if self.decode and t != 1:
      raise ValueError(f"decode=True takes one token per call ([batch, 1, embed]); got {x.shape}.")
    if not self.decode and t != w:
      raise ValueError(
          f"training input must be one segment [batch, segment_length={w}, embed]; got {x.shape}."
      )
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    q = self._proj(x, self.num_heads, d, "query")
    k = self._proj(x, num_kv, d, "key")
    v = self._proj(x, num_kv, d, "value")

    if self.decode:
      out = self._decode_step(kernels, q, k, v, num_kv, d)
      memory_out = None
    else:
      if memory is None:
        memory = init_memory(b, self, e, dtype)
      if self.memory_stop_gradient:
        memory = jax.tree.map(jax.lax.stop_gradient, memory)
      segment = memory["segment"]
      positions = jnp.broadcast_to(segment * w + jnp.arange(w, dtype=jnp.int32), (b, w))
      q, k = self._rope(q, positions), self._rope(k, positions)
      prev_k, prev_v = memory["k"], memory["v"]
      causal = jnp.tril(jnp.ones((w, w), bool))
      out = self._attend(q, k, v, prev_k, prev_v, memory["mem_k"], memory["mem_v"], segment, causal)
      mem_k, mem_v = self._evict(kernels, prev_k, prev_v, memory["mem_k"], memory["mem_v"], segment)
      if self.memory_slots:
        self._reconstruction_loss(kernels, q, prev_k, prev_v, segment)
      memory_out = {"k": k, "v": v, "mem_k": mem_k, "mem_v": mem_v, "segment": segment + 1}

    out = nn.Dense(
        e,
        use_bias=False,
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name="out",
    )(out.reshape(b * t, -1))
    return out.reshape(b, t, e), memory_out

  def _rope(self, x, positions):
    if self.rotary_fraction == 0:
      return x
    return rotary.apply_rope(
        x, positions, rotary_fraction=self.rotary_fraction, theta=self.rope_theta
    )

  def _reconstruction_loss(self, kernels, q, prev_k, prev_v, segment):
    """Sows `coef * mean((attn over raw evicted - attn over compressed)^2)`, 0 on segment 0."""
    q, pk, pv = (jax.lax.stop_gradient(a) for a in (q, prev_k, prev_v))
    kernels = kernels or {"k": None, "v": None}
    ck, cv = self._compress(pk, kernels["k"]), self._compress(pv, kernels["v"])
    pk, pv, ck, cv = (a.astype(q.dtype) for a in (pk, pv, ck, cv))
    full = attention_ops.dot_product_attention(q, pk, pv).astype(jnp.float32)
    comp = attention_ops.dot_product_attention(q, ck, cv).astype(jnp.float32)
    loss = self.reconstruction_coef * jnp.mean(jnp.square(full - comp))
    self.sow("aux_loss", "compression_reconstruction", jnp.where(segment >= 1, loss, 0.0))

  def _decode_step(self, kernels, q, k, v, num_kv: int, d: int):
    """One token at the cached `index`: write, attend, and at a segment's end evict + shift."""
    b, w, m = q.shape[0], self.segment_length, self.memory_slots
    initialised = self.has_variable("cache", "index")
    zeros = lambda n: (lambda: jnp.zeros((b, n, num_kv, d), k.dtype))
    cache = {
        name: self.variable("cache", name, zeros(n))
        for name, n in (
            ("cur_k", w),
            ("cur_v", w),
            ("prev_k", w),
            ("prev_v", w),
            ("mem_k", m),
            ("mem_v", m),
        )
    }
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    pos = index.value
    segment, i = pos // w, pos % w
    positions = jnp.full((b, 1), pos, jnp.int32)
    q, k = self._rope(q, positions), self._rope(k, positions)
    cur_k = jax.lax.dynamic_update_slice_in_dim(cache["cur_k"].value, k, i, 1)
    cur_v = jax.lax.dynamic_update_slice_in_dim(cache["cur_v"].value, v, i, 1)
    prev_k, prev_v = cache["prev_k"].value, cache["prev_v"].value
    mem_k, mem_v = cache["mem_k"].value, cache["mem_v"].value
    cur_visible = (jnp.arange(w) <= i)[None, :]
    out = self._attend(q, cur_k, cur_v, prev_k, prev_v, mem_k, mem_v, segment, cur_visible)
    new_mem_k, new_mem_v = self._evict(kernels, prev_k, prev_v, mem_k, mem_v, segment)
    if not initialised:  # init: create the empty cache, leave it untouched
      return out
    done = i == w - 1  # the segment is complete: evict the previous one, shift current -> prev
    cache["cur_k"].value, cache["cur_v"].value = cur_k, cur_v
    cache["prev_k"].value = jnp.where(done, cur_k, prev_k)
    cache["prev_v"].value = jnp.where(done, cur_v, prev_v)
    cache["mem_k"].value = jnp.where(done, new_mem_k, mem_k)
    cache["mem_v"].value = jnp.where(done, new_mem_v, mem_v)
    index.value = pos + 1
    return out
