"""Losses, predictions and evaluation metrics for the three tabular tasks.

Batches carry `y` ([batch] int labels or float targets) and `weight` ([batch], 0 for padding).
Model outputs are [batch, n_outputs]: one logit (binary), class logits (multiclass), or one value
(regression, predicted in standardised target units; `target_scale` maps back).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics as skm

from nexus_jax.data.context_batches import lazy_arrays
from nexus_jax.models.tabular.ensemble import BatchedEnsemble, member_loss
from nexus_jax.train.steps import Objective

TASKS = ("binary", "multiclass", "regression")
PROB_CLIP = 1e-7  # log loss clips probabilities to [1e-7, 1 - 1e-7] (shared/TASKS.md)


def n_outputs(task: str, n_classes: int = 2) -> int:
  if task not in TASKS:
    raise ValueError(f"task={task!r} is unknown; choose one of {TASKS}.")
  return n_classes if task == "multiclass" else 1


def _weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def task_loss(
    task: str,
) -> Callable[[jax.Array, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]:
  """(outputs [batch, n_outputs], batch) -> (weighted mean loss, {"accuracy" | "mae": ...})."""

  def loss(outputs, batch):
    w, y = batch["weight"], batch["y"]
    outputs = outputs.astype(jnp.float32)
    if task == "binary":
      logit = outputs[..., 0]
      nll = optax.sigmoid_binary_cross_entropy(logit, y.astype(jnp.float32))
      acc = ((logit > 0).astype(jnp.int32) == y).astype(jnp.float32)
      return _weighted_mean(nll, w), {"accuracy": _weighted_mean(acc, w)}
    if task == "multiclass":
      nll = optax.softmax_cross_entropy_with_integer_labels(outputs, y)
      acc = (jnp.argmax(outputs, -1) == y).astype(jnp.float32)
      return _weighted_mean(nll, w), {"accuracy": _weighted_mean(acc, w)}
    err = outputs[..., 0] - y.astype(jnp.float32)
    return _weighted_mean(err**2, w), {"mae": _weighted_mean(jnp.abs(err), w)}

  return loss


def task_predict(task: str) -> Callable[[jax.Array], jax.Array]:
  """outputs -> probabilities of the positive class [batch] / class probabilities / values."""
  if task == "binary":
    return lambda out: jax.nn.sigmoid(out[..., 0].astype(jnp.float32))
  if task == "multiclass":
    return lambda out: jax.nn.softmax(out.astype(jnp.float32), axis=-1)
  return lambda out: out[..., 0].astype(jnp.float32)


def evaluation_metrics(
    task: str,
    predictions: np.ndarray,
    y: np.ndarray,
    target_scale: tuple[float, float] = (0.0, 1.0),
) -> dict[str, float]:
  """Host metrics over a whole split: binary {auc, log_loss, accuracy}; multiclass {log_loss,
  accuracy}; regression {rmse, mae, r2} in original target units."""
  y = np.asarray(y)
  if task == "binary":
    p = np.clip(np.asarray(predictions, np.float64), PROB_CLIP, 1 - PROB_CLIP)
    auc = skm.roc_auc_score(y, p) if len(np.unique(y)) > 1 else float("nan")
    return {
        "auc": float(auc),
        "log_loss": float(skm.log_loss(y, p, labels=[0, 1])),
        "accuracy": float(np.mean((p > 0.5) == y)),
    }
  if task == "multiclass":
    p = np.clip(np.asarray(predictions, np.float64), PROB_CLIP, 1.0)
    p = p / p.sum(-1, keepdims=True)
    return {
        "log_loss": float(skm.log_loss(y, p, labels=np.arange(p.shape[-1]))),
        "accuracy": float(np.mean(p.argmax(-1) == y)),
    }
  shift, scale = target_scale
  pred, true = np.asarray(predictions) * scale + shift, y * scale + shift
  return {
      "rmse": float(np.sqrt(np.mean((pred - true) ** 2))),
      "mae": float(np.mean(np.abs(pred - true))),
      "r2": float(skm.r2_score(true, pred)),
  }


def tabular_objective(
    model: Any, task: str, target_scale: tuple[float, float] = (0.0, 1.0)
) -> Objective:
  """Objective for a model called as `model(x_num, x_cat, num_missing, train=...)`."""
  n_outputs(task)
  return Objective(
      model=model,
      loss=task_loss(task),
      inputs=lambda batch, train: {
          "x_num": batch["x_num"],
          "x_cat": batch["x_cat"],
          "num_missing": batch["num_missing"],
          "train": train,
      },
      predict=task_predict(task),
      host_metrics=lambda preds, arrays: evaluation_metrics(task, preds, arrays["y"], target_scale),
  )


def relational_objective(
    model: Any,
    task: str,
    target_scale: tuple[float, float] = (0.0, 1.0),
    split_members: bool = True,
) -> Objective:
  """Objective for `NexusFormer`-style models called as `model(target, contexts, train=...)`.

  Batches are `relational_arrays(...)` rows: {"target": {...}, "contexts": {name: {...}}, "y": [batch]}.
  A `BatchedEnsemble` trains each member on its own B / M rows (``split_members=True``) or on every
  row (False), on the members' mean loss (`ensemble.member_loss`), and evaluates / predicts combined.
  """
  n_outputs(task)
  batched = isinstance(model, BatchedEnsemble)
  member_inputs = (
      (
          lambda train: {
              "split_members": train and split_members,
              "member_outputs": train and not split_members,
          }
      )
      if batched
      else (lambda train: {})
  )
  return Objective(
      model=model,
      loss=member_loss(task_loss(task)) if batched else task_loss(task),
      inputs=lambda batch, train: {
          "target": batch["target"],
          "contexts": batch["contexts"],
          "train": train,
          **member_inputs(train),
      },
      predict=task_predict(task),
      host_metrics=lambda preds, arrays: evaluation_metrics(task, preds, arrays["y"], target_scale),
  )


def relational_arrays(data: Any, target_scale: tuple[float, float] = (0.0, 1.0)) -> dict:
  """`RelationalData` -> the batch pytree of `relational_objective`, lazily gathered.

  The feature leaves are `context_batches.GatheredArray`s: slicing them (`ArrayDataset`,
  `predict_arrays`) gathers that batch from the shared feature tables; nothing per row is copied.
  Labels become "y": int32 class indices (binary / multiclass) or float32 standardised targets
  ((y - shift) / scale, regression). Unlabelled data (prediction) gets no "y".
  """
  out = lazy_arrays(data)
  labels = out.pop("labels", None)
  if labels is not None:
    if data.task == "regression":
      shift, scale = target_scale
      out["y"] = ((labels.astype(np.float64) - shift) / scale).astype(np.float32)
    else:
      out["y"] = labels.astype(np.int32)
  return out
