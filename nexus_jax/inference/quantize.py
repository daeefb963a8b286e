"""INT8 weight-only quantisation with per-channel scales, on any params pytree.

    qparams, report = quantize_int8(params)        # eligible weights -> {"int8": i8[...], "scale": f32[1, .., C]}
    params_hat = dequantize(qparams)               # same structure/dtypes as `params`, ready for model.apply
    report["size_reduction"]                       # ~0.75 when most bytes are float32 matrices

A leaf is quantised when it is floating point, has at least 2 dims and `min_size` elements
(kernels, embedding tables); biases, norm scales and small vectors stay as they are. Scales are
per output channel (the last axis): ``scale[c] = max |w[..., c]| / 127`` and
``int8 = round(w / scale)``, so the error of each weight is at most scale / 2. Compute stays in
floating point (weights are dequantised before use): the gain is the size of the stored model.
A quantised leaf is a dict with exactly the keys ``"int8"`` and ``"scale"``, so the tree stays a
plain pytree that Orbax (or `np.savez`) can store.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

QKEY, SKEY = "int8", "scale"


def is_quantized(node: Any) -> bool:
    """True for a quantised leaf ({"int8": ..., "scale": ...})."""
    return isinstance(node, Mapping) and set(node) == {QKEY, SKEY}


def _eligible(path: str, leaf: Any, min_size: int) -> bool:
    return np.issubdtype(np.asarray(leaf).dtype, np.floating) and np.ndim(leaf) >= 2 and np.size(leaf) >= min_size


def quantize_leaf(w: Any) -> dict[str, np.ndarray]:
    """w f[..., C] -> {"int8": i8[..., C], "scale": f32[1, ..., 1, C]} (per-channel over the last axis)."""
    w = np.asarray(jax.device_get(w), np.float32)
    reduce = tuple(range(w.ndim - 1))
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return {QKEY: q, SKEY: scale}


def quantize_int8(params: Any, min_size: int = 256,
                  predicate: Callable[[str, Any], bool] | None = None) -> tuple[Any, dict[str, Any]]:
    """Quantises the eligible leaves of `params` (nested Mappings of arrays).

    Args:
      params: a params pytree (e.g. `variables["params"]`).
      min_size: smallest leaf (elements) worth quantising.
      predicate: optional `(path, leaf) -> bool` overriding the default eligibility rule.
    Returns:
      (qparams, report): the tree with quantised leaves replaced by {"int8", "scale"} dicts, and
      {"bytes_before", "bytes_after", "size_reduction", "quantized_leaves", "kept_leaves",
      "max_abs_error"}.
    """
    eligible = predicate or (lambda path, leaf: _eligible(path, leaf, min_size))
    counts = {"quantized": 0, "kept": 0, "max_err": 0.0}

    def walk(node: Any, path: str) -> Any:
        if is_quantized(node):
            raise ValueError(f"quantize_int8: {path or 'params'} is already quantised")
        if isinstance(node, Mapping):
            return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
        if eligible(path, node):
            q = quantize_leaf(node)
            err = np.max(np.abs(q[QKEY].astype(np.float32) * q[SKEY] - np.asarray(node, np.float32)), initial=0.0)
            counts["quantized"] += 1
            counts["max_err"] = max(counts["max_err"], float(err))
            return q
        counts["kept"] += 1
        return node

    qparams = walk(params, "")
    before, after = tree_bytes(params), tree_bytes(qparams)
    return qparams, {"bytes_before": before, "bytes_after": after, "size_reduction": 1.0 - after / max(before, 1),
                     "quantized_leaves": counts["quantized"], "kept_leaves": counts["kept"],
                     "max_abs_error": counts["max_err"]}


def dequantize(qparams: Any, dtype: Any = np.float32) -> Any:
    """Inverse of `quantize_int8`: quantised leaves -> `dtype` arrays (int8 * scale); others unchanged."""
    if is_quantized(qparams):
        return (np.asarray(qparams[QKEY], np.float32) * np.asarray(qparams[SKEY], np.float32)).astype(dtype)
    if isinstance(qparams, Mapping):
        return {k: dequantize(v, dtype) for k, v in qparams.items()}
    return qparams


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of `tree`."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
