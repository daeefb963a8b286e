"""Metric logging (JSONL + TensorBoard event files) and early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import numpy as np


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tb/`.

  One JSON object per line: {"step": s, "split": "train" | "valid" | ..., name: value, ...}.
  Reopening an existing workdir appends (a resumed run continues the same files).
  """

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", value, int(step))

  def close(self) -> None:
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

  Attributes:
    metric: name of the validation metric, e.g. "auc" or "loss".
    mode: "max" or "min".
    patience: evaluations without improvement before stopping (0 disables stopping).
    best_value / best_step / bad_evals: running state (serialisable with `state_dict`).
  """

  metric: str = "loss"
  mode: str = "min"
  patience: int = 0
  min_delta: float = 0.0
  best_value: float | None = None
  best_step: int | None = None
  bad_evals: int = 0

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
    if math.isnan(value):
      self.bad_evals += 1
    elif self.is_improvement(value):
      self.best_value, self.best_step, self.bad_evals = value, int(step), 0
    else:
      self.bad_evals += 1
    return self.patience > 0 and self.bad_evals >= self.patience

  def state_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    for field in ("best_value", "best_step", "bad_evals"):
      setattr(self, field, state.get(field))
    self.bad_evals = int(self.bad_evals or 0)
