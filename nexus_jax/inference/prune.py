"""Global magnitude pruning by `amount`, on any params pytree.

    pruned, report = magnitude_prune(params, amount=0.5)
    report["sparsity"]            # share of prunable weights that are now exactly 0 (= amount)

Prunable weights are floating leaves with at least 2 dims (kernels, embedding tables; biases and
norm parameters are never pruned) unless `predicate` says otherwise. One threshold is used for all
of them together (global pruning): the `amount` share with the smallest |w| across the whole model
is set to 0, so layers with many small weights lose more. Ties at the threshold are broken by
position, so exactly floor(amount * n) weights are removed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np


def _prunable(path: str, leaf: Any) -> bool:
  return np.issubdtype(np.asarray(leaf).dtype, np.floating) and np.ndim(leaf) >= 2


def _leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
  if isinstance(tree, Mapping):
    return [item for k, v in tree.items() for item in _leaves(v, f"{path}/{k}")]
  return [(path, tree)]


def _rebuild(tree: Any, replace: dict[str, np.ndarray], path: str = "") -> Any:
  if isinstance(tree, Mapping):
    return {k: _rebuild(v, replace, f"{path}/{k}") for k, v in tree.items()}
  return replace.get(path, tree)


def magnitude_prune(
    params: Any, amount: float, predicate: Callable[[str, Any], bool] | None = None
) -> tuple[Any, dict[str, Any]]:
  """Zeroes the `amount` share of prunable weights with the smallest magnitude (one global threshold).

  Args:
    params: params pytree (nested Mappings of arrays).
    amount: share in [0, 1) of prunable weights to zero.
    predicate: optional `(path, leaf) -> bool` choosing prunable leaves.
  Returns:
    (pruned params, report) with report {"amount", "threshold", "pruned_weights", "prunable_weights",
    "sparsity" (zeros / prunable), "overall_sparsity" (zeros / all params), "per_leaf" {path: sparsity}}.
  """
  if not 0.0 <= float(amount) < 1.0:
    raise ValueError(f"magnitude_prune: amount={amount} must be in [0, 1)")
  choose = predicate or _prunable
  leaves = [(p, np.asarray(jax.device_get(x))) for p, x in _leaves(params)]
  prunable = [(p, x) for p, x in leaves if choose(p, x)]
  if not prunable:
    raise ValueError(
        "magnitude_prune: no prunable leaves (floating arrays with >= 2 dims) in params"
    )
  flat = np.concatenate([np.abs(x.astype(np.float32)).ravel() for _, x in prunable])
  k = int(np.floor(float(amount) * flat.size))
  drop = np.zeros(flat.size, bool)
  threshold = 0.0
  if k:
    order = np.argsort(flat, kind="stable")
    drop[order[:k]] = True
    threshold = float(flat[order[k - 1]])
  replace, offset, per_leaf = {}, 0, {}
  for path, x in prunable:
    mask = drop[offset : offset + x.size].reshape(x.shape)
    offset += x.size
    new = np.where(mask, np.zeros((), x.dtype), x)
    replace[path] = new
    per_leaf[path] = float(np.mean(new == 0))
  pruned = _rebuild(params, replace)
  n_prunable = int(flat.size)
  report = {
      "amount": float(amount),
      "threshold": threshold,
      "pruned_weights": k,
      "prunable_weights": n_prunable,
      "sparsity": sparsity(pruned, choose),
      "overall_sparsity": sparsity(pruned, lambda p, x: True),
      "per_leaf": per_leaf,
  }
  return pruned, report


def sparsity(params: Any, predicate: Callable[[str, Any], bool] | None = None) -> float:
  """Share of exactly-zero values among the leaves chosen by `predicate` (default: prunable ones)."""
  choose = predicate or _prunable
  chosen = [np.asarray(x) for p, x in _leaves(params) if choose(p, np.asarray(x))]
  total = sum(x.size for x in chosen)
  return float(sum(int(np.sum(x == 0)) for x in chosen) / max(total, 1))
