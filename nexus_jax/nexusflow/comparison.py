"""Metrics of a benchmark task and paired bootstrap intervals of the difference between two models.

    m = task_metrics("binary", y, p)                  # {"auc": ..., "log_loss": ...}
    lo, hi = paired_bootstrap(task, y, p_model, p_reference)   # 95% interval of primary(model) - primary(ref)
    outcome(task, lo, hi)                             # "win" | "tie" | "loss" for the model

Primary metric (`PRIMARY`): AUC (binary), macro one-vs-rest AUC (multiclass), RMSE (regression,
lower is better). Predictions: P(y=1) `[N]` (binary), class probabilities `[N, K]` (multiclass),
values `[N]` (regression). The bootstrap resamples the test rows (the same resample for both models)
`n_boot` times with a fixed seed; a tie is an interval that contains 0.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import log_loss, r2_score

PRIMARY = {"binary": "auc", "multiclass": "macro_auc", "regression": "rmse"}
HIGHER_IS_BETTER = {"auc": True, "macro_auc": True, "rmse": False}
EPS = 1e-7


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
  """ROC AUC from ranks (ties count one half), as sklearn's; NaN without both outcomes."""
  positive = np.asarray(positive, bool)
  n1 = int(positive.sum())
  n0 = len(positive) - n1
  if n1 == 0 or n0 == 0:
    return float("nan")
  r = rankdata(score)
  return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
  """Mean one-vs-rest AUC over the classes present in `y` with both outcomes (NaN if none)."""
  aucs = [roc_auc(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < (y == k).sum() < len(y)]
  return float(np.mean(aucs)) if aucs else float("nan")


def primary_metric(task: str, y: np.ndarray, p: np.ndarray) -> float:
  if task == "binary":
    return roc_auc(y == 1, p)
  if task == "multiclass":
    return _macro_auc(y, p)
  return float(np.sqrt(np.mean((np.asarray(p, np.float64) - y) ** 2)))


def task_metrics(task: str, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
  """Every reported metric of one model on one task (see the module docstring)."""
  y = np.asarray(y)
  out = {PRIMARY[task]: primary_metric(task, y, p)}
  if task == "binary":
    out["log_loss"] = float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))
  elif task == "multiclass":
    q = np.clip(p, EPS, 1.0)
    out["log_loss"] = float(log_loss(y, q / q.sum(1, keepdims=True), labels=np.arange(p.shape[1])))
  else:
    out["r2"] = float(r2_score(y, p))
  return out


def paired_bootstrap(
    task: str,
    y: np.ndarray,
    p_model: np.ndarray,
    p_reference: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
  """95% percentile interval of primary(model) - primary(reference) over paired resamples."""
  rng = np.random.default_rng(seed)
  y = np.asarray(y)
  n = len(y)
  diffs = []
  for _ in range(n_boot):
    idx = rng.integers(0, n, n)
    d = primary_metric(task, y[idx], p_model[idx]) - primary_metric(task, y[idx], p_reference[idx])
    if np.isfinite(d):
      diffs.append(d)
  if not diffs:
    return float("nan"), float("nan")
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  return float(lo), float(hi)


def outcome(task: str, lo: float, hi: float) -> str:
  """ "win" / "loss" when the interval excludes 0 on the model's better / worse side, else "tie"."""
  if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 <= hi:
    return "tie"
  better = lo > 0 if HIGHER_IS_BETTER[PRIMARY[task]] else hi < 0
  return "win" if better else "loss"


def ranks(task: str, scores: dict[str, float]) -> dict[str, float]:
  """Rank (1 = best, ties share the mean rank) of each model's primary metric on one task."""
  names = list(scores)
  values = np.array([scores[k] for k in names], np.float64)
  if HIGHER_IS_BETTER[PRIMARY[task]]:
    values = -values
  order = values.argsort(kind="stable")
  r = np.empty(len(values))
  r[order] = np.arange(1, len(values) + 1)
  for v in np.unique(values):  # equal scores share their mean rank
    same = values == v
    r[same] = r[same].mean()
  return {k: float(r[i]) for i, k in enumerate(names)}
