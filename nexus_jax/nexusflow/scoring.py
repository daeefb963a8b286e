"""Metrics of a `TabularPredictor` on labelled tables (an evaluation folder, eval_tables).

    arrays = labelled_arrays(predictor, tables)       # builds the context sets once
    metrics = score_arrays(predictor, arrays)         # {"auc", "log_loss", "accuracy"} (binary)
    metric, mode = PRIMARY_METRIC[predictor.task]     # ("auc", "max"): what "better" means

Every row of the target table is scored (the schema's split is not applied: the folder is the
evaluation set); its target column must be present. Several predictors with the same model (e.g.
an int8 and a pruned copy) share one `predict_fn` and one `labelled_arrays`, so one compilation and
one context build serve them all.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from nexus_jax.data.schema import SchemaError
from nexus_jax.nexusflow.batch_inference import make_predict_fn, predict_arrays
from nexus_jax.nexusflow.objectives import evaluation_metrics, relational_arrays
from nexus_jax.nexusflow.table_predictor import TabularPredictor
from nexus_jax.nexusflow.training import DEFAULT_METRIC

PRIMARY_METRIC = DEFAULT_METRIC  # task -> (metric, "max" | "min"): the early-stopping default


def labelled_arrays(
    predictor: TabularPredictor, tables: Mapping[str, pd.DataFrame], where: str = "eval data"
) -> dict[str, Any]:
  """The model inputs of every target-table row plus "y" (class indices or standardised values).

  Raises SchemaError naming the target table and column when the labels are absent.
  """
  target = predictor.schema.target
  if target.table not in tables or target.column not in tables[target.table].columns:
    raise SchemaError(
        f"{where}: table {target.table!r} needs the target column {target.column!r} to score"
    )
  y_raw = tables[target.table][target.column]
  if y_raw.isna().any():
    raise SchemaError(
        f"{where}: table {target.table!r} column {target.column!r} has {int(y_raw.isna().sum())} "
        "missing label(s); score only labelled rows"
    )
  arrays = relational_arrays(predictor.relational_data(tables))
  if predictor.task == "regression":
    shift, scale = predictor.target_scale
    arrays["y"] = ((y_raw.to_numpy(np.float64) - shift) / scale).astype(np.float32)
  else:
    arrays["y"] = predictor.builder._labels(y_raw).astype(np.int64)
  return arrays


def score_arrays(
    predictor: TabularPredictor, arrays: Mapping[str, Any], predict_fn: Callable | None = None
) -> dict[str, float]:
  """The task's metrics of `predictor` on `labelled_arrays` (regression in target units)."""
  preds, _ = predict_arrays(
      predictor.model, predictor.variables, arrays, predictor.task, predict_fn=predict_fn
  )
  return evaluation_metrics(predictor.task, preds, arrays["y"], predictor.target_scale)


def shared_predict_fn(predictor: TabularPredictor) -> Callable:
  """A jitted predict function for `predictor`'s model, reusable by its optimised copies."""
  return make_predict_fn(predictor.model, predictor.task)


def score_tables(
    predictor: TabularPredictor, tables: Mapping[str, pd.DataFrame], where: str = "eval data"
) -> dict[str, float]:
  """`score_arrays(predictor, labelled_arrays(predictor, tables))`."""
  return score_arrays(predictor, labelled_arrays(predictor, tables, where))


def is_better(task: str, a: float, b: float) -> bool:
  """Whether metric value `a` beats `b` for `task`'s primary metric (NaN never beats anything)."""
  _, mode = PRIMARY_METRIC[task]
  if np.isnan(a):
    return False
  if np.isnan(b):
    return True
  return a > b if mode == "max" else a < b
