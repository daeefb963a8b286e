"""Learning-curve plots from `workdir/metrics.jsonl` (matplotlib, headless)."""

from __future__ import annotations

import pathlib

# matplotlib.figure.Figure draws without pyplot or a backend: saving a plot never changes the
# backend of the caller (a notebook keeps its inline plots).
from matplotlib.figure import Figure

from nexus_jax.train.metrics import read_metrics


def plot_learning_curves(
    workdir: str | pathlib.Path,
    valid_metric: str | None = None,
    filename: str = "learning_curves.png",
) -> pathlib.Path:
  """Train/valid loss per step (left) and `valid_metric` per step (right); returns the PNG path."""
  workdir = pathlib.Path(workdir)
  train, valid = read_metrics(workdir, "train"), read_metrics(workdir, "valid")
  panels = 2 if valid_metric else 1
  fig = Figure(figsize=(5.5 * panels, 4))
  axes = fig.subplots(1, panels, squeeze=False)
  ax = axes[0, 0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.8)
  if valid:
    ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid loss")
  ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
  if valid_metric:
    ax = axes[0, 1]
    points = [(r["step"], r[valid_metric]) for r in valid if valid_metric in r]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="C2")
    ax.set_xlabel("step"), ax.set_ylabel(f"valid {valid_metric}"), ax.grid(alpha=0.3)
  fig.tight_layout()
  path = workdir / filename
  fig.savefig(path, dpi=110)
  return path
