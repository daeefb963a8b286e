"""8-bit AdamW: both Adam moments stored as uint8 codes of a dynamic map, block-wise scaled.

    tx = adamw_8bit(schedule, b1=0.9, b2=0.999, weight_decay=0.01, mask=weight_decay_mask)
    state = tx.init(params)        # m, v: {"codes": u8[*p.shape], "absmax": f32[*p.shape[:-1], C/b]}

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022; bitsandbytes).
Optax has no quantised-state optimizer (`adamw(mu_dtype=...)` covers the first moment only).

- **Dynamic map** (`dynamic_map`): 256 code values spread over 7 decades (an exponent that
  shrinks as the fraction grows), signed for m, unsigned for v. Small moments keep relative
  precision; a *linear* map rounds every entry below `absmax / 510` to zero, and a zero second
  moment next to a non-zero first moment turns `m / (sqrt(v) + eps)` into `m / eps` (tested).
- **Blocks along each param's own trailing axes**: a weight `[..., C]` is cut into blocks of `b`
  consecutive entries of its last axis (`b` = the largest divisor of C that is <= `block_size`;
  when C < 32 the last axes are merged, `block_layout`); each block stores its float32 absmax.
  Codes have the param's own shape and the absmax its leading dims, so the optimizer state takes
  the param's sharding (no flattening across the leading axes).
- Every step dequantises (code value x absmax), runs the float32 Adam update, and requantises to
  the nearest code -- all inside the jitted step. Params smaller than `min_size` elements, with
  fewer than 2 dims, or whose trailing axes have no divisor >= `MIN_BLOCK` keep float32 moments (their
  state is negligible and the rounding of tiny tensors is not).
- `exclude`: regexes on the "/"-joined param path whose moments stay float32, through
  `optax.multi_transform`. Default: MoE routers (tiny, and their logits decide discrete routing).
  The paper also keeps embeddings in 32 bits ("stable embedding"); `exclude=("embed", "router")`
  does that. On the byte-level LM benchmark (benchmarks/adam8bit_lm.py, 400 steps) 8-bit
  embedding moments changed valid bits/byte by +0.001 vs float32 ones, while float32 ones cost
  0.045x of the float32 optimizer state (0.307x instead of 0.262x), so they are opt-in.

The state is plain arrays (uint8 + float32), so Orbax checkpoints the codes as they are.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_SIZE = 4096
MIN_BLOCK = 32  # a last axis without a divisor this large keeps float32 moments
DEFAULT_EXCLUDE = (r"router",)


def dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """The 256 sorted code values of bitsandbytes' dynamic data type (in [-1, 1] or [0, 1])."""
  data: list[float] = []
  non_sign_bits = total_bits - 1
  additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
  for i in range(max_exponent_bits):
    items = (
        2 ** (i + non_sign_bits - max_exponent_bits) + 1
        if signed
        else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
    )
    bounds = np.linspace(0.1, 1, int(items))
    means = (bounds[:-1] + bounds[1:]) / 2.0
    scale = 10.0 ** (-(max_exponent_bits - 1) + i)
    data += (scale * means).tolist()
    if signed:
      data += (-scale * means).tolist()
  if additional > 0:
    bounds = np.linspace(0.1, 1, additional + 1)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    data += (scale * means).tolist()
    if signed:
      data += (-scale * means).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (2**total_bits - len(data))
  return np.sort(np.asarray(data, np.float32))


def linear_map(signed: bool) -> np.ndarray:
  """256 evenly spaced code values (the naive alternative the dynamic map is compared with)."""
  return np.linspace(-1.0 if signed else 0.0, 1.0, 256, dtype=np.float32)


def block_layout(shape: Sequence[int], block_size: int) -> tuple[int, int]:
  """(k, b): blocks of `b` consecutive entries of the last `k` axes merged (0, 0 = float32).

  k is the fewest trailing axes holding >= MIN_BLOCK entries (at least one leading axis stays
  whole), b the largest divisor of their size that is <= `block_size`; an attention kernel
  `[E, H, D]` with a small head dim D is blocked over `H x D`. Vectors get (0, 0).
  """
  if len(shape) < 2:
    return 0, 0
  for k in range(1, len(shape)):
    c = math.prod(int(d) for d in shape[-k:])
    if c >= MIN_BLOCK or k == len(shape) - 1:
      best = max(d for d in range(1, min(c, block_size) + 1) if c % d == 0)
      return (k, best) if best >= MIN_BLOCK else (0, 0)
  return 0, 0


def quantize(
    x: jax.Array, code: jax.Array, block: int, axes: int = 1
) -> tuple[jax.Array, jax.Array]:
  """`x [..., *T]` (T = the last `axes` axes) -> (codes u8 like x, absmax f32 [..., prod(T) / block]).

  Each block of `block` consecutive entries of the flattened T is scaled by its absmax and
  rounded to the nearest value of `code`.
  """
  lead = x.shape[: x.ndim - axes]
  blocks = x.reshape(*lead, -1, block)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  hi = jnp.clip(jnp.searchsorted(code, normed), 1, code.shape[0] - 1)
  lo = hi - 1
  nearer_lo = jnp.abs(normed - code[lo]) <= jnp.abs(code[hi] - normed)
  idx = jnp.where(nearer_lo, lo, hi).astype(jnp.uint8)
  return idx.reshape(x.shape), absmax.astype(jnp.float32)


