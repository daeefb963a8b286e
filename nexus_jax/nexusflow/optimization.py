"""Int8 / int4 quantisation and magnitude pruning of a trained NexusFlow model, and their report.

    stored, params, report = optimize_params(params, "int8")            # what TabularPredictor.optimize does
    stored, params, report = optimize_params(params, "int4", group_size=64)  # packed, 64 rows/scale
    report = optimization_report(model, variables, arrays, task, scale)  # metrics before / int8 / pruned

`optimize_params` is the one place a method is applied: "int8" stores weight-only int8 leaves
(`stored`; `params` is their dequantised float copy, which predicts), "int4" packed int4 leaves with
one scale per `group_size` rows (`inference/quantize.py`), "prune" zeroes `amount` of the prunable
weights by global magnitude (`stored` is `params`). `optimization_report` scores the
float model, its int8 copy and its pruned copy on the same labelled arrays (the runner's test split,
the estimator's test rows) and reports each change.
"""

from __future__ import annotations

from typing import Any

import jax

from nexus_jax.inference import dequantize, magnitude_prune, quantize, quantize_int8
from nexus_jax.inference.quantize import DEFAULT_INT4_GROUP
from nexus_jax.nexusflow.batch_inference import make_predict_fn, predict_arrays
from nexus_jax.nexusflow.objectives import evaluation_metrics

METHODS = ("int8", "prune")  # compared by `optimization_report` (the runner's results.json)
ALL_METHODS = ("int8", "int4", "prune")  # accepted by `optimize_params`
QUANTIZED = ("int8", "int4")  # methods whose stored params are quantised leaves


def optimize_params(
    params: Any,
    method: str,
    amount: float = 0.5,
    min_size: int = 256,
    group_size: int | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
  """Applies `method` ("int8" | "int4" | "prune") to a params tree.

  `group_size` (int4 only; default `DEFAULT_INT4_GROUP`) is the number of rows sharing a scale.
  Returns:
    (stored params, float params that predict, report {"method", ...}).
  """
  if group_size is not None and method != "int4":
    raise ValueError(f"optimize({method!r}): group_size applies to int4 only")
  if method == "int8":
    stored, report = quantize_int8(params, min_size=min_size)
    return stored, dequantize(stored), {"method": method, **report}
  if method == "int4":
    group = DEFAULT_INT4_GROUP if group_size is None else group_size
    stored, report = quantize(params, bits=4, group_size=group, min_size=min_size)
    return stored, dequantize(stored), {"method": method, **report}
  if method == "prune":
    if not 0.0 <= float(amount) < 1.0:
      raise ValueError(f"optimize('prune'): amount={amount}; must be in [0, 1)")
    pruned, report = magnitude_prune(params, float(amount))
    report.pop("per_leaf", None)
    return pruned, pruned, {"method": method, **report}
  raise ValueError(f"optimize: method={method!r}; choose one of {ALL_METHODS}")


def optimization_report(
    model: Any,
    variables: dict[str, Any],
    arrays: dict[str, Any],
    task: str,
    target_scale: tuple[float, float],
    prune_amount: float = 0.5,
) -> dict[str, Any]:
  """Metrics on labelled `arrays` of the float model, its int8 copy and its pruned copy.

  Returns:
    {"float32": metrics, "int8": {report..., "metrics", "change"}, "prune": {...}}.
  """
  predict_fn = make_predict_fn(model, task)
  params = jax.device_get(variables["params"])
  extra = {k: v for k, v in variables.items() if k != "params"}

  def metrics(params_used: Any) -> dict[str, float]:
    preds, _ = predict_arrays(
        model, {"params": params_used, **extra}, arrays, task, predict_fn=predict_fn
    )
    return evaluation_metrics(task, preds, arrays["y"], target_scale)

  base = metrics(params)
  out: dict[str, Any] = {"float32": base}
  for method in METHODS:
    _, used, report = optimize_params(params, method, amount=prune_amount)
    after = metrics(used)
    out[method] = {**report, "metrics": after, "change": {k: after[k] - base[k] for k in base}}
  return out
