"""Memory-efficient attention in plain JAX: online softmax over key blocks, O(length) memory.

Forward and backward are written explicitly under `jax.custom_vjp` (FlashAttention-2 style), so the
backward pass recomputes scores block by block instead of storing the `[T, S]` probability matrix.
Queries are processed one block at a time (`lax.map`), keys in an inner loop whose bound shrinks
under a causal mask (blocks strictly above the diagonal are never visited).

Shape names: B batch, T query length, S key length, H query heads, K kv heads, G = H // K query
heads per kv head, D head dim. Grouped-query attention never repeats k/v: q is viewed as
`[B, T, K, G, D]` and contracted against `[B, S, K, D]`.

Inputs are assumed validated and canonicalised by `attention_ops.dot_product_attention`:
  q_seg_BT / kv_seg_BS: int32 segment ids (a query attends a key only when they are equal),
  mask: bool `[B|1, H|1, T|1, S]` or None, bias: float `[B|1, H|1, T|1, S]` or None.
Fully masked query rows produce zeros (and zero gradients).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
  """Tunables of the chunked backend: query rows and key columns processed per step."""

  block_q: int = 512
  block_k: int = 512


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _pad_axis(x, axis: int, size: int, value=0):
  if x is None or x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def _slice_qk(x, q0, bq, k0, bk):
  """Block `[.., q0:q0+bq, k0:k0+bk]` of a `[B|1, H|1, T|1, S]` array (size-1 T is kept)."""
  if x.shape[2] != 1:
    x = lax.dynamic_slice_in_dim(x, q0, bq, axis=2)
  return lax.dynamic_slice_in_dim(x, k0, bk, axis=3)


def _to_groups(x_bhqk, num_kv: int):
  """`[B|1, H|1, q, k]` -> `[B|1, K|1, G|1, q, k]` to line up with `[B, K, G, q, k]` scores."""
  b, h, q, k = x_bhqk.shape
  if h == 1:
    return x_bhqk[:, :, None]
  return x_bhqk.reshape(b, num_kv, h // num_kv, q, k)


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  block_q: int
  block_k: int
  kv_len: int  # unpadded S: keys at positions >= kv_len are padding


def _scores(st: _Static, q_BqKGD, k_BkKD, q0, k0, q_seg, kv_seg, mask, bias):
  """Scaled, biased, masked scores `[B, K, G, bq, bk]` (f32) and the validity mask."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_BqKGD, k_BkKD, preferred_element_type=jnp.float32)
  s = s * st.scale
  num_kv = k_BkKD.shape[2]
  if bias is not None:
    s = s + _to_groups(_slice_qk(bias, q0, st.block_q, k0, st.block_k), num_kv).astype(jnp.float32)
  q_pos = q0 + jnp.arange(st.block_q)
  k_pos = k0 + jnp.arange(st.block_k)
  valid = (k_pos < st.kv_len)[None, :]
  if st.causal:
    valid = valid & (q_pos[:, None] >= k_pos[None, :])
  valid = valid[None, None, None]  # [1, 1, 1, bq, bk]
  qs = lax.dynamic_slice_in_dim(q_seg, q0, st.block_q, axis=1)
  ks = lax.dynamic_slice_in_dim(kv_seg, k0, st.block_k, axis=1)
  valid = valid & (qs[:, None, None, :, None] == ks[:, None, None, None, :])
  if mask is not None:
    valid = valid & _to_groups(_slice_qk(mask, q0, st.block_q, k0, st.block_k), num_kv)
  return jnp.where(valid, s, MASK_VALUE), valid


