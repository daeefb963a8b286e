"""Batched, jitted inference of a trained tabular model on host arrays (no Trainer, no mesh needed).

`predict_arrays(model, variables, arrays, task)` runs `model.apply(variables, **inputs)` over fixed-size
padded batches (one compilation) and returns the task's predictions (`objectives.task_predict`):
positive-class probability [N] (binary), class probabilities [N, K] (multiclass) or values [N]
(regression, still standardised). With `aux_keys` it also gathers those entries of the model's aux
dict (each `[N, ...]`), e.g. NexusFormer's "context_attention".
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from nexus_jax.nexusflow.objectives import task_predict
from nexus_jax.train.data import num_examples


def relational_inputs(batch: Any) -> dict[str, Any]:
  """NexusFormer call arguments from a `relational_arrays` batch."""
  return {"target": batch["target"], "contexts": batch["contexts"]}


def make_predict_fn(
    model: Any,
    task: str,
    inputs: Callable[[Any], dict[str, Any]] = relational_inputs,
    aux_keys: Sequence[str] = (),
) -> Callable[[Any, Any], tuple[Any, dict[str, Any]]]:
  """Jitted `(variables, batch) -> (predictions, {key: aux[key]})`; reuse it to avoid recompiling."""
  predict = task_predict(task)
  aux_keys = tuple(aux_keys)

  @jax.jit
  def step(variables, batch):
    out = model.apply(variables, **inputs(batch))
    outputs, aux = out if isinstance(out, tuple) else (out, {})
    return predict(outputs), {k: aux[k] for k in aux_keys}

  return step


def predict_arrays(
    model: Any,
    variables: Any,
    arrays: Any,
    task: str,
    batch_size: int = 2048,
    inputs: Callable[[Any], dict[str, Any]] = relational_inputs,
    aux_keys: Sequence[str] = (),
    predict_fn: Callable | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Predictions for every row of `arrays` (a pytree of `[N, ...]` arrays), in order.

  `predict_fn` (from `make_predict_fn` with the same model / task / aux_keys) skips recompiling.
  Returns:
    (predictions [N] or [N, K], {key: aux[key] as [N, ...]} for `aux_keys`).
  """
  n = num_examples(
      {k: v for k, v in arrays.items() if k not in ("y", "weight")}
      if isinstance(arrays, dict)
      else arrays
  )
  step = predict_fn or make_predict_fn(model, task, inputs, aux_keys)
  bs = max(1, min(int(batch_size), n))
  preds, auxes = [], {k: [] for k in aux_keys}
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    real = len(idx)
    idx = np.pad(idx, (0, bs - real), mode="edge")
    batch = jax.tree.map(lambda a: a[idx], arrays)
    p, aux = jax.device_get(step(variables, batch))
    preds.append(np.asarray(p)[:real])
    for k in aux_keys:
      auxes[k].append(np.asarray(aux[k])[:real])
  return np.concatenate(preds), {k: np.concatenate(v) for k, v in auxes.items()}
