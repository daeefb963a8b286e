"""The flat baseline of the tabular experiment (`config.model.name = "row"`): glue around the library's
data and model pieces (`nexus_jax/nexusflow/flat.py`).

1. nycflights13 feature set A (one-to-one joins, split by month), preprocessor fitted on train only;
2. the schedule scaled to the training rows (`nexusflow/schedule.py`, as for NexusFormer);
3. a RowPredictor (`config.model.row.*`) trained with the generic loop (early stopping on validation
   AUC, checkpoints, resume when rerun in the same workdir);
4. the best checkpoint evaluated on test once; results.json and learning_curves.png.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

from nexus_jax.data.datasets import nycflights13
from nexus_jax.nexusflow.flat import SPLITS, build_row_model, load_flat_splits
from nexus_jax.nexusflow.objectives import tabular_objective
from nexus_jax.nexusflow.schedule import scale_schedule
from nexus_jax.train.config import validate_train_config
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.plots import plot_learning_curves

METRICS = ("auc", "log_loss", "accuracy")


def run_row(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  validate_train_config(config)
  t0 = time.perf_counter()
  splits, pre = load_flat_splits(config.data)
  data_seconds = time.perf_counter() - t0
  pre.save(workdir / "preprocessor")
  model = build_row_model(config, pre)
  schedule = scale_schedule(config, len(splits["train"]["y"]))
  bs = int(config.train.batch_size)
  train = ArrayDataset(splits["train"], bs, seed=int(config.seed))
  valid, test = ArrayDataset(splits["valid"], bs), ArrayDataset(splits["test"], bs)
  result = fit(tabular_objective(model, "binary"), train, valid, config, workdir)
  best = restore_best(result)
  test_metrics, _ = result.trainer.evaluate(best, test)
  valid_metrics = result.best_metrics or {}
  baselines = {k: v["test_auc"] for k, v in nycflights13.BASELINES.items()}
  results = {
      "task": "nycflights13 delayed > 15 min (feature set A, flat)",
      "preset": config.preset,
      "test": {k: test_metrics[k] for k in METRICS},
      "valid_at_best": {k: valid_metrics.get(k) for k in METRICS},
      "best_step": result.best_step,
      "stopped_early": result.stopped_early,
      "model": {
          "name": "row",
          "encoder": config.model.row.encoder,
          "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(best.params)),
      },
      "rows": {name: int(len(splits[name]["y"])) for name in SPLITS},
      "schedule": schedule,
      "train_seconds_this_call": round(result.train_seconds, 2),
      "train_rows_per_second": round(result.rows_per_second, 1),
      "data_seconds": round(data_seconds, 2),
      "wall_seconds": round(time.perf_counter() - t0, 2),
      "baselines_test_auc": baselines,
      "beats_lightgbm_set_a": bool(test_metrics["auc"] > baselines["lightgbm_set_a"]),
      "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  plot_learning_curves(workdir, valid_metric=config.train.early_stopping.metric)
  return results
