"""`TabularPredictor`: a trained NexusFormer + its fitted `ContextSetBuilder`, predicting from raw tables.

    predictor.predict_proba(tables)                   # [n_rows, n_classes], one row per target-table row
    predictor.predict(tables, history=past_rows)      # labels / values; `history` rows are only looked at
    predictor.optimize("int8") / optimize("int4", group_size=64) / optimize("prune", amount=0.5)
                                                      # -> report; changes the stored params

`tables` maps every table of the schema to a DataFrame; the target table holds the rows to predict
(its target column may be absent). Earlier target-table rows that histories should see (e.g. the
plane's previous flights) go in `history`: they build contexts but get no prediction.

Bad input fails before any model work, naming the table and column: a table or column the model
was not trained with, a column missing, a numeric / datetime column holding values that do not
parse (wrong dtype), an empty target table.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
import pandas as pd

from nexus_jax.data import column_types as ct
from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import SchemaError
from nexus_jax.nexusflow.model_spec import build_nexus_former
from nexus_jax.nexusflow.objectives import relational_arrays
from nexus_jax.nexusflow.batch_inference import make_predict_fn, predict_arrays
from nexus_jax.nexusflow.optimization import QUANTIZED, optimize_params

PREDICT_BATCH = 1024


class TabularPredictor:
  """Everything needed to predict: builder (schema + preprocessors), model spec, variables, labels.

  Args:
    builder: fitted `ContextSetBuilder`.
    spec: `model_spec.nexus_former_spec(...)` dict.
    variables: {"params": float params, **extra collections} (numpy or jax arrays).
    target_scale: (shift, scale) of regression targets.
    fit_columns: table -> columns seen at fit time (for the "not trained with" checks).
    compute_dtype: "float32" | "bfloat16".
    params_stored: the params as stored (the quantised tree after `optimize("int8" | "int4")`);
      default the float ones.
    optimization: list of reports of the optimisations applied, oldest first.
    training: what is known of the training data, e.g. {"table_rows": {table: rows},
      "rows_per_split": {"train": n, ...}} (saved in artifact.json; model cards read it).
  """

  def __init__(
      self,
      builder: ContextSetBuilder,
      spec: dict[str, Any],
      variables: Mapping[str, Any],
      target_scale: tuple[float, float],
      fit_columns: Mapping[str, list[str]],
      compute_dtype: str = "float32",
      params_stored: Any = None,
      optimization: list[dict[str, Any]] | None = None,
      training: Mapping[str, Any] | None = None,
  ):
    self.builder, self.spec = builder, dict(spec)
    self.variables = jax.device_get(dict(variables))
    self.target_scale = (float(target_scale[0]), float(target_scale[1]))
    self.fit_columns = {t: list(c) for t, c in fit_columns.items()}
    self.compute_dtype = compute_dtype
    self.params_stored = self.variables["params"] if params_stored is None else params_stored
    self.optimization = list(optimization or [])
    self.training = dict(training or {})
    self.model = build_nexus_former(self.spec, compute_dtype)
    self._predict_fn = None

  @classmethod
  def from_training(
      cls, builder: ContextSetBuilder, result: Any, tables: Mapping[str, pd.DataFrame], config: Any
  ) -> "TabularPredictor":
    """From a `training.TrainResult` and the tables it was fitted on."""
    return cls(
        builder,
        result.spec,
        result.variables,
        result.target_scale,
        {t: [str(c) for c in tables[t].columns] for t in builder.schema.tables},
        compute_dtype=config.train.compute_dtype,
        training={"table_rows": {t: int(len(tables[t])) for t in builder.schema.tables}},
    )

  # ------------------------------------------------------------------ properties
  @property
  def schema(self):
    return self.builder.schema

  @property
  def task(self) -> str:
    return self.schema.target.task

  @property
  def classes(self) -> tuple | None:
    return self.builder.classes

  # ------------------------------------------------------------------ input checks
  def check_tables(
      self, tables: Mapping[str, pd.DataFrame], history: pd.DataFrame | None = None
  ) -> None:
    """Raises SchemaError naming the table/column when `tables` cannot be predicted on."""
    if not isinstance(tables, Mapping):
      raise SchemaError(
          f"tables must be a dict of table name -> DataFrame, got {type(tables).__name__}"
      )
    schema = self.schema
    unknown = sorted(set(tables) - set(schema.tables))
    if unknown:
      raise SchemaError(
          f"table(s) {unknown} were not in the training data; the model knows {sorted(schema.tables)}"
      )
    absent = sorted(set(schema.tables) - set(tables))
    if absent:
      raise SchemaError(
          f"table(s) {absent} are missing; predicting needs every table the model was trained with "
          f"({sorted(schema.tables)})"
      )
    target = schema.target.table
    if not isinstance(tables[target], pd.DataFrame) or len(tables[target]) == 0:
      raise SchemaError(f"table {target!r} (the target table) has no rows to predict")
    frames = dict(tables)
    if history is not None:
      frames[f"{target} (history)"] = history
    for name, df in frames.items():
      table = name.split(" ")[0]
      if not isinstance(df, pd.DataFrame):
        raise SchemaError(f"table {name!r}: expected a pandas DataFrame, got {type(df).__name__}")
      known = set(self.fit_columns.get(table, []))
      extra = [c for c in df.columns if str(c) not in known]
      if extra:
        raise SchemaError(
            f"table {name!r}: column(s) {extra} were not in the training data; "
            f"columns at fit time: {sorted(known)}"
        )
      if table not in self.builder.preprocessors:
        continue
      types = self.builder.preprocessors[table].get_feature_info().types
      target_col = schema.target.column if table == target else None
      derived = set(self.builder.config.get("summary_columns", [])) if table == target else set()
      for column, kind in types.items():
        if kind in ct.DROPPED_TYPES or column == target_col or column in derived:
          continue  # summaries are computed from the related tables, not read
        if column not in df.columns:
          raise SchemaError(
              f"table {name!r}: column {column!r} (a {kind} feature at fit time) is missing"
          )
        _check_dtype(name, column, kind, df[column])

  # ------------------------------------------------------------------ prediction
  def relational_data(
      self, tables: Mapping[str, pd.DataFrame], history: pd.DataFrame | None = None
  ):
    """Checked `RelationalData` of the rows to predict (history rows removed), in table order."""
    self.check_tables(tables, history)
    target = self.schema.target.table
    column = self.schema.target.column
    rows = tables[target].drop(columns=[column], errors="ignore")
    n_history = 0
    if history is not None and len(history):
      _check_history_overlap(self.schema.target_table.primary_key, target, rows, history)
      past = history.drop(columns=[column], errors="ignore")
      rows = pd.concat([past, rows], ignore_index=True)
      n_history = len(past)
    data = self.builder.transform({**tables, target: rows.reset_index(drop=True)})
    return data.take(np.arange(n_history, data.num_rows))

  def _raw(self, tables, history) -> np.ndarray:
    data = self.relational_data(tables, history)
    if self._predict_fn is None:
      self._predict_fn = make_predict_fn(self.model, self.task)
    preds, _ = predict_arrays(
        self.model,
        self.variables,
        relational_arrays(data),
        self.task,
        PREDICT_BATCH,
        predict_fn=self._predict_fn,
    )
    return preds

  def predict_proba(
      self, tables: Mapping[str, pd.DataFrame], history: pd.DataFrame | None = None
  ) -> np.ndarray:
    """Class probabilities f64[n_rows, n_classes] (columns in `classes` order); classification only."""
    if self.task == "regression":
      raise ValueError("predict_proba: the model is a regressor; use predict")
    p = self._raw(tables, history).astype(np.float64)
    return np.stack([1.0 - p, p], axis=1) if self.task == "binary" else p

  def predict(
      self, tables: Mapping[str, pd.DataFrame], history: pd.DataFrame | None = None
  ) -> np.ndarray:
    """Labels (classification; values from `classes`) or values in target units (regression), [n_rows]."""
    if self.task == "regression":
      shift, scale = self.target_scale
      return self._raw(tables, history).astype(np.float64) * scale + shift
    index = self.predict_proba(tables, history).argmax(axis=1)
    return (
        np.asarray(self.classes, dtype=object)[index]
        if not _numeric(self.classes)
        else np.asarray(self.classes)[index]
    )

  # ------------------------------------------------------------------ optimisation
  def optimize(
      self,
      method: str = "int8",
      amount: float = 0.5,
      min_size: int = 256,
      group_size: int | None = None,
  ) -> dict[str, Any]:
    """Applies "int8" (weight-only quantisation, per channel), "int4" (packed, one scale per
    `group_size` rows; default 64) or "prune" (global magnitude pruning by `amount`).

    Prune before quantising (zeros survive quantisation); quantising twice is refused.
    Returns the report (also appended to `self.optimization` and saved with the artifact).
    """
    done = [o["method"] for o in self.optimization if o["method"] in QUANTIZED]
    if done:
      raise ValueError(
          f"optimize({method!r}): the params are already {done[0]}-quantised"
          + (" (prune before quantising)" if method == "prune" else "; quantise the float model")
      )
    stored, params, report = optimize_params(
        self.variables["params"], method, amount=amount, min_size=min_size, group_size=group_size
    )
    self.params_stored, self.variables = stored, {**self.variables, "params": params}
    self.optimization.append(report)
    return report


def _check_history_overlap(
    key: str | None, table: str, rows: pd.DataFrame, history: pd.DataFrame
) -> None:
  """`history` must hold other rows than the ones to predict (they share the target table's key)."""
  if key is None or key not in rows.columns or key not in history.columns:
    return
  shared = pd.Index(history[key].dropna().unique()).intersection(
      pd.Index(rows[key].dropna().unique())
  )
  if len(shared):
    raise SchemaError(
        f"history: {len(shared)} row(s) share primary key {key!r} with the rows of table {table!r} to "
        f"predict, e.g. {shared[:3].astype(str).tolist()}; pass only earlier, other rows as history"
    )


def _numeric(classes) -> bool:
  return classes is not None and all(
      isinstance(c, (int, float, np.integer, np.floating)) for c in classes
  )


def _check_dtype(table: str, column: str, kind: str, values: pd.Series) -> None:
  """Numeric / datetime columns must hold parseable values (as at fit time)."""
  present = values.dropna()
  if not len(present):
    return
  if kind == ct.NUMERIC and not (
      pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)
  ):
    parsed = pd.to_numeric(present, errors="coerce")
    bad = present[parsed.isna()]
    if len(bad):
      raise SchemaError(
          f"table {table!r}: column {column!r} was numeric at fit time but holds dtype "
          f"{values.dtype} with non-numeric values, e.g. {bad.astype(str).unique()[:3].tolist()}"
      )
  elif kind == ct.DATETIME and not pd.api.types.is_datetime64_any_dtype(values.dtype):
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
      raise SchemaError(
          f"table {table!r}: column {column!r} held datetimes at fit time but now has dtype {values.dtype}"
      )
    parsed = pd.to_datetime(present.astype(str), utc=True, errors="coerce", format="mixed")
    bad = present[parsed.isna().to_numpy()]
    if len(bad):
      raise SchemaError(
          f"table {table!r}: column {column!r} held datetimes at fit time; values "
          f"{bad.astype(str).unique()[:3].tolist()} do not parse as times"
      )
