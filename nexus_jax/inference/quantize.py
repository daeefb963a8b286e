"""Weight-only quantisation (int8 or packed int4, per-channel or per-group scales) on any params pytree.

    qparams, report = quantize(params, bits=4, group_size=64)   # eligible weights -> {"int4"|"int8", "scale"}
    params_hat = dequantize(qparams)                            # same structure/shapes as `params`
    fwd = jax.jit(lambda qp, x: model.apply({"params": dequantize(qp)}, x))   # dequantised on the fly
    qparams, report = quantize_int8(params)                     # = quantize(params, bits=8), per channel

A leaf is quantised when it is floating point, has at least 2 dims and `min_size` elements
(kernels, embedding tables); biases, norm scales and small vectors stay as they are.

Layout. A weight `w [..., C]` is read as a matrix `w2 [R, C]` (R = product of the leading dims,
C = the last axis = output channels). Its rows are cut into groups of `group_size` consecutive
rows (for `Dense` kernels `[in, out]`, scanned `[layers, in, out]`, expert `[.., experts, in, out]`
and attention output `[.., heads, head_dim, embed]` kernels that is along the input/contraction
dim); per-channel scaling is the single group of all R rows. Each (group, channel) has
``scale = max |w| / qmax`` (qmax = 127 for int8, 7 for int4) and ``q = round(w / scale)``, so the
error of every weight is at most scale / 2.
  int8 leaf: {"int8": i8[*w.shape], "scale": f32[1, ..., 1, C]} (per channel) or f32[R / g, C] (groups)
  int4 leaf: {"int4": u8[*w.shape[:-1], ceil(C / 2)], "scale": f32[R / g, C]}
An int4 byte holds channels 2j (low nibble) and 2j+1 (high nibble) as ``q + 8`` in [1, 15], so the
stored bytes really halve again. Everything needed to undo the layout (C, R, g) is in the static
shapes, so `dequantize` traces under `jax.jit` (jnp on jax arrays, numpy on numpy arrays). Leaves
stay plain pytrees of arrays that Orbax (or `np.savez`) can store. A leaf whose R is not a multiple
of `group_size` falls back to per-channel int8 and is listed in `report["fallback"]`.
Compute stays in floating point: the gain is the size of the stored (and, dequantising inside the
jitted forward, of the resident) model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

QKEY, Q4KEY, SKEY = "int8", "int4", "scale"
QMAX = {8: 127, 4: 7}
DEFAULT_INT4_GROUP = 64


def is_quantized(node: Any) -> bool:
  """True for a quantised leaf ({"int8" | "int4": ..., "scale": ...})."""
  return isinstance(node, Mapping) and (set(node) == {QKEY, SKEY} or set(node) == {Q4KEY, SKEY})


def _eligible(path: str, leaf: Any, min_size: int) -> bool:
  dtype = getattr(leaf, "dtype", None)  # jnp.issubdtype also knows bfloat16 is floating point
  return (
      dtype is not None
      and jnp.issubdtype(dtype, jnp.floating)
      and np.ndim(leaf) >= 2
      and np.size(leaf) >= min_size
  )


def pack_int4(q: np.ndarray) -> np.ndarray:
  """q int[..., C] in [-8, 7] -> u8[..., ceil(C / 2)]: channel 2j in the low nibble, 2j+1 in the high."""
  q = np.asarray(q)
  if q.size and (q.min() < -8 or q.max() > 7):
    raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{q.min()}, {q.max()}]")
  nib = (q.astype(np.int16) + 8).astype(np.uint8)
  if nib.shape[-1] % 2:
    nib = np.concatenate([nib, np.full(nib.shape[:-1] + (1,), 8, np.uint8)], -1)  # pad with a zero
  return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: Any, channels: int, xp: Any = np) -> Any:
  """Inverse of `pack_int4`: u8[..., ceil(C / 2)] -> int8[..., C] (C = `channels`); xp = np or jnp."""
  lo = (packed & 0xF).astype(xp.int8) - 8
  hi = (packed >> 4).astype(xp.int8) - 8
  both = xp.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
  return both[..., :channels]


def _group_scales(w2: np.ndarray, group: int, qmax: int) -> np.ndarray:
  """w2 f32[R, C] -> scale f32[R / group, C] = max |w| / qmax per (group of rows, channel)."""
  amax = np.max(np.abs(w2.reshape(-1, group, w2.shape[-1])), axis=1)
  return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def quantize_leaf(w: Any, bits: int = 8, group_size: int | None = None) -> dict[str, np.ndarray]:
  """One weight `w f[..., C]` -> a quantised leaf (see the module docstring for shapes).

  `group_size=None` means per channel (one group of all R rows); otherwise it must divide R.
  """
  _check_args(bits, group_size)
  w = np.asarray(jax.device_get(w), np.float32)
  c = w.shape[-1]
  rows = w.size // max(c, 1)
  group = rows if group_size is None else group_size
  if rows % group:
    raise ValueError(
        f"quantize_leaf: group_size={group} does not divide the {rows} rows of a weight of "
        f"shape {w.shape} (rows = product of all but the last dim); pick a divisor"
    )
  qmax = QMAX[bits]
  scale = _group_scales(w.reshape(rows, c), group, qmax)
  q = np.clip(np.rint(w.reshape(-1, group, c) / scale[:, None, :]), -qmax, qmax).reshape(w.shape)
  if bits == 4:
    return {Q4KEY: pack_int4(q), SKEY: scale}
  if group_size is None:  # keep the int8 per-channel scale broadcastable against w
    scale = scale.reshape((1,) * (w.ndim - 1) + (c,))
  return {QKEY: q.astype(np.int8), SKEY: scale}


def _dequantize_leaf(node: Mapping[str, Any], dtype: Any, xp: Any) -> Any:
  scale = node[SKEY]
  c = scale.shape[-1]
  if Q4KEY in node:
    q = unpack_int4(node[Q4KEY], c, xp)
  else:
    q = node[QKEY]
  shape = q.shape
  groups = math.prod(scale.shape[:-1])
  w = q.astype(xp.float32).reshape(groups, -1, c) * xp.asarray(scale, xp.float32).reshape(
      groups, 1, c
  )
  return w.reshape(shape).astype(dtype)


def dequantize(qparams: Any, dtype: Any = np.float32) -> Any:
  """Quantised leaves -> `dtype` arrays (q * scale), other leaves unchanged; same tree structure.

  A quantised leaf held as jax arrays (device arrays, or tracers inside `jax.jit`, e.g. at the top
  of a jitted forward) is dequantised with jnp; one held as numpy arrays with numpy.
  """

  def walk(node):
    if is_quantized(node):
      on_device = any(isinstance(x, jax.Array) for x in node.values())
      return _dequantize_leaf(node, dtype, jnp if on_device else np)
    if isinstance(node, Mapping):
      return {k: walk(v) for k, v in node.items()}
    return node

  return walk(qparams)


def _check_args(bits: Any, group_size: Any) -> None:
  if isinstance(bits, bool) or bits not in QMAX:
    raise ValueError(f"quantize: bits={bits!r} is not supported; choose 8 or 4")
  if group_size is not None and (
      isinstance(group_size, bool)
      or not isinstance(group_size, (int, np.integer))
      or group_size < 1
  ):
    raise ValueError(
        f"quantize: group_size={group_size!r} must be a positive integer (rows per scale, e.g. "
        "64 or 128) or None (one scale per output channel)"
    )


def quantize(
    params: Any,
    bits: int = 8,
    group_size: int | None = None,
    min_size: int = 256,
    predicate: Callable[[str, Any], bool] | None = None,
) -> tuple[Any, dict[str, Any]]:
  """Quantises the eligible leaves of `params` (nested Mappings of arrays) to int8 or packed int4.

  Args:
    params: a params pytree (e.g. `variables["params"]`, unboxed).
    bits: 8 or 4.
    group_size: rows per scale (see the module docstring); None = per channel for int8 and
      `DEFAULT_INT4_GROUP` (64) for int4. Leaves whose row count it does not divide fall back to
      per-channel int8.
    min_size: smallest leaf (elements) worth quantising.
    predicate: optional `(path, leaf) -> bool` overriding the default eligibility rule.
  Returns:
    (qparams, report): the tree with quantised leaves, and {"bits", "group_size", "bytes_before",
    "bytes_after", "size_reduction", "quantized_leaves", "kept_leaves", "fallback" (paths),
    "max_abs_error", "max_error_over_scale" (<= 0.5)}.
  """
  _check_args(bits, group_size)
  if bits == 4 and group_size is None:
    group_size = DEFAULT_INT4_GROUP
  eligible = predicate or (lambda path, leaf: _eligible(path, leaf, min_size))
  counts = {"quantized": 0, "kept": 0, "max_err": 0.0, "max_rel": 0.0, "fallback": []}

  def walk(node: Any, path: str) -> Any:
    if is_quantized(node):
      raise ValueError(
          f"quantize: {path or 'params'} is already quantised; quantise the float params"
      )
    if isinstance(node, Mapping):
      return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
    if not eligible(path, node):
      counts["kept"] += 1
      return node
    rows = np.size(node) // np.shape(node)[-1]
    if group_size is not None and rows % group_size:
      counts["fallback"].append(path)
      q = quantize_leaf(node, 8, None)
    else:
      q = quantize_leaf(node, bits, group_size)
    w = np.asarray(node, np.float32)
    err = np.abs(_dequantize_leaf(q, np.float32, np) - w)
    scale = q[SKEY].reshape(-1, 1, q[SKEY].shape[-1])
    rel = err.reshape(scale.shape[0], -1, scale.shape[-1]) / scale
    counts["quantized"] += 1
    counts["max_err"] = max(counts["max_err"], float(np.max(err, initial=0.0)))
    counts["max_rel"] = max(counts["max_rel"], float(np.max(rel, initial=0.0)))
    return q

  qparams = walk(params, "")
  before, after = tree_bytes(params), tree_bytes(qparams)
  return qparams, {
      "bits": bits,
      "group_size": group_size,
      "bytes_before": before,
      "bytes_after": after,
      "size_reduction": 1.0 - after / max(before, 1),
      "quantized_leaves": counts["quantized"],
      "kept_leaves": counts["kept"],
      "fallback": counts["fallback"],
      "max_abs_error": counts["max_err"],
      "max_error_over_scale": counts["max_rel"],
  }


def quantize_int8(
    params: Any, min_size: int = 256, predicate: Callable[[str, Any], bool] | None = None
) -> tuple[Any, dict[str, Any]]:
  """Per-channel int8: `quantize(params, bits=8, group_size=None, ...)`."""
  return quantize(params, bits=8, group_size=None, min_size=min_size, predicate=predicate)


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of `tree`."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
