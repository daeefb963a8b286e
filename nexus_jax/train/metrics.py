"""Metric logging (JSONL + TensorBoard event files) and early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import warnings
from typing import Any, Mapping

import numpy as np


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tb/`.

  One JSON object per line: {"step": s, "split": "train" | "valid" | ..., name: value, ...}.
  Reopening an existing workdir appends (a resumed run continues the same files). With
  `active=False` (every process but 0 of a multi-process run) nothing is opened or written.
  """

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True, active: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._file, self._tb = None, None
    if not active:
      return
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    if self._file is None:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path, split: str | None = None) -> list[dict[str, Any]]:
  """Rows of `metrics.jsonl`, optionally only one split."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


@dataclasses.dataclass
class EarlyStopping:
  """Stops when `metric` has not improved by `min_delta` for `patience` evaluations.

  The best step is the first evaluation reaching the best value: a later tie (within `min_delta`)
  is not an improvement. `best_step` is the one source of truth for "the best checkpoint" (the loop
  passes it to `Checkpointer.save`, which preserves exactly that step).

  A metric that cannot be computed on the validation rows (NaN or inf at the first evaluation,
  e.g. AUC when they hold a single class) makes it warn once, naming the metric, and select on
  `fallback_metric` (mode "min", the validation loss by default) for the rest of the run; a
  non-finite value at a later evaluation counts as an evaluation without improvement.

  Attributes:
    metric: name of the validation metric, e.g. "auc" or "loss".
    mode: "max" or "min".
    patience: evaluations without improvement before stopping (0 disables stopping).
    fallback_metric: minimised instead of `metric` when that cannot be computed.
    best_value / best_step / bad_evals / fallback_from: running state (serialisable with
      `state_dict`); `fallback_from` is the configured metric after a fallback, else None.
  """

  metric: str = "loss"
  mode: str = "min"
  patience: int = 0
  min_delta: float = 0.0
  fallback_metric: str = "loss"
  best_value: float | None = None
  best_step: int | None = None
  bad_evals: int = 0
  fallback_from: str | None = None

  def __post_init__(self):
    if self.mode not in ("min", "max"):
      raise ValueError(f"early stopping mode must be 'min' or 'max', got {self.mode!r}.")

  def is_improvement(self, value: float) -> bool:
    if self.best_value is None:
      return True
    if self.mode == "max":
      return value > self.best_value + self.min_delta
    return value < self.best_value - self.min_delta

  def update(self, step: int, metrics: Mapping[str, float]) -> bool:
    """Records an evaluation; returns True when training should stop."""
    if self.metric not in metrics:
      raise KeyError(
          f"early stopping metric {self.metric!r} is not among the validation metrics "
          f"{sorted(metrics)}; set config.train.early_stopping.metric to one of them."
      )
    value = float(metrics[self.metric])
    if (
        not math.isfinite(value)
        and self.best_step is None
        and self.metric != self.fallback_metric
        and self.fallback_metric in metrics
    ):
      warnings.warn(
          f"validation metric {self.metric!r} is {value} at step {step}: it cannot be computed "
          "on the validation rows (e.g. AUC when they hold a single class). Early stopping and "
          f"the best checkpoint use the validation {self.fallback_metric!r} (min) instead.",
          RuntimeWarning,
          stacklevel=2,
      )
      self.fallback_from, self.metric, self.mode = self.metric, self.fallback_metric, "min"
      value = float(metrics[self.metric])
    if math.isfinite(value) and self.is_improvement(value):
      self.best_value, self.best_step, self.bad_evals = value, int(step), 0
    else:
      self.bad_evals += 1
    return self.patience > 0 and self.bad_evals >= self.patience

  def state_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores the running state; a fallback recorded for this same metric is restored too."""
    for field in ("best_value", "best_step", "bad_evals"):
      setattr(self, field, state.get(field))
    self.bad_evals = int(self.bad_evals or 0)
    if state.get("fallback_from") is not None and state["fallback_from"] == self.metric:
      self.fallback_from, self.metric, self.mode = self.metric, state["metric"], state["mode"]
