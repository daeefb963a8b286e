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

Other memories (`memory`, `layers/segment_memory.py`), written at the same moment (eviction) and
read with the same timing (segment s sees segments <= s - 2 through the memory):
  "summary": the M slots are learned summary tokens (`summary_update`), visible from segment 2;
  "titans":  no slots; a Titans neural memory written with the evicted segment's INPUTS, its
             read added to the output. Training memory + `x [B, W, E]` and `titans` (the memory
             MLP's weights and momenta); decoding cache + `cur_x / prev_x [B, W, E]` and
             `titans_w1 / titans_w2 / *_momentum` (constant shapes again);
  "none":    window only, whatever `memory_slots` says.
The attention-reconstruction loss belongs to "compressive" only.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers import attention_ops
from nexus_jax.layers import rotary
from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.segment_memory import (
    MEMORIES,
    TitansSegmentMemory,
    summary_update,
    titans_state_shapes,
)

Dtype = Any
COMPRESSIONS = ("mean", "conv")


def check_config(
    segment_length: int,
    memory_slots: int,
    compression_rate: int,
    compression: str,
    memory: str = "compressive",
):
  """Raises a ValueError naming the offending field; returns the slots per compressed segment
  (compressive), 1 (summary) or 0 (no slot memory: window only, or titans)."""
  if segment_length < 1:
    raise ValueError(f"segment_length must be >= 1; got {segment_length}.")
  if memory not in MEMORIES:
    raise ValueError(f"memory={memory!r}; choose one of {MEMORIES}.")
  if memory == "summary":
    if memory_slots < 1:
      raise ValueError(
          f"memory_slots must be >= 1 summary slots for memory='summary'; got {memory_slots}."
      )
    return 1
  if memory in ("titans", "none"):
    if memory_slots < 0:
      raise ValueError(f"memory_slots must be >= 0; got {memory_slots}.")
    return 0
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
  """The empty training memory of `attn` (segment 0): zeros of the shapes in the docstring
  (titans: + `x [B, W, E]`, the previous segment's inputs, and the memory MLP's state)."""
  num_kv, d = attn.dims(embed_dim)
  w, m = attn.segment_length, attn.slots()
  zeros = lambda n: jnp.zeros((batch, n, num_kv, d), dtype)
  memory = {
      "k": zeros(w),
      "v": zeros(w),
      "mem_k": zeros(m),
      "mem_v": zeros(m),
      "segment": jnp.zeros((), jnp.int32),
  }
  if attn.memory == "titans":
    memory["x"] = jnp.zeros((batch, w, embed_dim), dtype)
    shapes = titans_state_shapes(batch, num_kv, d, attn.titans_hidden_mult)
    memory["titans"] = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
  return memory


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
  # What older segments leave behind (layers/segment_memory.py): "compressive" (M pooled slots;
  # M = 0 is window-only), "summary" (M learned summary slots), "titans" (a neural memory
  # written with each evicted segment), "none" (window only).
  memory: str = "compressive"
  titans_hidden_mult: int = 2  # titans memory MLP hidden width / head_dim
  titans_chunk: int = 16  # titans inner-update chunk (tokens per parallel gradient step)
  titans_max_lr: float = 0.02  # titans inner learning-rate bound (segment_memory.py)
  titans_truncate: bool = True  # titans: outer gradient through the latest write only
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def slots(self) -> int:
    """Attended memory slots: M for "compressive" / "summary", else 0."""
    return self.memory_slots if self.memory in ("compressive", "summary") else 0

  def dims(self, embed_dim: int) -> tuple[int, int]:
    """`(num_kv_heads, head_dim)` after validating every field."""
    check_config(
        self.segment_length,
        self.memory_slots,
        self.compression_rate,
        self.compression,
        self.memory,
    )
    if self.memory == "titans" and (self.titans_hidden_mult < 1 or self.titans_chunk < 1):
      raise ValueError(
          f"titans_hidden_mult ({self.titans_hidden_mult}) and titans_chunk "
          f"({self.titans_chunk}) must be >= 1."
      )
    if self.memory == "titans" and not self.titans_max_lr > 0:
      raise ValueError(f"titans_max_lr must be > 0; got {self.titans_max_lr}.")
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
    if self.memory != "compressive" or self.compression != "conv" or self.memory_slots == 0:
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

  def _summary_queries(self, num_kv: int, d: int):
    if self.memory != "summary":
      return None
    init = nn.initializers.normal(1.0)
    return self.param("summary_q", init, (self.memory_slots, num_kv, d), self.param_dtype)

  def _titans(self, num_kv: int, d: int, e: int):
    if self.memory != "titans":
      return None
    return TitansSegmentMemory(
        num_heads=num_kv,
        head_dim=d,
        embed_dim=e,
        hidden_mult=self.titans_hidden_mult,
        chunk_size=self.titans_chunk,
        max_lr=self.titans_max_lr,
        truncate=self.titans_truncate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name="titans",
    )

  def _evict(self, kernels, prev_k, prev_v, mem_k, mem_v, segment):
    """Writes the previous segment into the memory (if segment >= 1): compressive: ring chunk
    `(segment - 1) % n`; summary: `summary_update` (kernels = the summary queries)."""
    if self.slots() == 0:
      return mem_k, mem_v
    if self.memory == "summary":
      new_k, new_v = summary_update(kernels, mem_k, mem_v, prev_k, prev_v, segment >= 2)
      evict = segment >= 1
      return jnp.where(evict, new_k, mem_k), jnp.where(evict, new_v, mem_v)
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
    if self.memory == "summary":  # written from segment 1 on, so read from segment 2 on
      mem_visible = jnp.broadcast_to(segment >= 2, (m,))
    else:
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
    if self.memory == "summary":
      kernels = self._summary_queries(num_kv, d)
    titans = self._titans(num_kv, d, e)
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
      out, mem_read = self._decode_step(kernels, titans, x, q, k, v, num_kv, d)
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
      if self.memory == "compressive" and self.memory_slots:
        self._reconstruction_loss(kernels, q, prev_k, prev_v, segment)
      memory_out = {"k": k, "v": v, "mem_k": mem_k, "mem_v": mem_v, "segment": segment + 1}
      mem_read = None
      if titans is not None:
        mem_read = titans.read(x, memory["titans"], segment)
        memory_out["titans"] = titans.write(memory["x"], memory["titans"], segment)
        memory_out["x"] = x

    out = nn.Dense(
        e,
        use_bias=False,
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name="out",
    )(out.reshape(b * t, -1))
    out = out.reshape(b, t, e)
    if mem_read is not None:
      out = out + mem_read.astype(out.dtype)
    return out, memory_out

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

  def _decode_step(self, kernels, titans, x, q, k, v, num_kv: int, d: int):
    """One token at the cached `index`: write, attend, and at a segment's end evict + shift.
    Returns `(attention out [B, 1, H, D], titans read [B, 1, E] or None)`."""
    b, w, m = q.shape[0], self.segment_length, self.slots()
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
    mem_read = None
    if titans is not None:
      e = x.shape[-1]
      shapes = titans_state_shapes(b, num_kv, d, self.titans_hidden_mult)
      t_state = {
          n: self.variable("cache", f"titans_{n}", lambda s=s: jnp.zeros(s, jnp.float32))
          for n, s in shapes.items()
      }
      xs = {
          n: self.variable("cache", n, lambda: jnp.zeros((b, w, e), x.dtype))
          for n in ("cur_x", "prev_x")
      }
      state = {n: var.value for n, var in t_state.items()}
      if not initialised:
        titans(x, state, segment)  # create the memory's params
      mem_read = titans.read(x, state, segment)
      cur_x = jax.lax.dynamic_update_slice_in_dim(xs["cur_x"].value, x, i, 1)
    if not initialised:  # init: create the empty cache, leave it untouched
      return out, mem_read
    done = i == w - 1  # the segment is complete: evict the previous one, shift current -> prev
    if titans is not None:
      # Segment 0 makes `write` skip its inner update (a lax.cond inside), so only a finished
      # segment pays for it; the result is kept only then.
      written = titans.write(xs["prev_x"].value, state, jnp.where(done, segment, 0))
      for n, var in t_state.items():
        var.value = jnp.where(done, written[n], state[n])
      xs["cur_x"].value = cur_x
      xs["prev_x"].value = jnp.where(done, cur_x, xs["prev_x"].value)
    cache["cur_k"].value, cache["cur_v"].value = cur_k, cur_v
    cache["prev_k"].value = jnp.where(done, cur_k, prev_k)
    cache["prev_v"].value = jnp.where(done, cur_v, prev_v)
    cache["mem_k"].value = jnp.where(done, new_mem_k, mem_k)
    cache["mem_v"].value = jnp.where(done, new_mem_v, mem_v)
    index.value = pos + 1
    return out, mem_read
