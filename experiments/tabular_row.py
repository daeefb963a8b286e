"""The flat baseline of the tabular experiment (`config.model.name = "row"`): results writing around the
library's `nexus_jax/nexusflow/flat.py` (feature set A -> RowPredictor, trained with the generic loop,
the schedule scaled to the data as for NexusFormer); writes results.json and learning_curves.png.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax

from nexus_jax.data.datasets import nycflights13
from nexus_jax.nexusflow.flat import train_row_model
from nexus_jax.train import distributed
from nexus_jax.train.plots import plot_learning_curves

METRICS = ("auc", "log_loss", "accuracy")


def run_row(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  t0 = time.perf_counter()
  run = train_row_model(config, workdir)
  valid = run.result.best_metrics or {}
  baselines = {k: v["test_auc"] for k, v in nycflights13.BASELINES.items()}
  results = {
      "task": "nycflights13 delayed > 15 min (feature set A, flat)",
      "preset": config.preset,
      "test": {k: run.test_metrics[k] for k in METRICS},
      "valid_at_best": {k: valid.get(k) for k in METRICS},
      "best_step": run.result.best_step,
      "stopped_early": run.result.stopped_early,
      "model": {"name": "row", "encoder": config.model.row.encoder, "parameters": run.parameters},
      "rows": run.rows,
      "schedule": run.schedule,
      "train_seconds_this_call": round(run.result.train_seconds, 2),
      "train_rows_per_second": round(run.result.rows_per_second, 1),
      "data_seconds": round(run.data_seconds, 2),
      "wall_seconds": round(time.perf_counter() - t0, 2),
      "baselines_test_auc": baselines,
      "beats_lightgbm_set_a": bool(run.test_metrics["auc"] > baselines["lightgbm_set_a"]),
      "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
  }
  if distributed.is_primary():  # across processes only process 0 writes files
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    plot_learning_curves(workdir, valid_metric=config.train.early_stopping.metric)
  return results
