"""Train NexusFormer on `RelationalData` splits with the generic loop; used by the experiment and the estimator.

    result = train_nexus_former(train_data, valid_data, config, workdir)
    result.variables                     # best checkpoint's {"params": ..., **extra collections}
    result.model, result.spec            # NexusFormer and its JSON-able spec (model_spec.py)
    result.fit                           # train/loop.FitResult (history, rows/s, best step, ...)

With ``config.model.ensemble_size = M > 1`` it trains a deep ensemble whose probabilities are the
members' mean, as ``config.model.ensemble_mode`` says:

- "batched" (the default): one `BatchedEnsemble` trained like one model, in one compiled step
  (``params = {"members": ...}`` with a leading member axis; each member sees its own B / M rows of
  every batch, the batch size is rounded down to a multiple of M); one early stopping on the
  ensemble's validation metric, one checkpoint, one resume;
- "sequential": M members one after another (seeds ``seed``, ``seed + 1``, ...; each in
  ``workdir/member_i`` with its own early stopping and resume), returned as one `MemberEnsemble`
  (``params = {"member_i": ...}``); ``result.fit`` then reports the ensemble's validation metrics
  and the members' summed time, ``result.members`` each member's seed, best step and validation
  metrics.

Regression targets are standardised with the training mean / std (`target_scale`) and predictions
are mapped back by the callers. The early-stopping metric of `config.train.early_stopping` must be
one the task produces; if it is not (e.g. "auc" for regression), the task's default is used
instead and `result.early_stopping` says which.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from nexus_jax.nexusflow.model_spec import build_nexus_former, ensemble_mode, nexus_former_spec
from nexus_jax.nexusflow.objectives import evaluation_metrics, n_outputs, relational_arrays, relational_objective
from nexus_jax.nexusflow.schedule import splits_batch
from nexus_jax.nexusflow.batch_inference import predict_arrays
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import FitResult, fit, restore_best

TASK_METRICS = {
    "binary": ("loss", "accuracy", "auc", "log_loss"),
    "multiclass": ("loss", "accuracy", "log_loss"),
    "regression": ("loss", "mae", "rmse", "r2"),
}
DEFAULT_METRIC = {
    "binary": ("auc", "max"),
    "multiclass": ("log_loss", "min"),
    "regression": ("rmse", "min"),
}


@dataclasses.dataclass
class TrainResult:
  model: Any  # NexusFormer
  spec: dict[str, Any]  # build_nexus_former(spec) rebuilds `model`
  variables: dict[str, Any]  # {"params": ..., **extra} of the best checkpoint
  fit: FitResult
  target_scale: tuple[float, float]  # (shift, scale) of regression targets; (0, 1) otherwise
  early_stopping: tuple[str, str]  # (metric, mode) actually used
  members: list[dict[str, Any]] = dataclasses.field(
      default_factory=list
  )  # ensembles: per-member summary


def target_scale_of(data: Any) -> tuple[float, float]:
  """(mean, std) of the training labels for regression; (0, 1) for classification."""
  if data.task != "regression":
    return 0.0, 1.0
  y = np.asarray(data.labels, np.float64)
  return float(y.mean()), float(y.std()) if y.std() > 1e-12 else 1.0


def output_count(data: Any) -> int:
  return n_outputs(data.task, len(data.classes) if data.classes is not None else 2)


def resolve_early_stopping(config: Any, task: str) -> tuple[str, str]:
  """The (metric, mode) to early-stop on; falls back to the task's default when unavailable."""
  metric, mode = config.train.early_stopping.metric, config.train.early_stopping.mode
  if metric in TASK_METRICS[task]:
    return metric, mode
  return DEFAULT_METRIC[task]


