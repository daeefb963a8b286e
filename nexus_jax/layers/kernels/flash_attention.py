"""Flash attention in Pallas: forward and backward kernels under `jax.custom_vjp`.

Design follows `jax.experimental.pallas.ops.gpu.attention` (FlashAttention-2), extended with:
- grouped-query attention by index mapping: a query head h reads kv head `h // G` through the
  BlockSpec index map, and the dk/dv kernel runs per kv head, looping over its G query heads, so
  k/v are never repeated in memory;
- separate query and key segment ids (cross attention, key padding folded into kv ids);
- arbitrary lengths: T and S are padded to the block sizes, padded keys are masked by position and
  padded query rows are sliced off; head_dim is zero-padded to a power of two (>= 16);
- causal block skipping in all three kernels; fully masked rows return zeros.

Grid layout (`pl.program_id`): forward and dq: `(query block, batch, query head)`;
dk/dv: `(key block, batch, kv head)`. The `delta = rowsum(o * do)` preprocessing is plain JAX.
The kernels only use `pl.ds` ref slicing, `lax.dot_general` and `fori_loop`, which lower through
Triton on GPU; `interpret=None` means interpret on CPU. A TPU (Mosaic) variant would keep the
kernels' bodies and swap the whole-sequence k/v blocks for a kv grid axis with VMEM scratch.

Shape names: B batch, T/S query/key length (Tp/Sp padded), H query heads, K kv heads, G = H // K,
D head dim. lse is `[B, H, Tp]` float32 (natural log).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two) for the three kernels plus GPU launch parameters."""

  block_q: int = 64
  block_k: int = 64
  block_q_dq: int = 32
  block_k_dq: int = 32
  block_q_dkv: int = 32
  block_k_dkv: int = 32
  num_warps: int | None = None  # None: 4 for head_dim <= 64 else 8
  num_stages: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self)[:6]:
      x = getattr(self, f.name)
      if x < 1 or x & (x - 1):
        raise ValueError(f"BlockSizes.{f.name}={x} must be a positive power of two.")


def default_block_sizes(head_dim: int, backend: str | None = None) -> BlockSizes:
  """Tiles used when the caller gives none.

  GPU with head_dim <= 128: q 128 / k 64 / backward 64, 4 warps, 3 pipeline stages -- the fastest
  forward+backward of the 14 configurations swept on an NVIDIA H200 (benchmarks/README.md,
  attention_gpu: 3.1x faster fwd+bwd than `BlockSizes()` at length 8192, bf16, head_dim 128).
  Elsewhere (CPU interpret mode, larger heads whose tiles would overflow shared memory):
  `BlockSizes()`.
  """
  backend = backend or jax.default_backend()
  if backend == "gpu" and head_dim <= 128:
    return BlockSizes(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3)
  return BlockSizes()


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  kv_len: int  # unpadded S
  groups: int  # G = H // K
  interpret: bool
  sizes: BlockSizes


