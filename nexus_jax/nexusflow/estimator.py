"""scikit-learn-style estimators over several related tables: `NexusFlowClassifier`, `NexusFlowRegressor`.

    from nexus_jax import NexusFlowClassifier, Schema
    clf = NexusFlowClassifier()                     # the quick defaults, any valid schema
    clf.fit(tables, schema)                         # tables: {name: DataFrame}; schema: Schema or dict
    proba = clf.predict_proba(new_tables)           # [n_rows, n_classes], one row per target-table row
    clf.optimize("int8"); clf.save("model_dir")     # artifact: JSON + arrays + Orbax params, no pickle
    same = NexusFlowClassifier.load("model_dir")    # predicts identically

`fit` runs the same pipeline as `python -m experiments.run --config configs/tabular.py`
(`pipeline.py`: prepare -> train -> score): it builds the leakage-safe context sets from the schema,
scales the schedule to the training rows (`schedule.py`), trains NexusFormer on the schema's "train"
split, early-stops on its "valid" split, and scores the "test" split once (if it has rows) into
`fit_report_`, the same results dict the runner writes to results.json (without the int8 / pruning
report unless ``config_overrides={"eval.optimize": True}``: `optimize` measures that on demand).

The config is the library default (`config.py`), then the preset's fields, then the constructor
arguments and `config_overrides` ({"dotted.path": value}, any field of the config, e.g.
``{"data.count_windows": "1,24", "train.num_steps": 500, "model.ensemble_size": 3}``); arguments and
overrides always win over the preset. A key the config does not have, or one the estimator cannot
honour (`REFUSED`), raises a ValueError naming it. `builder_kwargs` pass `ContextSetBuilder`
arguments directly (they win over `data.*`). At predict time the target table holds the rows to
predict, without the target column; `history` passes earlier target-table rows that the new rows'
histories may look at.
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

from nexus_jax.data.schema import Schema, SchemaError
from nexus_jax.nexusflow import pipeline
from nexus_jax.nexusflow.artifact import load_artifact, save_artifact
from nexus_jax.nexusflow.config import PRESETS, tabular_config
from nexus_jax.nexusflow.scoring import score_tables
from nexus_jax.nexusflow.table_predictor import TabularPredictor
from nexus_jax.train.presets import get_path, resolve_preset, set_path

ESTIMATOR_FILE = "estimator.json"

# Config fields the estimator cannot honour: path -> what to do instead.
REFUSED = {
    "experiment": "the estimator always trains NexusFlow",
    "preset": "pass preset=... to the constructor",
    "data.name": "the estimator trains on the tables passed to fit()",
    "data.path": "the estimator trains on the tables passed to fit()",
    "model.name": "the estimator trains NexusFormer (the flat 'row' model is a runner baseline)",
    "eval.plot_attention": "plots are written by the runner only",
    "eval.save_artifact": "call save(path) after fit",
}


def _with_table_encoders(config: ml_collections.ConfigDict, schema: Schema | None) -> None:
  """Adds `model.encoders.<table>` = "" (the default encoder) for every table of `schema`."""
  if schema is None:
    return
  with config.unlocked():
    for table in schema.tables:
      if table not in config.model.encoders:
        config.model.encoders[table] = ""


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
      min_steps: int | None = None,
      max_history: int | None = None,
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
  # constructor argument -> config field it sets (None = not set)
  _FIELDS = {
      "num_epochs": "train.num_epochs",
      "batch_size": "train.batch_size",
      "learning_rate": "optim.learning_rate",
      "d_model": "model.d_model",
      "min_steps": "train.min_steps",
      "max_history": "data.max_history",
  }

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
    defaults = type(self)().get_params()
    changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

  # ------------------------------------------------------------------ config
  def make_config(self, schema: Schema | Mapping | None = None) -> ml_collections.ConfigDict:
    """The training config: library defaults -> preset -> constructor arguments / config_overrides
    (which always win over the preset). The schedule is scaled to the data later, in `fit`.

    Raises:
      ValueError naming an unknown or refused `config_overrides` key, a value of the wrong type,
      or an unknown preset.
    """
    if schema is not None and not isinstance(schema, Schema):
      schema = Schema.from_dict(schema)
    c, defaults = tabular_config(), tabular_config()
    _with_table_encoders(c, schema)
    _with_table_encoders(defaults, schema)
    explicit = set()
    with c.unlocked():
      c.preset = self.preset
      c.seed = int(self.seed)
      c.train.progress = bool(self.verbose)
      c.train.tensorboard = False
      # fit() does not evaluate int8 / pruned copies (the runner's report): call optimize(...,
      # eval_tables=...) for that; config_overrides={"eval.optimize": True} restores it.
      c.eval.optimize = False
      for arg, path in self._FIELDS.items():
        value = getattr(self, arg)
        if value is not None:
          set_path(c, path, type(get_path(c, path))(value))
          explicit.add(path)
      for path, value in (self.config_overrides or {}).items():
        if path in REFUSED:
          raise ValueError(
              f"config_overrides: {path!r} is not honoured by the estimator: {REFUSED[path]}"
          )
        try:
          set_path(c, path, tuple(value) if isinstance(value, list) else value)
        except KeyError:
          raise ValueError(f"config_overrides: the config has no field {path!r}") from None
        except TypeError as err:
          raise ValueError(f"config_overrides[{path!r}] = {value!r}: {err}") from None
        explicit.add(path)
    resolve_preset(c, PRESETS, defaults, explicit)
    return c

  # ------------------------------------------------------------------ fit
  def fit(self, tables: Mapping[str, pd.DataFrame], schema: Schema | Mapping) -> "_NexusFlowBase":
    """Trains on `tables` described by `schema`; returns self (see the module docstring)."""
    schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
    if schema.target.task not in self._tasks:
      raise SchemaError(
          f"{type(self).__name__} handles tasks {self._tasks}; the schema's target task is "
          f"{schema.target.task!r}"
      )
    t0 = time.perf_counter()
    config = self.make_config(schema)
    prepared = pipeline.prepare(config, tables, schema, self.builder_kwargs)
    with tempfile.TemporaryDirectory(prefix="nexusflow-") as tmp:
      result, schedule = pipeline.train(prepared, config, self.workdir or tmp)
    self.predictor_ = TabularPredictor.from_training(prepared.builder, result, tables, config)
    self.fit_report_ = {
        **pipeline.score(prepared, result, config, schedule),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    self.predictor_.training["rows_per_split"] = dict(self.fit_report_["rows"])
    self.config_ = config
    self.classes_ = (
        None if prepared.builder.classes is None else np.asarray(prepared.builder.classes)
    )
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
      group_size: int | None = None,
  ) -> dict[str, Any]:
    """Int8 quantisation ("int8"), packed int4 ("int4", `group_size` rows per scale, default 64) or
    global magnitude pruning ("prune", `amount`); the saved artifact reflects it. With labelled
    `eval_tables` the report holds the metrics before and after."""
    predictor = self._require_fitted()
    before = self._score(eval_tables) if eval_tables is not None else None
    report = predictor.optimize(method, amount=amount, group_size=group_size)
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
    return score_tables(self._require_fitted(), tables, where="eval_tables")

  def save(self, path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Writes the artifact (see `artifact.py`) plus this estimator's parameters as JSON.

    `path` must be a new or empty folder, or hold an artifact of this library (replaced atomically);
    any other existing folder is refused and left untouched unless `overwrite=True`.
    """
    payload = {"class": type(self).__name__, "params": self.get_params()}
    extra = {ESTIMATOR_FILE: json.dumps(payload, indent=1, default=str)}
    return save_artifact(self._require_fitted(), path, overwrite=overwrite, extra_files=extra)

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
