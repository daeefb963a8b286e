"""`TabularPreprocessor`: one table's raw DataFrame -> model-ready numeric and categorical arrays.

Fit on training rows only; the fitted state is plain JSON + a ``.npz`` of arrays (never pickle)::

    pre = TabularPreprocessor(numeric_transform="quantile").fit(train_df)
    arrays = pre.transform(df)          # {"numeric": f32[N, Fn], "numeric_missing": bool[N, Fn],
                                        #  "categorical": i32[N, Fc]}
    info = pre.get_feature_info()       # names, cardinalities, detected type of every input column
    pre.save("dir"); TabularPreprocessor.load("dir").transform(df)   # identical arrays

Columns are typed by `column_types.detect_column_type` (or the `column_types=` override):

- numeric -> one numeric feature, imputed (median/mean/constant) with a missing indicator, then
  ``"quantile"`` (quantile-to-normal as in rtdl, fitted with scikit-learn's ``QuantileTransformer``,
  applied here with numpy from the stored quantiles) or ``"standard"`` (zero mean, unit variance).
  +-inf and unparsable strings are treated as missing (never an error).
- datetime -> numeric features ``<col>__epoch`` (days since 1970, scaled like any numeric) and
  cyclical ``<col>__{hour,weekday,yearday}_{sin,cos}`` (left unscaled, in [-1, 1]); parts that are
  constant on the training rows (e.g. the hour of a date-only column) are left out.
- categorical -> int32 codes: 0 = missing, 1 = unknown (unseen at fit, or beyond the
  ``max_categories`` most frequent / below ``min_category_count``), real categories from 2.
- boolean -> codes 0 = missing, 1 = unknown (not a boolean), 2 = false, 3 = true.
- identifier / constant columns -> dropped (listed in `FeatureInfo.column_types`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import special
from sklearn.preprocessing import QuantileTransformer

from nexus_jax.data import column_types as ct

STATE_FILE = "preprocessor.json"
ARRAYS_FILE = "preprocessor_arrays.npz"
FORMAT_VERSION = 1
NUM_RESERVED_CODES = 2  # 0 = missing, 1 = unknown
MISSING_CODE, UNKNOWN_CODE = 0, 1
DATETIME_PARTS = ("epoch", "hour", "weekday", "yearday")
_BOUNDS = 1e-7  # scikit-learn's BOUNDS_THRESHOLD for the quantile transform
_PERIODS = {"hour": 24.0, "weekday": 7.0, "yearday": 365.25}


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """What `TabularPreprocessor.transform` outputs, for building tokenizers.

  Attributes:
    numeric_names: name of each column of ``"numeric"`` `[Fn]`.
    numeric_sources: input column each numeric feature comes from `[Fn]`.
    categorical_names: name of each column of ``"categorical"`` `[Fc]`.
    categorical_cardinalities: number of codes of each categorical feature, reserved ones included.
    column_types: ``(input column, detected type)`` for every input column seen at fit time.
  """

  numeric_names: tuple[str, ...]
  numeric_sources: tuple[str, ...]
  categorical_names: tuple[str, ...]
  categorical_cardinalities: tuple[int, ...]
  column_types: tuple[tuple[str, str], ...]

  @property
  def num_numeric(self) -> int:
    return len(self.numeric_names)

  @property
  def num_categorical(self) -> int:
    return len(self.categorical_names)

  @property
  def types(self) -> dict[str, str]:
    """Input column -> detected type."""
    return dict(self.column_types)

  @property
  def dropped_columns(self) -> tuple[str, ...]:
    return tuple(c for c, t in self.column_types if t in ct.DROPPED_TYPES)


def quantile_normal(x: np.ndarray, quantiles: np.ndarray, references: np.ndarray) -> np.ndarray:
  """scikit-learn's quantile-to-normal transform from stored state, in numpy.

  Args:
    x: float64 `[N, F]` without NaN.
    quantiles: float64 `[Q, F]`, column-wise sorted training quantiles.
    references: float64 `[Q]`, their probabilities in [0, 1].
  Returns:
    float64 `[N, F]`, standard-normal scores clipped as scikit-learn clips them.
  """
  out = np.empty_like(x)
  for j in range(x.shape[1]):  # loop over features, each vectorised over rows
    q, col = quantiles[:, j], x[:, j]
    u = 0.5 * (np.interp(col, q, references) - np.interp(-col, -q[::-1], -references[::-1]))
    u[col + _BOUNDS > q[-1]] = 1.0
    u[col - _BOUNDS < q[0]] = 0.0
    out[:, j] = u
  lo = special.ndtri(_BOUNDS - np.spacing(1))
  hi = special.ndtri(1 - (_BOUNDS - np.spacing(1)))
  with np.errstate(divide="ignore"):
    return np.clip(special.ndtri(out), lo, hi)


def _datetime_parts(values: pd.Series) -> dict[str, np.ndarray]:
  """All candidate numeric parts of a UTC datetime column, float64 `[N]` each (NaN where NaT)."""
  # Through microseconds, not pandas' nanoseconds: placeholder dates like 9999-12-31 fit.
  micros = values.dt.tz_convert(None).to_numpy("datetime64[us]")
  epoch = np.where(np.isnat(micros), np.nan, micros.astype(np.int64) / (86400.0 * 1e6))
  dt = values.dt
  raw = {
      "hour": (dt.hour + dt.minute / 60.0 + dt.second / 3600.0),
      "weekday": dt.day_of_week.astype(np.float64),
      "yearday": dt.day_of_year.astype(np.float64) - 1.0,
  }
  parts = {"epoch": epoch}
  for name, value in raw.items():
    angle = 2.0 * np.pi * value.to_numpy(np.float64, na_value=np.nan) / _PERIODS[name]
    parts[f"{name}_sin"], parts[f"{name}_cos"] = np.sin(angle), np.cos(angle)
  return parts


class TabularPreprocessor:
  """Fits on one table's training rows; transforms any rows of that table to arrays.

  Args:
    numeric_transform: ``"quantile"`` (to a standard normal, rtdl-style) or ``"standard"``.
    max_categories: codes kept per categorical column (most frequent first); the rest -> unknown.
    min_category_count: categories seen fewer times on the training rows -> unknown.
    numeric_impute: ``"median"``, ``"mean"`` or ``"constant"`` (``fill_value``), in raw units.
    fill_value: the constant for ``numeric_impute="constant"``.
    n_quantiles: quantiles stored per numeric feature (at most the number of training rows).
    datetime_parts: which of ``DATETIME_PARTS`` a datetime column yields.
    column_types: per-column type override (any of ``column_types.COLUMN_TYPES``).
    ignore_columns: input columns never used (and not required at transform time).
    identifier_ratio, identifier_min_unique: identifier-like detection, see `column_types`.
    seed: seed of scikit-learn's subsampling in the quantile fit.
  """

  def __init__(
      self,
      numeric_transform: str = "quantile",
      max_categories: int = 1000,
      min_category_count: int = 1,
      numeric_impute: str = "median",
      fill_value: float = 0.0,
      n_quantiles: int = 1000,
      datetime_parts: Sequence[str] = DATETIME_PARTS,
      column_types: Mapping[str, str] | None = None,
      ignore_columns: Sequence[str] = (),
      identifier_ratio: float = 0.5,
      identifier_min_unique: int = 20,
      seed: int = 0,
  ):
    if numeric_transform not in ("quantile", "standard"):
      raise ValueError(
          f"numeric_transform must be 'quantile' or 'standard', got {numeric_transform!r}"
      )
    if numeric_impute not in ("median", "mean", "constant"):
      raise ValueError(
          f"numeric_impute must be 'median', 'mean' or 'constant', got {numeric_impute!r}"
      )
    if max_categories < 1 or min_category_count < 1 or n_quantiles < 2:
      raise ValueError("max_categories and min_category_count must be >= 1, n_quantiles >= 2")
    unknown_parts = set(datetime_parts) - set(DATETIME_PARTS)
    if unknown_parts:
      raise ValueError(
          f"datetime_parts {sorted(unknown_parts)} unknown; choose from {DATETIME_PARTS}"
      )
    for column, kind in (column_types or {}).items():
      if kind not in ct.COLUMN_TYPES:
        raise ValueError(f"column_types[{column!r}] = {kind!r}; choose from {ct.COLUMN_TYPES}")
    self.config = dict(
        numeric_transform=numeric_transform,
        max_categories=int(max_categories),
        min_category_count=int(min_category_count),
        numeric_impute=numeric_impute,
        fill_value=float(fill_value),
        n_quantiles=int(n_quantiles),
        datetime_parts=list(datetime_parts),
        column_types=dict(column_types or {}),
        ignore_columns=list(ignore_columns),
        identifier_ratio=float(identifier_ratio),
        identifier_min_unique=int(identifier_min_unique),
        seed=int(seed),
    )
    self._state: dict | None = None
    self._arrays: dict[str, np.ndarray] = {}

  # ------------------------------------------------------------------ fit
  def fit(self, df: pd.DataFrame) -> "TabularPreprocessor":
    """Fits on training rows `df` `[N, C]` (any dtypes); returns self.

    With N = 0 nothing can be learned: every column is typed ``"constant"`` (no features).
    """
    cfg = self.config
    _check_frame(df, "fit")
    unknown = set(cfg["column_types"]) - set(df.columns)
    if unknown:
      raise ValueError(
          f"TabularPreprocessor: column_types names columns {sorted(unknown)} not in the "
          f"DataFrame (columns: {list(df.columns)})"
      )
    columns = [c for c in df.columns if c not in set(cfg["ignore_columns"])]
    types = {
        c: ct.CONSTANT
        if len(df) == 0
        else cfg["column_types"].get(c)
        or ct.detect_column_type(
            df[c],
            identifier_ratio=cfg["identifier_ratio"],
            identifier_min_unique=cfg["identifier_min_unique"],
        )
        for c in columns
    }
    numeric_plan: list[tuple[str, str]] = []  # (input column, part); part "value" for numerics
    for c in columns:
      if types[c] == ct.NUMERIC:
        numeric_plan.append((c, "value"))
      elif types[c] == ct.DATETIME:
        parts = _datetime_parts(ct.to_datetime_utc(df[c]))
        for part, values in parts.items():
          finite = values[np.isfinite(values)]
          varies = finite.size > 0 and np.ptp(finite) > 1e-9
          if part.split("_")[0] in cfg["datetime_parts"] and varies:
            numeric_plan.append((c, part))
    self._state = {
        "columns": columns,
        "types": types,
        "numeric_plan": numeric_plan,
        "categorical_plan": [],
    }
    raw = self._numeric_raw(df)
    self._fit_numeric(raw, np.array([p in ("value", "epoch") for _, p in numeric_plan], dtype=bool))
    for c in columns:
      if types[c] == ct.CATEGORICAL:
        counts = ct.category_keys(df[c]).value_counts(dropna=True)
        counts = counts[counts >= cfg["min_category_count"]]
        order = pd.DataFrame({"key": counts.index.astype(str), "n": counts.to_numpy()})
        order = order.sort_values(["n", "key"], ascending=[False, True], kind="stable")
        vocab = order["key"].head(cfg["max_categories"]).tolist()
        self._state["categorical_plan"].append((c, ct.CATEGORICAL, vocab))
      elif types[c] == ct.BOOLEAN:
        self._state["categorical_plan"].append((c, ct.BOOLEAN, ["false", "true"]))
    return self

  def _fit_numeric(self, raw: np.ndarray, scaled: np.ndarray) -> None:
    cfg = self.config
    n_features = raw.shape[1]
    with np.errstate(all="ignore"):
      if cfg["numeric_impute"] == "median":
        impute = np.nanmedian(raw, axis=0) if raw.size else np.zeros(n_features)
      elif cfg["numeric_impute"] == "mean":
        impute = np.nanmean(raw, axis=0) if raw.size else np.zeros(n_features)
      else:
        impute = np.full(n_features, cfg["fill_value"])
    impute = np.where(scaled & np.isfinite(impute), impute, 0.0)  # cyclical parts impute 0
    with np.errstate(all="ignore"):
      mean = np.nan_to_num(np.nanmean(raw, axis=0)) if n_features else np.zeros(0)
      std = np.nan_to_num(np.nanstd(raw, axis=0)) if n_features else np.ones(0)
    mean, std = np.where(scaled, mean, 0.0), np.where(scaled & (std > 1e-12), std, 1.0)
    arrays = {"impute": impute, "scaled": scaled, "mean": mean, "std": std}
    if cfg["numeric_transform"] == "quantile":
      cols = raw[:, scaled]
      n_rows = len(raw)
      qt = QuantileTransformer(
          n_quantiles=max(2, min(cfg["n_quantiles"], n_rows)),
          output_distribution="normal",
          subsample=10**9,
          random_state=cfg["seed"],
      )
      if cols.shape[1]:
        qt.fit(cols)  # NaN ignored by the fit
        arrays["quantiles"], arrays["references"] = qt.quantiles_, qt.references_
      else:
        arrays["quantiles"], arrays["references"] = np.zeros((2, 0)), np.array([0.0, 1.0])
    self._arrays = arrays

  # ------------------------------------------------------------------ transform
  def _numeric_raw(self, df: pd.DataFrame) -> np.ndarray:
    """Raw numeric features float64 `[N, Fn]`, NaN where missing."""
    plan = self._state["numeric_plan"]
    out = np.empty((len(df), len(plan)), dtype=np.float64)
    parts_cache: dict[str, dict[str, np.ndarray]] = {}
    for j, (column, part) in enumerate(plan):
      if part == "value":
        out[:, j] = ct.to_float(df[column])
      else:
        if column not in parts_cache:
          parts_cache[column] = _datetime_parts(ct.to_datetime_utc(df[column]))
        out[:, j] = parts_cache[column][part]
    return out

  def transform(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Transforms rows `df` `[N, C]` (extra columns are ignored).

    Returns:
      ``{"numeric": float32[N, Fn]`` (imputed, scaled, never NaN),
      ``"numeric_missing": bool[N, Fn]`` (True where the raw value was missing / inf / unparsable),
      ``"categorical": int32[N, Fc]}`` (0 missing, 1 unknown, >= 2 categories).
    Raises:
      ValueError naming the column if a column used at fit time is absent.
    """
    state = self._require_fitted()
    _check_frame(df, "transform")
    needed = [c for c in state["columns"] if state["types"][c] not in ct.DROPPED_TYPES]
    absent = [c for c in needed if c not in df.columns]
    if absent:
      raise ValueError(
          f"TabularPreprocessor.transform: column {absent[0]!r} (type "
          f"{state['types'][absent[0]]!r} at fit time) is missing from the input; "
          f"all missing: {absent}"
      )
    raw = self._numeric_raw(df)
    missing = np.isnan(raw)
    a = self._arrays
    filled = np.where(missing, a["impute"], raw)
    if self.config["numeric_transform"] == "quantile":
      numeric = filled.copy()
      if a["scaled"].any():
        numeric[:, a["scaled"]] = quantile_normal(
            filled[:, a["scaled"]], a["quantiles"], a["references"]
        )
    else:
      numeric = (filled - a["mean"]) / a["std"]
    categorical = np.empty((len(df), len(state["categorical_plan"])), dtype=np.int32)
    for j, (column, kind, vocab) in enumerate(state["categorical_plan"]):
      categorical[:, j] = _codes(df[column], kind, vocab)
    return {
        "numeric": numeric.astype(np.float32),
        "numeric_missing": missing,
        "categorical": categorical,
    }

  def fit_transform(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
    return self.fit(df).transform(df)

  def get_feature_info(self) -> FeatureInfo:
    state = self._require_fitted()
    return FeatureInfo(
        numeric_names=tuple(c if p == "value" else f"{c}__{p}" for c, p in state["numeric_plan"]),
        numeric_sources=tuple(c for c, _ in state["numeric_plan"]),
        categorical_names=tuple(c for c, _, _ in state["categorical_plan"]),
        categorical_cardinalities=tuple(
            NUM_RESERVED_CODES + len(v) for _, _, v in state["categorical_plan"]
        ),
        column_types=tuple((c, state["types"][c]) for c in state["columns"]),
    )

  @property
  def is_fitted(self) -> bool:
    return self._state is not None

  def _require_fitted(self) -> dict:
    if self._state is None:
      raise RuntimeError(
          "TabularPreprocessor is not fitted: call .fit(train_df) or .load(directory)"
      )
    return self._state

  # ------------------------------------------------------------------ persistence
  def save(self, directory: str | pathlib.Path) -> None:
    """Writes ``preprocessor.json`` (config + columns + vocabularies) and ``preprocessor_arrays.npz``."""
    state = self._require_fitted()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": self.config,
        "state": {
            **state,
            "numeric_plan": [list(p) for p in state["numeric_plan"]],
            "categorical_plan": [list(p) for p in state["categorical_plan"]],
        },
    }
    (directory / STATE_FILE).write_text(json.dumps(payload, indent=1))
    np.savez(directory / ARRAYS_FILE, **self._arrays)

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> "TabularPreprocessor":
    """Reads what `save` wrote; the result transforms exactly like the saved preprocessor."""
    directory = pathlib.Path(directory)
    payload = json.loads((directory / STATE_FILE).read_text())
    if payload.get("format_version") != FORMAT_VERSION:
      raise ValueError(
          f"{directory / STATE_FILE}: format_version {payload.get('format_version')!r}, "
          f"expected {FORMAT_VERSION}"
      )
    pre = cls(**payload["config"])
    state = payload["state"]
    state["numeric_plan"] = [tuple(p) for p in state["numeric_plan"]]
    state["categorical_plan"] = [tuple(p) for p in state["categorical_plan"]]
    pre._state = state
    with np.load(directory / ARRAYS_FILE, allow_pickle=False) as arrays:
      pre._arrays = {k: arrays[k] for k in arrays.files}
    return pre


def _check_frame(df, where: str) -> None:
  if not isinstance(df, pd.DataFrame):
    raise TypeError(
        f"TabularPreprocessor.{where}: expected a pandas DataFrame, got {type(df).__name__}"
    )
  duplicated = df.columns[df.columns.duplicated()].tolist()
  if duplicated:
    raise ValueError(f"TabularPreprocessor.{where}: duplicate column names {duplicated}")


def _codes(series: pd.Series, kind: str, vocab: list[str]) -> np.ndarray:
  """Integer codes `[N]` of one categorical/boolean column (0 missing, 1 unknown, 2.. categories)."""
  if kind == ct.BOOLEAN:
    values = ct.to_boolean(series).to_numpy()
    return np.where(
        np.isnan(values),
        MISSING_CODE,
        np.where(values < 0, UNKNOWN_CODE, values + NUM_RESERVED_CODES),
    ).astype(np.int32)
  keys = ct.category_keys(series)
  index = pd.Index(vocab, dtype="string").get_indexer(keys)
  missing = keys.isna().to_numpy()
  return np.where(
      missing, MISSING_CODE, np.where(index < 0, UNKNOWN_CODE, index + NUM_RESERVED_CODES)
  ).astype(np.int32)