def _num_k_blocks(st: _Static, qi, nk: int):
  """Key blocks visited by query block `qi`: all of them, or up to the diagonal when causal."""
  if not st.causal:
    return nk
  return jnp.minimum(nk, ((qi + 1) * st.block_q + st.block_k - 1) // st.block_k)


def _forward(st: _Static, q, k, v, q_seg, kv_seg, mask, bias):
  """Padded inputs -> (out `[B, Tp, H, D]` in q.dtype, lse `[B, K, G, Tp]` f32)."""
  b, tp, h, d = q.shape
  sp, num_kv = k.shape[1], k.shape[2]
  g = h // num_kv
  nq, nk = tp // st.block_q, sp // st.block_k
  q5 = q.reshape(b, tp, num_kv, g, d)

  def one_q_block(qi):
    q0 = qi * st.block_q
    q_blk = lax.dynamic_slice_in_dim(q5, q0, st.block_q, axis=1)

    def body(kj, carry):
      o, m, l = carry
      k0 = kj * st.block_k
      k_blk = lax.dynamic_slice_in_dim(k, k0, st.block_k, axis=1)
      v_blk = lax.dynamic_slice_in_dim(v, k0, st.block_k, axis=1)
      s, valid = _scores(st, q_blk, k_blk, q0, k0, q_seg, kv_seg, mask, bias)
      m_new = jnp.maximum(m, s.max(-1))
      corr = jnp.exp(m - m_new)
      p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
      l = corr * l + p.sum(-1)
      pv = jnp.einsum(
          "bkgqs,bskd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
      )
      return corr[..., None] * o + pv, m_new, l

    init = (
        jnp.zeros((b, num_kv, g, st.block_q, d), jnp.float32),
        jnp.full((b, num_kv, g, st.block_q), -jnp.inf, jnp.float32),
        jnp.zeros((b, num_kv, g, st.block_q), jnp.float32),
    )
    o, m, l = lax.fori_loop(0, _num_k_blocks(st, qi, nk), body, init)
    nonempty = l > 0.0
    o = o / jnp.where(nonempty, l, 1.0)[..., None]
    # Fully masked rows get lse=+inf so that exp(s - lse) == 0 in the backward pass.
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
    return o, lse

  o, lse = lax.map(one_q_block, jnp.arange(nq))  # [nq, B, K, G, bq, D], [nq, B, K, G, bq]
  out = jnp.einsum("nbkgqd->bnqkgd", o).reshape(b, tp, h, d).astype(q.dtype)
  lse = jnp.einsum("nbkgq->bkgnq", lse).reshape(b, num_kv, g, tp)
  return out, lse


def _backward(st: _Static, res, do):
  q, k, v, q_seg, kv_seg, mask, bias, out, lse = res
  b, tp, h, d = q.shape
  sp, num_kv = k.shape[1], k.shape[2]
  g = h // num_kv
  nq, nk = tp // st.block_q, sp // st.block_k
  q5 = q.reshape(b, tp, num_kv, g, d)
  do5 = do.reshape(b, tp, num_kv, g, d)
  delta = jnp.einsum(
      "btkgd,btkgd->bkgt", out.reshape(q5.shape).astype(jnp.float32), do5.astype(jnp.float32)
  )

  def probs_and_ds(q0, k0, q_blk, do_blk, k_blk, v_blk):
    s, valid = _scores(st, q_blk, k_blk, q0, k0, q_seg, kv_seg, mask, bias)
    lse_blk = lax.dynamic_slice_in_dim(lse, q0, st.block_q, axis=3)
    p = jnp.where(valid, jnp.exp(s - lse_blk[..., None]), 0.0)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - lax.dynamic_slice_in_dim(delta, q0, st.block_q, axis=3)[..., None])
    return p, ds

  # dq: one query block at a time, loop over key blocks (same bounds as the forward pass).
  def dq_block(qi):
    q0 = qi * st.block_q
    q_blk = lax.dynamic_slice_in_dim(q5, q0, st.block_q, axis=1)
    do_blk = lax.dynamic_slice_in_dim(do5, q0, st.block_q, axis=1)

    def body(kj, dq):
      k0 = kj * st.block_k
      k_blk = lax.dynamic_slice_in_dim(k, k0, st.block_k, axis=1)
      v_blk = lax.dynamic_slice_in_dim(v, k0, st.block_k, axis=1)
      _, ds = probs_and_ds(q0, k0, q_blk, do_blk, k_blk, v_blk)
      return dq + jnp.einsum(
          "bkgqs,bskd->bqkgd", ds.astype(k.dtype), k_blk, preferred_element_type=jnp.float32
      )

    dq = lax.fori_loop(
        0, _num_k_blocks(st, qi, nk), body, jnp.zeros((b, st.block_q, num_kv, g, d), jnp.float32)
    )
    return dq * st.scale

  dq = lax.map(dq_block, jnp.arange(nq))  # [nq, B, bq, K, G, D]
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, tp, h, d).astype(q.dtype)

  # dk, dv (and dbias): one key block at a time, loop over the query blocks that can see it.
  def dkv_block(kj):
    k0 = kj * st.block_k
    k_blk = lax.dynamic_slice_in_dim(k, k0, st.block_k, axis=1)
    v_blk = lax.dynamic_slice_in_dim(v, k0, st.block_k, axis=1)

    def body(qi, carry):
      dk, dv, db = carry
      q0 = qi * st.block_q
      q_blk = lax.dynamic_slice_in_dim(q5, q0, st.block_q, axis=1)
      do_blk = lax.dynamic_slice_in_dim(do5, q0, st.block_q, axis=1)
      p, ds = probs_and_ds(q0, k0, q_blk, do_blk, k_blk, v_blk)
      dv = dv + jnp.einsum(
          "bkgqs,bqkgd->bskd", p.astype(do.dtype), do_blk, preferred_element_type=jnp.float32
      )
      dk = dk + jnp.einsum(
          "bkgqs,bqkgd->bskd", ds.astype(q.dtype), q_blk, preferred_element_type=jnp.float32
      )
      if db is not None:
        db_blk = _reduce_to_bias(ds, bias.shape)
        if bias.shape[2] == 1:
          db = db + db_blk
        else:
          db = lax.dynamic_update_slice_in_dim(db, db_blk, q0, axis=2)
      return dk, dv, db

    lo = (k0 // st.block_q) if st.causal else 0
    db0 = None
    if bias is not None:
      db0 = jnp.zeros(bias.shape[:3] + (st.block_k,), jnp.float32)
    zeros = jnp.zeros((b, st.block_k, num_kv, d), jnp.float32)
    dk, dv, db = lax.fori_loop(lo, nq, body, (zeros, zeros, db0))
    return dk * st.scale, dv, db

  dk, dv, db = lax.map(dkv_block, jnp.arange(nk))  # [nk, B, bk, K, D], .., [nk, Bb, Hb, Tb, bk]
  dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape).astype(k.dtype)
  dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape).astype(v.dtype)
  if db is not None:
    db = jnp.moveaxis(db, 0, 3).reshape(bias.shape).astype(bias.dtype)
  return dq, dk, dv, None, None, None, db


