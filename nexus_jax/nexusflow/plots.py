"""Which tables mattered: NexusFormer's per-context attention and fusion gates as a PNG."""

from __future__ import annotations

import pathlib
from typing import Sequence

# matplotlib.figure.Figure draws without pyplot or a backend: saving a plot never changes the
# backend of the caller (a notebook keeps its inline plots).
from matplotlib.figure import Figure
import numpy as np


def context_importance(
    attention: np.ndarray, gates: np.ndarray, present: np.ndarray
) -> dict[str, np.ndarray]:
  """Mean per-context statistics over rows where the context is present.

  Args:
    attention: f32[N, C], the target token's attention on each context (aux["context_attention"]).
    gates: f32[N, C], fusion gates (aux["fusion_gates"]).
    present: bool[N, C] (aux["context_present"]).
  Returns:
    {"attention": [C], "gate": [C], "present": [C] (share of rows with the context)}.
  """
  present = np.asarray(present, bool)
  count = np.maximum(present.sum(0), 1)
  return {
      "attention": (np.asarray(attention) * present).sum(0) / count,
      "gate": (np.asarray(gates) * present).sum(0) / count,
      "present": present.mean(0),
  }


def plot_context_importance(
    path: str | pathlib.Path,
    names: Sequence[str],
    tables: Sequence[str],
    importance: dict[str, np.ndarray],
    title: str = "Which tables mattered",
) -> pathlib.Path:
  """Horizontal bars per context: mean attention from the target row (left) and fusion gate (right)."""
  labels = [f"{n}  [{t}]" for n, t in zip(names, tables)]
  order = np.argsort(importance["attention"])
  fig = Figure(figsize=(11, 0.45 * len(names) + 1.8))
  axes = fig.subplots(1, 2, sharey=True)
  y = np.arange(len(names))
  axes[0].barh(y, importance["attention"][order], color="C0")
  axes[0].set_xlabel("mean attention of the target row (last refinement)")
  axes[1].barh(y, importance["gate"][order], color="C1")
  axes[1].set_xlabel("mean fusion gate")
  axes[0].set_yticks(y, [labels[i] for i in order])
  for ax in axes:
    ax.grid(axis="x", alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  return path
