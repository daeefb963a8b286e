"""scikit-learn-style estimators over several related tables: `NexusFlowClassifier`, `NexusFlowRegressor`.

    clf = NexusFlowClassifier()                     # quick default config, any valid schema
    clf.fit(tables, schema)                         # tables: {name: DataFrame}; schema: Schema or dict
    proba = clf.predict_proba(new_tables)           # [n_rows, n_classes], one row per target-table row, in order
    clf.optimize("int8"); clf.save("model_dir")     # artifact: JSON + arrays + Orbax params, no pickle
    same = NexusFlowClassifier.load("model_dir")    # predicts identically

`fit` builds the leakage-safe context sets from the schema (`ContextSetBuilder`; contexts, history
lengths and window-count features from `builder_kwargs`, e.g. ``{"max_history": 16, "count_windows":
[1, 24]}``, else every discovered context with `max_history` rows and no counts), trains
NexusFormer on the schema's "train" split and early-stops on its "valid" split (the "test" split is
scored once into `fit_report_["test"]` if it has rows, never used for training). At predict time the
target table holds the rows to predict, without the target column; `history` passes earlier
target-table rows that the new rows' histories may look at. A deep ensemble:
``config_overrides={"model.ensemble_size": 3}`` (the "full" preset's setting).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
from typing import Any, Mapping

import ml_collections
import numpy as np
import pandas as pd

from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import Schema, SchemaError
from nexus_jax.nexusflow.artifact import MANIFEST_FILE, sha256_file, load_artifact, save_artifact
from nexus_jax.nexusflow.config import apply_preset, tabular_config
from nexus_jax.nexusflow.objectives import evaluation_metrics, relational_arrays
from nexus_jax.nexusflow.table_predictor import TabularPredictor
from nexus_jax.nexusflow.batch_inference import predict_arrays
from nexus_jax.nexusflow.training import train_nexus_former
from nexus_jax.train.presets import set_path

ESTIMATOR_FILE = "estimator.json"


class _NexusFlowBase:
  """Shared fit / predict / save / load; see the module docstring."""

  _tasks: tuple[str, ...] = ()

  def __init__(
      self,
      preset: str = "quick",
      num_epochs: int | None = None,
      batch_size: int | None = None,
      learning_rate: float | None = None,
      d_model: int | None = None,
      min_steps: int = 200,
      max_history: int = 16,
      builder_kwargs: Mapping[str, Any] | None = None,
      config_overrides: Mapping[str, Any] | None = None,
      seed: int = 0,
      workdir: str | None = None,
      verbose: bool = False,
  ):
    self.preset = preset
    self.num_epochs = num_epochs
    self.batch_size = batch_size
    self.learning_rate = learning_rate
    self.d_model = d_model
    self.min_steps = min_steps
    self.max_history = max_history
    self.builder_kwargs = builder_kwargs
    self.config_overrides = config_overrides
    self.seed = seed
    self.workdir = workdir
    self.verbose = verbose

  _PARAMS = (
      "preset",
      "num_epochs",
      "batch_size",
      "learning_rate",
      "d_model",
      "min_steps",
      "max_history",
      "builder_kwargs",
      "config_overrides",
      "seed",
      "workdir",
      "verbose",
  )

  # ------------------------------------------------------------------ sklearn protocol
  def get_params(self, deep: bool = True) -> dict[str, Any]:
    return {k: getattr(self, k) for k in self._PARAMS}

  def set_params(self, **params: Any) -> "_NexusFlowBase":
    unknown = sorted(set(params) - set(self._PARAMS))
    if unknown:
      raise ValueError(
          f"{type(self).__name__}.set_params: unknown parameter(s) {unknown}; "
          f"valid: {list(self._PARAMS)}"
      )
    for k, v in params.items():
      setattr(self, k, v)
    return self

  def __repr__(self) -> str:
    changed = {k: v for k, v in self.get_params().items() if v != type(self)().get_params()[k]}
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

  # ------------------------------------------------------------------ config
  def make_config(self, n_train: int) -> ml_collections.ConfigDict:
    """The training config: quick defaults -> preset -> constructor arguments -> config_overrides."""
    c = tabular_config()
    c.preset = self.preset
    apply_preset(c)
    with c.unlocked():
      c.seed = int(self.seed)
      c.train.progress = bool(self.verbose)
      c.train.tensorboard = False
      for field, value in (("num_epochs", self.num_epochs), ("batch_size", self.batch_size)):
        if value is not None:
          c.train[field] = int(value)
      if self.learning_rate is not None:
        c.optim.learning_rate = float(self.learning_rate)
      if self.d_model is not None:
        c.model.d_model = int(self.d_model)
      for path, value in (self.config_overrides or {}).items():
        try:
          set_path(c, path, value)
        except KeyError:
          raise ValueError(f"config_overrides: config has no field {path!r}") from None
      c.train.batch_size = int(min(c.train.batch_size, max(8, n_train // 4)))
      steps_per_epoch = max(n_train // c.train.batch_size, 1)
      c.train.num_steps = max(int(c.train.num_epochs) * steps_per_epoch, int(self.min_steps))
      c.optim.warmup_steps = int(min(c.optim.warmup_steps, c.train.num_steps // 10))
      c.train.eval_every_steps = int(
          c.train.eval_every_steps or min(steps_per_epoch, max(c.train.num_steps // 4, 1))
      )
    return c

  # ------------------------------------------------------------------ fit
  def fit(self, tables: Mapping[str, pd.DataFrame], schema: Schema | Mapping) -> "_NexusFlowBase":
    """Trains on `tables` described by `schema`; returns self."""
    schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
    if schema.target.task not in self._tasks:
      raise SchemaError(
          f"{type(self).__name__} handles tasks {self._tasks}; the schema's target task is "
          f"{schema.target.task!r}"
      )
    t0 = time.perf_counter()
    kwargs = dict(self.builder_kwargs or {"max_history": int(self.max_history)})
    builder = ContextSetBuilder(schema, **kwargs).fit(tables)
    data = builder.transform(tables)
    train, valid, test = (data.subset(s) for s in ("train", "valid", "test"))
    config = self.make_config(train.num_rows)
    with tempfile.TemporaryDirectory(prefix="nexusflow-") as tmp:
      result = train_nexus_former(
          train, valid if valid.num_rows else None, config, self.workdir or tmp
      )
    self.predictor_ = TabularPredictor.from_training(builder, result, tables, config)
    report = {
        "rows": {"train": train.num_rows, "valid": valid.num_rows, "test": test.num_rows},
        "valid": result.fit.best_metrics,
        "steps": int(config.train.num_steps),
        "rows_per_second": result.fit.rows_per_second,
        "seconds": time.perf_counter() - t0,
    }
    if result.members:
      report["members"] = [
          {k: m[k] for k in ("seed", "best_step", "valid")} for m in result.members
      ]
    if test.num_rows:
      preds, _ = predict_arrays(
          result.model, result.variables, relational_arrays(test, result.target_scale), test.task
      )
      y = relational_arrays(test, result.target_scale)["y"]
      report["test"] = evaluation_metrics(test.task, preds, y, result.target_scale)
    self.fit_report_ = report
    self.classes_ = None if builder.classes is None else np.asarray(builder.classes)
    return self

  def _require_fitted(self) -> TabularPredictor:
    if not hasattr(self, "predictor_"):
      raise RuntimeError(
          f"{type(self).__name__} is not fitted: call fit(tables, schema) or load(path)"
      )
    return self.predictor_

  # ------------------------------------------------------------------ predict
  def predict(
      self, tables: Mapping[str, pd.DataFrame], history: pd.DataFrame | None = None
  ) -> np.ndarray:
    """One label (classifier) or value (regressor) per row of the target table, in order."""
    return self._require_fitted().predict(tables, history)

  # ------------------------------------------------------------------ optimisation + persistence
  def optimize(
      self,
      method: str = "int8",
      amount: float = 0.5,
      eval_tables: Mapping[str, pd.DataFrame] | None = None,
  ) -> dict[str, Any]:
    """Int8 quantisation ("int8") or global magnitude pruning ("prune", `amount`); the saved artifact
    reflects it. With labelled `eval_tables` the report holds the metrics before and after."""
    predictor = self._require_fitted()
    before = self._score(eval_tables) if eval_tables is not None else None
    report = predictor.optimize(method, amount=amount)
    if before is not None:
      after = self._score(eval_tables)
      report = {
          **report,
          "metrics_before": before,
          "metrics_after": after,
          "change": {k: after[k] - before[k] for k in before},
      }
    return report

  def _score(self, tables: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    predictor = self._require_fitted()
    column = predictor.schema.target.column
    y_raw = tables[predictor.schema.target.table][column]
    data = predictor.relational_data(tables)
    preds, _ = predict_arrays(
        predictor.model, predictor.variables, relational_arrays(data), predictor.task
    )
    if predictor.task == "regression":
      shift, scale = predictor.target_scale
      return evaluation_metrics(
          "regression", preds, (y_raw.to_numpy(np.float64) - shift) / scale, predictor.target_scale
      )
    y = predictor.builder._labels(y_raw)
    return evaluation_metrics(predictor.task, preds, y.astype(np.int64))

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    """Writes the artifact (see `artifact.py`) plus this estimator's parameters as JSON."""
    path = save_artifact(self._require_fitted(), path)
    return _add_estimator_file(path, {"class": type(self).__name__, "params": self.get_params()})

  @classmethod
  def load(cls, path: str | pathlib.Path) -> "_NexusFlowBase":
    """Loads an artifact written by `save` (integrity-checked, no pickle)."""
    predictor = load_artifact(path)
    if predictor.task not in cls._tasks:
      raise SchemaError(
          f"{cls.__name__}.load: the artifact at {path} is a {predictor.task!r} model"
      )
    est_file = pathlib.Path(path) / ESTIMATOR_FILE
    params = json.loads(est_file.read_text())["params"] if est_file.exists() else {}
    est = cls(**{k: v for k, v in params.items() if k in cls._PARAMS})
    est.predictor_ = predictor
    est.classes_ = None if predictor.classes is None else np.asarray(predictor.classes)
    return est


def _add_estimator_file(path: pathlib.Path, payload: dict) -> pathlib.Path:
  """Adds estimator.json to a saved artifact and records it in the manifest."""
  (path / ESTIMATOR_FILE).write_text(json.dumps(payload, indent=1))
  manifest = json.loads((path / MANIFEST_FILE).read_text())
  manifest["sha256"][ESTIMATOR_FILE] = sha256_file(path / ESTIMATOR_FILE)
  (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
  return path


class NexusFlowClassifier(_NexusFlowBase):
  """Binary or multiclass classification over related tables (see the module docstring)."""

  _tasks = ("binary", "multiclass")

  def predict_proba(
      self, tables: Mapping[str, pd.DataFrame], history: pd.DataFrame | None = None
  ) -> np.ndarray:
    """f64[n_rows, n_classes], columns in `classes_` order."""
    return self._require_fitted().predict_proba(tables, history)


class NexusFlowRegressor(_NexusFlowBase):
  """Regression over related tables (see the module docstring)."""

  _tasks = ("regression",)