def dequantize(codes: jax.Array, absmax: jax.Array, code: jax.Array) -> jax.Array:
  """Inverse of `quantize` (the blocked axes follow from the ranks): float32 like `codes`."""
  values = code[codes.astype(jnp.int32)].reshape(*absmax.shape, -1)
  return (values * absmax[..., None]).reshape(codes.shape)


class QuantizedMoment(NamedTuple):
  codes: jax.Array  # uint8, the param's shape
  absmax: jax.Array  # float32, the param's shape with the last axis divided by the block


class ScaleByAdam8bitState(NamedTuple):
  count: chex.Array
  mu: Any  # per leaf: QuantizedMoment, or a float32 array for small / unblockable params
  nu: Any


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_size: int = DEFAULT_MIN_SIZE,
    map_kind: str = "dynamic",
) -> optax.GradientTransformation:
  """Adam's scaling (`optax.scale_by_adam` semantics, bias-corrected) with 8-bit moments.

  map_kind: "dynamic" (the paper's) or "linear" (for comparison only; see the module docstring).
  """
  if map_kind not in ("dynamic", "linear"):
    raise ValueError(f"scale_by_adam_8bit: map_kind={map_kind!r}; choose 'dynamic' or 'linear'")
  if block_size < MIN_BLOCK:
    raise ValueError(f"scale_by_adam_8bit: block_size={block_size} must be >= {MIN_BLOCK}")
  make = dynamic_map if map_kind == "dynamic" else linear_map
  signed_code, unsigned_code = make(True), make(False)

  def init_moment(p):
    k, b = block_layout(p.shape, block_size) if p.size >= min_size else (0, 0)
    if not b:
      return jnp.zeros(p.shape, jnp.float32)
    lead = p.shape[: p.ndim - k]
    blocks = math.prod(p.shape[p.ndim - k :]) // b
    return QuantizedMoment(jnp.zeros(p.shape, jnp.uint8), jnp.zeros((*lead, blocks), jnp.float32))

  def init_fn(params):
    mu = jax.tree.map(init_moment, params)
    nu = jax.tree.map(init_moment, params)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    signed, unsigned = jnp.asarray(signed_code), jnp.asarray(unsigned_code)
    is_q = lambda x: isinstance(x, QuantizedMoment)

    def one(g, m_state, v_state):
      g32 = g.astype(jnp.float32)
      quantized = isinstance(m_state, QuantizedMoment)
      if quantized:
        m = dequantize(m_state.codes, m_state.absmax, signed)
        v = dequantize(v_state.codes, v_state.absmax, unsigned)
      else:
        m, v = m_state, v_state
      m = b1 * m + (1 - b1) * g32
      v = b2 * v + (1 - b2) * g32 * g32
      m_hat = m / (1 - b1 ** count.astype(jnp.float32))
      v_hat = v / (1 - b2 ** count.astype(jnp.float32))
      u = (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype)
      if quantized:
        axes = m_state.codes.ndim - m_state.absmax.ndim + 1
        block = math.prod(m_state.codes.shape[-axes:]) // m_state.absmax.shape[-1]
        m = QuantizedMoment(*quantize(m, signed, block, axes))
        v = QuantizedMoment(*quantize(v, unsigned, block, axes))
      return u, m, v

    out = jax.tree.map(one, updates, state.mu, state.nu, is_leaf=is_q)
    treedef = jax.tree.structure(updates)
    triples = treedef.flatten_up_to(out)
    u = treedef.unflatten([t[0] for t in triples])
    mu = treedef.unflatten([t[1] for t in triples])
    nu = treedef.unflatten([t[2] for t in triples])
    return u, ScaleByAdam8bitState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def path_labels(params: Any, exclude: Sequence[str]) -> Any:
  """ "float32" for params whose "/"-joined path matches a regex of `exclude`, else "8bit"."""
  patterns = [re.compile(p) for p in exclude]
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=False)
  labels = {
      k: "float32" if any(p.search("/".join(map(str, k))) for p in patterns) else "8bit"
      for k in flat
  }
  return traverse_util.unflatten_dict(labels)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_size: int = DEFAULT_MIN_SIZE,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, like `optax.adamw`) with 8-bit moments except on `exclude`."""
  scale = optax.multi_transform(
      {
          "8bit": scale_by_adam_8bit(b1, b2, eps, block_size, min_size),
          "float32": optax.scale_by_adam(b1, b2, eps),
      },
      lambda params: path_labels(params, exclude),
  )
  return optax.chain(
      scale,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def state_bytes(state: Any) -> int:
  """Bytes of every array in an optimizer state (from the dtypes and shapes)."""
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))
