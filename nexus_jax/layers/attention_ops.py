"""`dot_product_attention`: one entry point, four backends (xla | chunked | pallas | fourier).

Layout everywhere is `[batch, length, heads, head_dim]`; k and v may have fewer heads than q
(grouped-query / multi-query attention; the query head count must be a multiple of the kv head
count). Masking is expressed three ways, all optional and combinable:

- `causal=True`: query i attends keys j <= i (top-left aligned, as `jax.nn.dot_product_attention`).
- `segment_ids`: int `[B, T]` (self-attention, T == S) or a pair `(q_seg [B, T], kv_seg [B, S])`
  of non-negative ids; a query attends a key only when their ids are equal (sequence packing).
- `mask`: bool, either `[B, S]` (key padding: False keys are ignored) or 4-D and broadcastable to
  `[B, H, T, S]` (every dim full size or 1). Key padding is cheap on every backend; a 4-D mask
  is supported by `xla` and `chunked` only.

`bias` (float, 4-D, broadcastable to `[B, H, T, S]`) is added to the scaled scores (xla, chunked).
A query row with no visible key returns zeros on every attention backend.

Backends:
- `xla`: `jax.nn.dot_product_attention`; on GPU with 16-bit inputs and only causal/no masking it
  uses the cuDNN implementation. Materialises the `[B, H, T, S]` scores.
- `chunked`: pure-JAX blockwise online softmax with an explicit O(length)-memory backward
  (`kernels/chunked_attention.py`).
- `pallas`: our Pallas flash-attention kernel, forward and backward (`kernels/flash_attention.py`);
  `interpret=True` automatically on CPU. No 4-D mask or bias.
- `fourier`: not attention but frequency-domain token mixing (`kernels/fourier_mixing.py`):
  FNet mixing of v (`fourier_modes=None`) or FEDformer-style attention over the lowest
  `fourier_modes` frequencies of q/k/v. Non-causal, no masks, and no KV cache.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from nexus_jax.layers.kernels import chunked_attention as chunked_lib
from nexus_jax.layers.kernels import flash_attention as flash_lib
from nexus_jax.layers.kernels import fourier_mixing as fourier_lib

BACKENDS = ("xla", "chunked", "pallas", "fourier")
_PAD_SEGMENT = -1  # kv segment id given to padded keys; user segment ids are >= 0.

log = logging.getLogger(__name__)
# Configurations cuDNN rejected (already logged once each): (q shape, k shape, dtype, causal).
_CUDNN_REJECTED: set[tuple[Any, ...]] = set()


def _check_broadcastable(name: str, x, target: tuple[int, ...]):
  if x.ndim != 4 or any(d not in (1, t) for d, t in zip(x.shape, target)):
    raise ValueError(
        f"{name} has shape {x.shape}; expected 4 dims, each 1 or equal to "
        f"[batch, heads, q_len, kv_len] = {list(target)}."
    )


def _validate(q, k, v, causal, mask, segment_ids, bias, backend, block_sizes):
  if backend not in BACKENDS:
    raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, head_dim]; got shape {x.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k {k.shape} and v {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(
        f"q {q.shape} and k {k.shape} must agree on batch (dim 0) and head_dim " f"(dim 3)."
    )
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]}) for "
        f"grouped-query attention."
    )
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them first.")
  b, t, h, _ = q.shape
  s = k.shape[1]
  if mask is not None and mask.ndim != 2:
    _check_broadcastable("mask", mask, (b, h, t, s))
  if mask is not None and mask.ndim == 2 and mask.shape != (b, s):
    raise ValueError(
        f"A 2-D mask is a key-padding mask [batch, kv_len] = {(b, s)}; " f"got {mask.shape}."
    )
  if bias is not None:
    _check_broadcastable("bias", bias, (b, h, t, s))
  if segment_ids is not None:
    q_seg, kv_seg = (
        segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    )
    if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
      raise ValueError(
          f"segment_ids must be [batch, q_len]={(b, t)} and [batch, kv_len]="
          f"{(b, s)} (pass a (q_seg, kv_seg) pair when q_len != kv_len); got "
          f"{q_seg.shape} and {kv_seg.shape}."
      )
  if backend == "fourier":
    asked = [
        n
        for n, x in (
            ("causal", causal or None),
            ("mask", mask),
            ("segment_ids", segment_ids),
            ("bias", bias),
        )
        if x is not None
    ]
    if asked:
      raise ValueError(
          f"The fourier backend mixes all positions globally and cannot apply "
          f"{', '.join(asked)}; use backend='xla', 'chunked' or 'pallas'."
      )
  expected = {"chunked": chunked_lib.ChunkSizes, "pallas": flash_lib.BlockSizes}.get(backend)
  if expected is not None and block_sizes is not None and not isinstance(block_sizes, expected):
    raise ValueError(
        f"backend={backend!r} takes block_sizes={expected.__module__}."
        f"{expected.__name__}; got {type(block_sizes).__name__}."
    )
  if backend == "pallas" and ((mask is not None and mask.ndim == 4) or bias is not None):
    raise ValueError(
        "The pallas backend supports causal masking, segment_ids and a [batch, "
        "kv_len] key-padding mask, not a 4-D mask or bias; use backend='chunked'."
    )


def _segments(segment_ids, mask, b, t, s):
  """Canonical int32 `(q_seg [B, T], kv_seg [B, S])`, with key padding folded into kv_seg."""
  if segment_ids is None:
    q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  elif isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = (jnp.asarray(x, jnp.int32) for x in segment_ids)
  else:
    q_seg = kv_seg = jnp.asarray(segment_ids, jnp.int32)
  if mask is not None and mask.ndim == 2:
    kv_seg = jnp.where(mask, kv_seg, _PAD_SEGMENT)
  return q_seg, kv_seg


def dense_mask(
    t: int, s: int, *, causal: bool = False, segment_ids=None, mask=None, batch: int = 1
):
  """The boolean `[B|1, H|1, T, S]` mask equivalent to the masking arguments (None if none)."""
  out = None
  if causal:
    out = jnp.tril(jnp.ones((t, s), bool))[None, None]
  if segment_ids is not None or (mask is not None and mask.ndim == 2):
    q_seg, kv_seg = _segments(segment_ids, mask, batch, t, s)
    seg = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    out = seg if out is None else out & seg
  if mask is not None and mask.ndim == 4:
    out = mask if out is None else out & mask
  return out


def reference_attention(
    q, k, v, *, causal=False, mask=None, segment_ids=None, bias=None, scale=None
):
  """Plain float32 attention that materialises everything; the ground truth for tests."""
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  rep = lambda x: jnp.repeat(x.astype(jnp.float32), h // kv_heads, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), rep(k)) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  full = dense_mask(t, s, causal=causal, segment_ids=segment_ids, mask=mask, batch=b)
  if full is not None:
    logits = jnp.where(full, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhts,bshd->bthd", p, rep(v)).astype(q.dtype)


def _cudnn_usable(q) -> bool:
  """cuDNN flash attention is tried on GPU for 16-bit inputs."""
  return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)


def _cudnn_attention(q, k, v, scale, causal):
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
  )


def _xla_attention(q, k, v, causal, mask, segment_ids, bias, scale):
  b, t, h, _ = q.shape
  s = k.shape[1]
  plain = mask is None and segment_ids is None and bias is None
  if plain and _cudnn_usable(q):
    try:  # cuDNN flash attention; it rejects unsupported configurations at trace time.
      return _cudnn_attention(q, k, v, scale, causal)
    except (ValueError, NotImplementedError, RuntimeError) as err:
      config = (tuple(q.shape), tuple(k.shape), jnp.dtype(q.dtype).name, bool(causal))
      if config not in _CUDNN_REJECTED:
        _CUDNN_REJECTED.add(config)
        log.warning(
            "cuDNN attention rejected q %s, k/v %s, %s, causal=%s (%s: %s); using the XLA "
            "implementation for this configuration.",
            list(config[0]),
            list(config[1]),
            config[2],
            config[3],
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
  full = None
  if mask is not None or segment_ids is not None:
    full = dense_mask(t, s, causal=causal, segment_ids=segment_ids, mask=mask, batch=b)
    full = jnp.broadcast_to(full, (full.shape[0], full.shape[1], t, s))
  out = jax.nn.dot_product_attention(
      q,
      k,
      v,
      bias=bias,
      mask=full,
      scale=scale,
      is_causal=causal and full is None,
      implementation="xla",
  )
  if full is not None:  # rows with no visible key: zeros, like every other backend.
    any_key = jnp.swapaxes(jnp.any(full, axis=-1), 1, 2)  # [B|1, T, H|1]
    out = out * any_key[..., None].astype(out.dtype)
  return out


def dot_product_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    mask=None,
    segment_ids=None,
    bias=None,
    scale: float | None = None,
    backend: str = "xla",
    block_sizes: Any = None,
    fourier_modes: int | None = None,
):
  """Attention `q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D]` (H % K == 0).

  Args:
    causal: top-left aligned causal mask (query i sees keys 0..i).
    mask: `[B, S]` key-padding mask, or a 4-D mask broadcastable to `[B, H, T, S]`.
    segment_ids: `[B, T]` (needs T == S) or a pair `([B, T], [B, S])` of non-negative ids.
    bias: float bias broadcastable to `[B, H, T, S]`, added to the scaled scores.
    scale: score scale; defaults to `1/sqrt(D)`.
    backend: "xla" | "chunked" | "pallas" | "fourier" (see the module docstring).
    block_sizes: `ChunkSizes` for chunked, `flash_attention.BlockSizes` for pallas; None =
      default. Ignored by xla and fourier.
    fourier_modes: fourier backend only: None = FNet mixing, int = FEDformer-style attention over
      that many lowest frequencies.
  Returns:
    `[B, T, H, D]` in q's dtype.
  """
  _validate(q, k, v, causal, mask, segment_ids, bias, backend, block_sizes)
  b, t, _, d = q.shape
  s = k.shape[1]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  if backend == "xla":
    out = _xla_attention(q, k, v, causal, mask, segment_ids, bias, scale)
  elif backend == "fourier":
    out = fourier_lib.fourier_mixing(q, k, v, modes=fourier_modes)
  else:
    q_seg, kv_seg = _segments(segment_ids, mask, b, t, s)
    if backend == "chunked":
      sizes = chunked_lib.ChunkSizes() if block_sizes is None else block_sizes
      dense = mask if (mask is not None and mask.ndim == 4) else None
      out = chunked_lib.chunked_attention(
          q,
          k,
          v,
          q_seg,
          kv_seg,
          causal=causal,
          scale=scale,
          mask=dense,
          bias=bias,
          chunk_sizes=sizes,
      )
    else:
      sizes = block_sizes  # None: flash_lib.default_block_sizes (tuned tiles on GPU)
      if segment_ids is None and mask is None:
        q_seg = kv_seg = None  # lets the kernels skip segment loads entirely
      out = flash_lib.flash_attention(
          q, k, v, q_seg, kv_seg, causal=causal, scale=scale, block_sizes=sizes
      )
  chex.assert_shape(out, q.shape)
  return out
