"""Baselines on a flat feature table (`flat_join.flat_join`): LightGBM and a linear model.

    model = fit_lightgbm(x_train, y_train, x_valid, y_valid, "binary")    # early-stopped on valid
    model = fit_linear(x_train, y_train, x_valid, y_valid, "regression")  # penalty chosen on valid
    scores = model.predict(x_test)   # binary: P(y=1) [N]; multiclass: [N, K]; regression: [N]

Both take the same pandas feature table (float64 numeric columns, ``category`` columns) and labels
(0/1 for binary, class index 0..K-1 for multiclass, floats for regression). Validation rows are used
only for early stopping (LightGBM) or to pick the penalty (linear), as NexusFlow uses them.

- LightGBM: `LGBM_PARAMS` (learning rate 0.05, 31 leaves, feature/bagging fraction 0.8), up to
  `LGBM_ROUNDS` rounds, stopped after 100 rounds without a better validation loss; categorical
  columns are LightGBM categoricals (levels fixed on the training rows).
- linear: median imputation + missing indicators + standardisation for numeric columns, one-hot of
  the categories seen >= 5 times in training; `LogisticRegression` (binary / multinomial) or `Ridge`,
  with the inverse penalty picked from `LINEAR_C` on validation log loss / RMSE (lbfgs, at most 300
  iterations, tol 1e-3: on 56k rows x 400 columns the default tolerance took minutes per penalty).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

LGBM_PARAMS = {
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 20,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "verbose": -1,
    "num_threads": 2,
}
LGBM_ROUNDS = 5000
LGBM_PATIENCE = 100
LINEAR_C = (0.01, 0.1, 1.0, 10.0)


@dataclasses.dataclass
class FittedBaseline:
  """A trained baseline: `predict(features)` and what fitting it took."""

  name: str
  predict: Callable[[pd.DataFrame], np.ndarray]
  fit_seconds: float
  details: dict


def _categories(x_train: pd.DataFrame) -> dict[str, pd.Index]:
  return {
      c: x_train[c].cat.remove_unused_categories().cat.categories
      for c in x_train.columns
      if isinstance(x_train[c].dtype, pd.CategoricalDtype)
  }


def _with_categories(x: pd.DataFrame, cats: dict[str, pd.Index]) -> pd.DataFrame:
  x = x.copy()
  for c, levels in cats.items():
    x[c] = pd.Categorical(x[c].astype("string"), categories=levels)
  return x


def fit_lightgbm(
    x_train: pd.DataFrame,
    y_train: np.ndarray,
    x_valid: pd.DataFrame,
    y_valid: np.ndarray,
    task: str,
    seed: int = 0,
) -> FittedBaseline:
  """LightGBM early-stopped on the validation rows (see the module docstring)."""
  import lightgbm as lgb

  t0 = time.perf_counter()
  cats = _categories(x_train)
  xt, xv = _with_categories(x_train, cats), _with_categories(x_valid, cats)
  params = {**LGBM_PARAMS, "seed": seed}
  if task == "binary":
    params["objective"] = "binary"
  elif task == "multiclass":
    params.update(objective="multiclass", num_class=int(max(y_train.max(), y_valid.max()) + 1))
  else:
    params["objective"] = "regression"
  train_set = lgb.Dataset(xt, y_train, categorical_feature=list(cats) or "auto")
  valid_set = lgb.Dataset(xv, y_valid, reference=train_set)
  booster = lgb.train(
      params,
      train_set,
      num_boost_round=LGBM_ROUNDS,
      valid_sets=[valid_set],
      callbacks=[lgb.early_stopping(LGBM_PATIENCE, verbose=False)],
  )

  def predict(x: pd.DataFrame) -> np.ndarray:
    return booster.predict(_with_categories(x, cats), num_iteration=booster.best_iteration)

  return FittedBaseline(
      "lightgbm",
      predict,
      time.perf_counter() - t0,
      {"best_iteration": int(booster.best_iteration), "features": int(xt.shape[1])},
  )


def _linear_design(x_train: pd.DataFrame):
  """A fitted sklearn transformer: numeric impute + indicator + scale, categories one-hot."""
  from sklearn.compose import ColumnTransformer
  from sklearn.impute import SimpleImputer
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import OneHotEncoder, StandardScaler

  cat_cols = [c for c in x_train.columns if isinstance(x_train[c].dtype, pd.CategoricalDtype)]
  num_cols = [c for c in x_train.columns if c not in cat_cols]
  num_cols = [c for c in num_cols if x_train[c].notna().any()]
  numeric = make_pipeline(
      SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=False),
      StandardScaler(),
  )
  categorical = make_pipeline(
      SimpleImputer(strategy="constant", fill_value="__missing__"),
      OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=5, sparse_output=False),
  )
  design = ColumnTransformer(
      [("num", numeric, num_cols), ("cat", categorical, cat_cols)], remainder="drop"
  )

  def as_input(x: pd.DataFrame) -> pd.DataFrame:
    x = x[num_cols + cat_cols].copy()
    for c in cat_cols:
      x[c] = x[c].astype(object).where(x[c].notna(), "__missing__").astype(str)
    return x

  design.fit(as_input(x_train))
  return lambda x: np.nan_to_num(design.transform(as_input(x)), nan=0.0, posinf=0.0, neginf=0.0)


def _all_classes(model, z: np.ndarray, n_classes: int) -> np.ndarray:
  """`predict_proba` `[N, n_classes]`: a class absent from the training labels gets probability 0."""
  full = np.zeros((len(z), n_classes))
  full[:, model.classes_.astype(int)] = model.predict_proba(z)
  return full


def fit_linear(
    x_train: pd.DataFrame,
    y_train: np.ndarray,
    x_valid: pd.DataFrame,
    y_valid: np.ndarray,
    task: str,
    seed: int = 0,
) -> FittedBaseline:
  """Logistic regression (classification) or ridge (regression); see the module docstring."""
  from sklearn.linear_model import LogisticRegression, Ridge
  from sklearn.metrics import log_loss, mean_squared_error

  t0 = time.perf_counter()
  n_classes = int(max(np.max(y_train), np.max(y_valid)) + 1) if task == "multiclass" else 2
  design = _linear_design(x_train)
  zt, zv = design(x_train), design(x_valid)
  best = None
  for c in LINEAR_C:
    if task == "regression":
      model = Ridge(alpha=1.0 / c).fit(zt, y_train)
      loss = mean_squared_error(y_valid, model.predict(zv))
    else:
      model = LogisticRegression(C=c, max_iter=300, tol=1e-3, random_state=seed).fit(zt, y_train)
      proba = _all_classes(model, zv, n_classes)
      loss = log_loss(y_valid, np.clip(proba, 1e-7, 1.0), labels=np.arange(n_classes))
    if best is None or loss < best[0]:
      best = (loss, c, model)
  _, c, model = best

  def predict(x: pd.DataFrame) -> np.ndarray:
    z = design(x)
    if task == "regression":
      return model.predict(z)
    proba = _all_classes(model, z, n_classes)
    return proba[:, 1] if task == "binary" else proba

  return FittedBaseline(
      "linear", predict, time.perf_counter() - t0, {"C": c, "features": int(zt.shape[1])}
  )