def train_nexus_former(
    train: Any,
    valid: Any | None,
    config: Any,
    workdir: str | pathlib.Path,
    context_priors: dict[str, float] | None = None,
) -> TrainResult:
  """Trains on `train` (RelationalData), early-stops on `valid`, returns the best checkpoint.

  An ensemble (``config.model.ensemble_size > 1``) trains its members as the module docstring says.
  Rerunning with the same `workdir` resumes (see `train/loop.py`).
  """
  size = int(config.model.get("ensemble_size", 1))
  if size < 1:
    raise ValueError(f"config.model.ensemble_size={size}; must be >= 1")
  mode = ensemble_mode(config.model.get("ensemble_mode", "sequential"))
  if size == 1 or mode == "batched":
    return _train_one(train, valid, config, workdir, context_priors, size)
  members = []
  for i in range(size):
    member_config = config.copy_and_resolve_references()
    with member_config.unlocked():
      member_config.seed = int(config.seed) + i
      member_config.model.ensemble_size = 1
    members.append(
        _train_one(
            train, valid, member_config, pathlib.Path(workdir) / f"member_{i}", context_priors
        )
    )
  first = members[0]
  spec = {**first.spec, "ensemble_size": size, "task": train.task}
  variables = {
      col: {f"member_{i}": m.variables[col] for i, m in enumerate(members)}
      for col in first.variables
  }
  model = build_nexus_former(spec, config.train.compute_dtype)
  best_metrics = None
  if valid is not None and valid.num_rows:
    arrays = relational_arrays(valid, first.target_scale)
    preds, _ = predict_arrays(model, variables, arrays, train.task)
    best_metrics = evaluation_metrics(train.task, preds, arrays["y"], first.target_scale)
  seconds = sum(m.fit.train_seconds for m in members)
  rows = sum(m.fit.rows_per_second * m.fit.train_seconds for m in members)
  fit_summary = dataclasses.replace(
      first.fit,
      best_metrics=best_metrics,
      steps_run=sum(m.fit.steps_run for m in members),
      train_seconds=seconds,
      rows_per_second=rows / seconds if seconds > 0 else 0.0,
      compile_seconds=sum(m.fit.compile_seconds for m in members),
      stopped_early=any(m.fit.stopped_early for m in members),
  )
  summary = [
      {
          "seed": int(config.seed) + i,
          "workdir": str(pathlib.Path(workdir) / f"member_{i}"),
          "best_step": m.fit.best_step,
          "valid": m.fit.best_metrics,
      }
      for i, m in enumerate(members)
  ]
  return TrainResult(
      model=model,
      spec=spec,
      variables=variables,
      fit=fit_summary,
      target_scale=first.target_scale,
      early_stopping=first.early_stopping,
      members=summary,
  )


def _train_one(
    train: Any,
    valid: Any | None,
    config: Any,
    workdir: str | pathlib.Path,
    context_priors: dict[str, float] | None,
    batched_members: int = 1,
) -> TrainResult:
  """One model trained by `fit`: a NexusFormer, or a `BatchedEnsemble` of `batched_members` > 1."""
  if train.labels is None:
    raise ValueError("train_nexus_former: the training rows have no labels")
  scale = target_scale_of(train)
  spec = nexus_former_spec(config.model, train, output_count(train), context_priors)
  if batched_members > 1:
    spec = {
        **spec,
        "ensemble_size": batched_members,
        "task": train.task,
        "ensemble_mode": "batched",
    }
  model = build_nexus_former(spec, config.train.compute_dtype)
  split = splits_batch(config.model, int(config.train.batch_size), batched_members)
  objective = relational_objective(model, train.task, scale, split_members=split)
  metric, mode = resolve_early_stopping(config, train.task)
  if (metric, mode) != (config.train.early_stopping.metric, config.train.early_stopping.mode):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.train.early_stopping.metric, config.train.early_stopping.mode = metric, mode
  bs = int(config.train.batch_size)
  if split and bs % batched_members:  # every member gets bs / M rows of each batch
    bs = max(batched_members, bs - bs % batched_members)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.train.batch_size = bs
  train_ds = ArrayDataset(relational_arrays(train, scale), bs, seed=int(config.seed))
  valid_ds = None
  if valid is not None and valid.num_rows:
    valid_ds = ArrayDataset(relational_arrays(valid, scale), bs)
  result = fit(objective, train_ds, valid_ds, config, workdir)
  best = restore_best(result)
  return TrainResult(
      model=model,
      spec=spec,
      variables=best.variables(),
      fit=result,
      target_scale=scale,
      early_stopping=tuple(
          result.early_stopping
      ),  # what selected the checkpoint (NaN fallback incl.)
  )
