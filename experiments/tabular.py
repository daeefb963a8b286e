"""Tabular experiment: glue around the NexusFlow pipeline (`nexus_jax/nexusflow/pipeline.py`).

`run(config, workdir)` (the preset is already resolved by `experiments/run.py`):
  `model.name = "nexus_former"`: prepare -> train -> score (the same pipeline as the estimator),
  then the TASKS.md baselines next to the test metrics, `context_attention.png`,
  `learning_curves.png`, `results.json` and a predict-ready `artifact/`;
  `model.name = "row"`: the flat feature-set-A baseline (`experiments/tabular_row.py`).
Across processes every process trains and scores; only process 0 writes the plots, results.json
and the artifact.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import numpy as np

from experiments.tabular_row import run_row
from nexus_jax.nexusflow import pipeline
from nexus_jax.nexusflow.artifact import json_default, save_artifact
from nexus_jax.nexusflow.plots import plot_context_importance
from nexus_jax.nexusflow.table_predictor import TabularPredictor
from nexus_jax.train import distributed
from nexus_jax.train.plots import plot_learning_curves

MODELS = ("nexus_former", "row")


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  if config.model.name not in MODELS:
    raise ValueError(f"config.model.name={config.model.name!r}; choose one of {MODELS}.")
  if config.model.name == "row":
    return run_row(config, workdir)
  t0 = time.perf_counter()
  prepared = pipeline.prepare(config)
  result, schedule = pipeline.train(prepared, config, workdir)
  results = {"preset": config.preset, **pipeline.score(prepared, result, config, schedule)}
  baselines = {k: v["test_auc"] for k, v in prepared.baselines.items() if "test_auc" in v}
  results["baselines_test_auc"] = baselines
  if "auc" in results["test"] and {"lightgbm_set_a", "catboost_set_b"} <= set(baselines):
    results["beats_lightgbm_set_a"] = bool(results["test"]["auc"] > baselines["lightgbm_set_a"])
    results["beats_catboost_set_b"] = bool(results["test"]["auc"] > baselines["catboost_set_b"])
  names = results["model"]["contexts"]
  primary = distributed.is_primary()  # the one process that writes files
  if primary and config.eval.plot_attention and names and results["context_importance"]:
    importance = {
        k: np.array([results["context_importance"][n][k] for n in names])
        for k in ("attention", "gate", "present")
    }
    plot_context_importance(
        workdir / "context_attention.png",
        names,
        results["model"]["context_tables"],
        importance,
        title=f"Which tables mattered ({prepared.name}, test rows)",
    )
  if config.eval.save_artifact:
    results["artifact"] = str(workdir / "artifact")
    if primary:
      predictor = TabularPredictor.from_training(prepared.builder, result, prepared.tables, config)
      results["artifact"] = str(save_artifact(predictor, workdir / "artifact"))
  results["wall_seconds"] = round(time.perf_counter() - t0, 2)
  if not primary:
    return results
  (workdir / "results.json").write_text(json.dumps(results, indent=2, default=json_default))
  for member_dir in [m["workdir"] for m in result.members] or [workdir]:
    plot_learning_curves(member_dir, valid_metric=result.early_stopping[0])
  return results
