"""Train NexusFormer on `RelationalData` splits with the generic loop; used by the experiment and the estimator.

    result = train_nexus_former(train_data, valid_data, config, workdir)
    result.variables                     # best checkpoint's {"params": ..., **extra collections}
    result.model, result.spec            # NexusFormer and its JSON-able spec (model_spec.py)
    result.fit                           # train/loop.FitResult (history, rows/s, best step, ...)

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

from nexus_jax.tabular.model_spec import build_nexus_former, nexus_former_spec
from nexus_jax.tabular.objectives import n_outputs, relational_arrays, relational_objective
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import FitResult, fit, restore_best

TASK_METRICS = {"binary": ("loss", "accuracy", "auc", "log_loss"), "multiclass": ("loss", "accuracy", "log_loss"),
                "regression": ("loss", "mae", "rmse", "r2")}
DEFAULT_METRIC = {"binary": ("auc", "max"), "multiclass": ("log_loss", "min"), "regression": ("rmse", "min")}


@dataclasses.dataclass
class TrainResult:
    model: Any  # NexusFormer
    spec: dict[str, Any]  # build_nexus_former(spec) rebuilds `model`
    variables: dict[str, Any]  # {"params": ..., **extra} of the best checkpoint
    fit: FitResult
    target_scale: tuple[float, float]  # (shift, scale) of regression targets; (0, 1) otherwise
    early_stopping: tuple[str, str]  # (metric, mode) actually used


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


def train_nexus_former(train: Any, valid: Any | None, config: Any, workdir: str | pathlib.Path,
                       context_priors: dict[str, float] | None = None) -> TrainResult:
    """Trains on `train` (RelationalData), early-stops on `valid`, returns the best checkpoint.

    Rerunning with the same `workdir` resumes (see `train/loop.py`).
    """
    if train.labels is None:
        raise ValueError("train_nexus_former: the training rows have no labels")
    scale = target_scale_of(train)
    spec = nexus_former_spec(config.model, train, output_count(train), context_priors)
    model = build_nexus_former(spec, config.train.compute_dtype)
    objective = relational_objective(model, train.task, scale)
    metric, mode = resolve_early_stopping(config, train.task)
    if (metric, mode) != (config.train.early_stopping.metric, config.train.early_stopping.mode):
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.train.early_stopping.metric, config.train.early_stopping.mode = metric, mode
    bs = int(config.train.batch_size)
    train_ds = ArrayDataset(relational_arrays(train, scale), bs, seed=int(config.seed))
    valid_ds = None
    if valid is not None and valid.num_rows:
        valid_ds = ArrayDataset(relational_arrays(valid, scale), bs)
    result = fit(objective, train_ds, valid_ds, config, workdir)
    best = restore_best(result)
    return TrainResult(model=model, spec=spec, variables=best.variables(), fit=result, target_scale=scale,
                       early_stopping=(metric, mode))