def _dot(a, b, trans_a=False, trans_b=False):
  """2-D matmul with float32 accumulation; transposes are folded into the contraction."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _valid(st: _Static, q0, bq, k0, bk, q_seg, kv_seg, padded_k: bool):
  """`[bq, bk]` visibility of keys k0.. to queries q0.. (None when nothing is masked)."""
  valid = None
  if padded_k or st.causal:
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if padded_k:
      valid = k_pos < st.kv_len
    if st.causal:
      c = (q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)) >= k_pos
      valid = c if valid is None else valid & c
  if q_seg is not None:
    s = q_seg[:, None] == kv_seg[None, :]
    valid = s if valid is None else valid & s
  return valid


def _causal_k_blocks(st, q_end, bk, nk):
  """Number of key blocks a causal query tile ending at row `q_end` (exclusive) can see."""
  return jnp.minimum(nk, lax.div(q_end + bk - 1, bk)) if st.causal else nk


def _fwd_kernel(
    q_seg_ref,
    kv_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    st: _Static,
    bq: int,
    bk: int,
    padded_k: bool,
):
  qi = pl.program_id(0)
  q_BqD = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  nk = k_ref.shape[0] // bk

  def body(kj, carry):
    o, m, l = carry
    k0 = kj * bk
    k_BkD = k_ref[pl.ds(k0, bk), :]
    s = _dot(q_BqD, k_BkD, trans_b=True) * st.scale
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(k0, bk)]
    valid = _valid(st, qi * bq, bq, k0, bk, q_seg, kv_seg, padded_k)
    if valid is not None:
      s = jnp.where(valid, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    l = corr * l + jnp.sum(p, axis=1)
    o = corr[:, None] * o + _dot(p.astype(v_ref.dtype), v_ref[pl.ds(k0, bk), :])
    return o, m_new, l

  init = (
      jnp.zeros(q_BqD.shape, jnp.float32),
      jnp.full((bq,), -jnp.inf, jnp.float32),
      jnp.zeros((bq,), jnp.float32),
  )
  o, m, l = lax.fori_loop(0, _causal_k_blocks(st, (qi + 1) * bq, bk, nk), body, init)
  nonempty = l > 0.0
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), jnp.inf)


def _dq_kernel(
    q_seg_ref,
    kv_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    st: _Static,
    bq: int,
    bk: int,
    padded_k: bool,
):
  qi = pl.program_id(0)
  q_BqD, do_BqD = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  nk = k_ref.shape[0] // bk

  def body(kj, dq):
    k0 = kj * bk
    k_BkD = k_ref[pl.ds(k0, bk), :]
    s = _dot(q_BqD, k_BkD, trans_b=True) * st.scale
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(k0, bk)]
    valid = _valid(st, qi * bq, bq, k0, bk, q_seg, kv_seg, padded_k)
    p = jnp.exp(s - lse[:, None])
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    dp = _dot(do_BqD, v_ref[pl.ds(k0, bk), :], trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k_BkD.dtype), k_BkD)

  dq = lax.fori_loop(
      0, _causal_k_blocks(st, (qi + 1) * bq, bk, nk), body, jnp.zeros(q_BqD.shape, jnp.float32)
  )
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_seg_ref,
    kv_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    st: _Static,
    bq: int,
    bk: int,
    padded_k: bool,
):
  kj = pl.program_id(0)
  k0 = kj * bk
  k_BkD, v_BkD = k_ref[...], v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
  nq = q_ref.shape[0] // bq
  lo = lax.div(k0, bq) if st.causal else 0

  def body_for_group(g):
    def body(qi, carry):
      dk, dv = carry
      q0 = qi * bq
      q_BqD = q_ref[pl.ds(q0, bq), g, :]
      do_BqD = do_ref[pl.ds(q0, bq), g, :]
      s = _dot(q_BqD, k_BkD, trans_b=True) * st.scale
      q_seg = None if q_seg_ref is None else q_seg_ref[pl.ds(q0, bq)]
      valid = _valid(st, q0, bq, k0, bk, q_seg, kv_seg, padded_k)
      p = jnp.exp(s - lse_ref[g, pl.ds(q0, bq)][:, None])
      if valid is not None:
        p = jnp.where(valid, p, 0.0)
      dv = dv + _dot(p.astype(do_BqD.dtype), do_BqD, trans_a=True)
      dp = _dot(do_BqD, v_BkD, trans_b=True)
      ds = p * (dp - delta_ref[g, pl.ds(q0, bq)][:, None])
      dk = dk + _dot(ds.astype(q_BqD.dtype), q_BqD, trans_a=True)
      return dk, dv

    return body

  carry = (jnp.zeros(k_BkD.shape, jnp.float32), jnp.zeros(v_BkD.shape, jnp.float32))
  for g in range(st.groups):  # static: G query heads share this kv head
    carry = lax.fori_loop(lo, nq, body_for_group(g), carry)
  dk, dv = carry
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(st: _Static, d: int):
  if st.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top

  warps = st.sizes.num_warps or (4 if d <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=st.sizes.num_stages)


def _seg_specs(q_seg, block_q, q_index, kv_seg, block_k, k_index):
  if q_seg is None:
    return None, None
  return pl.BlockSpec((None, block_q), q_index), pl.BlockSpec((None, block_k), k_index)


def _forward(st: _Static, q, k, v, q_seg, kv_seg):
  b, tp, h, d = q.shape
  sp, g = k.shape[1], st.groups
  bq, bk = min(st.sizes.block_q, tp), min(st.sizes.block_k, sp)
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, j, hh: (j, i, hh, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda i, j, hh: (j, 0, hh // g, 0))
  seg_specs = _seg_specs(q_seg, bq, lambda i, j, hh: (j, i), kv_seg, sp, lambda i, j, hh: (j, 0))
  kernel = functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk, padded_k=sp != st.kv_len)
  return pl.pallas_call(
      kernel,
      grid=(tp // bq, b, h),
      in_specs=[*seg_specs, q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, j, hh: (j, hh, i))],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
      ],
      compiler_params=_compiler_params(st, d),
      interpret=st.interpret,
      name="nexus_flash_fwd",
  )(q_seg, kv_seg, q, k, v)


def _backward(st: _Static, res, do):
  q, k, v, q_seg, kv_seg, out, lse = res
  b, tp, h, d = q.shape
  sp, num_kv, g = k.shape[1], k.shape[2], st.groups
  padded_k = sp != st.kv_len
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))

  bq, bk = min(st.sizes.block_q_dq, tp), min(st.sizes.block_k_dq, sp)
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, j, hh: (j, i, hh, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda i, j, hh: (j, 0, hh // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, j, hh: (j, hh, i))
  seg_specs = _seg_specs(q_seg, bq, lambda i, j, hh: (j, i), kv_seg, sp, lambda i, j, hh: (j, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, bq=bq, bk=bk, padded_k=padded_k),
      grid=(tp // bq, b, h),
      in_specs=[*seg_specs, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(st, d),
      interpret=st.interpret,
      name="nexus_flash_dq",
  )(q_seg, kv_seg, q, k, v, do, lse, delta)

  bq, bk = min(st.sizes.block_q_dkv, tp), min(st.sizes.block_k_dkv, sp)
  q_spec = pl.BlockSpec((None, tp, g, d), lambda i, j, kh: (j, 0, kh, 0))
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda i, j, kh: (j, i, kh, 0))
  rows_spec = pl.BlockSpec((None, g, tp), lambda i, j, kh: (j, kh, 0))
  seg_specs = _seg_specs(q_seg, tp, lambda i, j, kh: (j, 0), kv_seg, bk, lambda i, j, kh: (j, i))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, bq=bq, bk=bk, padded_k=padded_k),
      grid=(sp // bk, b, num_kv),
      in_specs=[*seg_specs, q_spec, kv_spec, kv_spec, q_spec, rows_spec, rows_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(st, d),
      interpret=st.interpret,
      name="nexus_flash_dkv",
  )(q_seg, kv_seg, q, k, v, do, lse, delta)
  return dq, dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_seg, kv_seg):
  return _forward(st, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(st, q, k, v, q_seg, kv_seg):
  out, lse = _forward(st, q, k, v, q_seg, kv_seg)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


_flash.defvjp(_flash_fwd, _backward)


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _pad(x, axis: int, size: int):
  if x is None or x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def flash_attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    q_seg_BT=None,
    kv_seg_BS=None,
    *,
    causal: bool,
    scale: float,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
  """Pallas flash attention `[B, T, H, D] x [B, S, K, D] -> [B, T, H, D]`, differentiable.

  Segment ids are int32 `[B, T]`/`[B, S]` (both or neither); a query sees a key only when the ids
  are equal. `causal` is top-left aligned. `interpret=None` interprets on CPU.
  `block_sizes=None` takes `default_block_sizes(D)`.
  """
  b, t, h, d = q_BTHD.shape
  s, num_kv = k_BSKD.shape[1], k_BSKD.shape[2]
  if (q_seg_BT is None) != (kv_seg_BS is None):
    raise ValueError("flash_attention needs both q and kv segment ids, or neither.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  sz = default_block_sizes(d) if block_sizes is None else block_sizes
  # Pad lengths so every kernel's tiles divide them (all block sizes are powers of two); at
  # least 16 rows, the smallest tile a Triton dot accepts.
  q_tile = max(
      16, *(min(x, pl.next_power_of_2(t)) for x in (sz.block_q, sz.block_q_dq, sz.block_q_dkv))
  )
  k_tile = max(
      16, *(min(x, pl.next_power_of_2(s)) for x in (sz.block_k, sz.block_k_dq, sz.block_k_dkv))
  )
  tp, sp = _round_up(t, q_tile), _round_up(s, k_tile)
  dp = max(16, pl.next_power_of_2(d))
  st = _Static(
      causal=causal,
      scale=float(scale),
      kv_len=s,
      groups=h // num_kv,
      interpret=bool(interpret),
      sizes=sz,
  )
  q = _pad(_pad(q_BTHD, 1, tp), 3, dp)
  k = _pad(_pad(k_BSKD, 1, sp), 3, dp)
  v = _pad(_pad(v_BSKD, 1, sp), 3, dp)
  q_seg = None if q_seg_BT is None else _pad(q_seg_BT.astype(jnp.int32), 1, tp)
  kv_seg = None if kv_seg_BS is None else _pad(kv_seg_BS.astype(jnp.int32), 1, sp)
  return _flash(st, q, k, v, q_seg, kv_seg)[:, :t, :, :d]