def _reduce_to_bias(ds_BKGqk, bias_shape):
  """Sum a `[B, K, G, bq, bk]` score cotangent over the axes a bias broadcasts along."""
  b, num_kv, g, bq, bk = ds_BKGqk.shape
  ds = ds_BKGqk.reshape(b, num_kv * g, bq, bk)
  axes = tuple(i for i in range(3) if bias_shape[i] == 1)
  return ds.sum(axis=axes, keepdims=True) if axes else ds


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(st, q, k, v, q_seg, kv_seg, mask, bias):
  return _forward(st, q, k, v, q_seg, kv_seg, mask, bias)[0]


def _chunked_fwd(st, q, k, v, q_seg, kv_seg, mask, bias):
  out, lse = _forward(st, q, k, v, q_seg, kv_seg, mask, bias)
  return out, (q, k, v, q_seg, kv_seg, mask, bias, out, lse)


_chunked.defvjp(_chunked_fwd, _backward)


def chunked_attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    q_seg_BT,
    kv_seg_BS,
    *,
    causal: bool,
    scale: float,
    mask=None,
    bias=None,
    chunk_sizes: ChunkSizes = ChunkSizes(),
):
  """Blockwise attention `[B, T, H, D] x [B, S, K, D] -> [B, T, H, D]` with O(T + S) memory.

  Arbitrary T and S: inputs are padded to the block sizes, padded keys are masked and padded
  query rows are sliced off. `causal` aligns query i with key i (top-left).
  """
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  bq = min(chunk_sizes.block_q, _round_up(t, 8))
  bk = min(chunk_sizes.block_k, _round_up(s, 8))
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  st = _Static(causal=causal, scale=float(scale), block_q=bq, block_k=bk, kv_len=s)
  pad_q = lambda x, axis: _pad_axis(x, axis, tp)
  pad_k = lambda x, axis: _pad_axis(x, axis, sp)
  if mask is not None:
    mask = pad_k(mask if mask.shape[2] == 1 else pad_q(mask, 2), 3)
  if bias is not None:
    bias = pad_k(bias if bias.shape[2] == 1 else pad_q(bias, 2), 3)
  out = _chunked(
      st,
      pad_q(q_BTHD, 1),
      pad_k(k_BSKD, 1),
      pad_k(v_BSKD, 1),
      pad_q(q_seg_BT, 1),
      pad_k(kv_seg_BS, 1),
      mask,
      bias,
  )
  return out[:, :t]
