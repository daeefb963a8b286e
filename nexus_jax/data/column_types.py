"""Column type detection and value canonicalisation for `TabularPreprocessor`.

Every input column gets exactly one type:

- ``"numeric"``: int/float dtype (int columns whose values are only 0/1 are ``"boolean"``).
- ``"boolean"``: bool dtypes, numbers that are all 0/1, strings that are all true/false/yes/no/t/f/y/n.
- ``"datetime"``: datetime64 dtypes, or strings that all look like ISO-8601 dates
  (``2013-01-01``, ``2013-01-01 10:00``, ``2013-01-01T10:00:00Z``). Other date formats: override.
- ``"categorical"``: any other string / object / category column.
- ``"identifier"``: identifier-like, dropped (no feature): a string column with more than
  ``identifier_min_unique`` distinct values that are at least ``identifier_ratio`` of its non-null
  rows (names, keys), or an integer column whose values are all distinct (more than
  ``identifier_min_unique`` rows). High-cardinality columns that repeat (e.g. a plane's tail number
  across 300k flights) stay categorical; only their ``max_categories`` most frequent values get codes.
- ``"constant"``: at most one distinct non-null value (or all missing), dropped.

All functions are vectorised (pandas/numpy); none loops over rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NUMERIC = "numeric"
CATEGORICAL = "categorical"
BOOLEAN = "boolean"
DATETIME = "datetime"
IDENTIFIER = "identifier"
CONSTANT = "constant"
COLUMN_TYPES = (NUMERIC, CATEGORICAL, BOOLEAN, DATETIME, IDENTIFIER, CONSTANT)
DROPPED_TYPES = (IDENTIFIER, CONSTANT)

TRUE_STRINGS = ("true", "t", "yes", "y")
FALSE_STRINGS = ("false", "f", "no", "n")

_ISO_DATE = (
    r"^\s*\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?\s*$"
)
_DETECTION_SAMPLE = 2000


def _is_numeric(series: pd.Series) -> bool:
  return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(
      series.dtype
  )


def _is_stringlike(series: pd.Series) -> bool:
  dtype = series.dtype
  return (
      pd.api.types.is_object_dtype(dtype)
      or pd.api.types.is_string_dtype(dtype)
      or isinstance(dtype, pd.CategoricalDtype)
  )


def _sample(nonnull: pd.Series) -> pd.Series:
  if len(nonnull) <= _DETECTION_SAMPLE:
    return nonnull
  return nonnull.sample(_DETECTION_SAMPLE, random_state=0)


def looks_like_iso_datetime(series: pd.Series) -> bool:
  """True if the (sampled) non-null values are all strings matching ISO-8601 dates."""
  nonnull = series.dropna()
  if len(nonnull) == 0 or not _is_stringlike(series):
    return False
  sample = _sample(nonnull).astype(str)
  if not sample.str.match(_ISO_DATE).all():
    return False
  parsed = pd.to_datetime(sample, utc=True, format="ISO8601", errors="coerce")
  return bool(parsed.notna().all())


def detect_column_type(
    series: pd.Series, *, identifier_ratio: float = 0.5, identifier_min_unique: int = 20
) -> str:
  """Detects the type of one column (see the module docstring for the rules).

  Args:
    series: the column's training values, any dtype, `[N]`.
    identifier_ratio: distinct/non-null ratio from which a string column is identifier-like.
    identifier_min_unique: identifier detection applies only above this many distinct values.
  Returns:
    One of `COLUMN_TYPES`.
  """
  nonnull = series.dropna()
  if _is_numeric(series):
    nonnull = nonnull[np.isfinite(nonnull.to_numpy(dtype=np.float64))]
  n_unique = nonnull.nunique()
  if n_unique <= 1:
    return CONSTANT
  dtype = series.dtype
  if pd.api.types.is_bool_dtype(dtype):
    return BOOLEAN
  if pd.api.types.is_datetime64_any_dtype(dtype):
    return DATETIME
  if _is_numeric(series):
    if n_unique == 2 and set(np.unique(nonnull.to_numpy(dtype=np.float64))) == {0.0, 1.0}:
      return BOOLEAN
    if (
        pd.api.types.is_integer_dtype(dtype)
        and n_unique == len(nonnull)
        and n_unique > identifier_min_unique
    ):
      return IDENTIFIER
    return NUMERIC
  uniques = pd.Series(nonnull.unique())
  if not (to_boolean(uniques) == -1.0).any():
    return BOOLEAN
  if looks_like_iso_datetime(series):
    return DATETIME
  if n_unique > identifier_min_unique and n_unique >= identifier_ratio * len(nonnull):
    return IDENTIFIER
  return CATEGORICAL


def category_keys(series: pd.Series) -> pd.Series:
  """Canonical string key of every value (missing stays missing), `[N]` -> `[N]`.

  Integral floats print as integers (so an int column that gained NaN in a CSV keeps its keys:
  ``3.0`` -> ``"3"``); everything else prints with `str`.
  """
  if isinstance(series.dtype, pd.CategoricalDtype):
    series = series.astype(object)
  out = pd.Series(pd.NA, index=series.index, dtype="string")
  mask = series.notna().to_numpy()
  values = series[mask]
  if _is_numeric(series) or pd.api.types.is_bool_dtype(series.dtype):
    numbers = values.to_numpy()
    if _is_numeric(series):
      numbers = numbers.astype(np.float64)
      finite = np.isfinite(numbers)
      if finite.all() and np.all(numbers == np.round(numbers)):
        values = pd.Series(numbers.astype(np.int64), index=values.index)
    out[mask] = values.astype(str).astype("string")
  else:
    out[mask] = values.astype(str).astype("string")
  return out


def to_boolean(series: pd.Series) -> pd.Series:
  """Maps values to 1.0 (true), 0.0 (false), NaN (missing) or -1.0 (not a boolean), `[N]` float64."""
  out = pd.Series(np.nan, index=series.index, dtype=np.float64)
  mask = series.notna().to_numpy()
  if not mask.any():
    return out
  values = series[mask]
  if pd.api.types.is_bool_dtype(series.dtype):
    out[mask] = values.astype(np.float64).to_numpy()
  elif _is_numeric(series):
    numbers = values.to_numpy(dtype=np.float64)
    out[mask] = np.where((numbers == 0.0) | (numbers == 1.0), numbers, -1.0)
  else:
    text = values.astype(str).str.strip().str.lower()
    out[mask] = np.select(
        [text.isin(TRUE_STRINGS).to_numpy(), text.isin(FALSE_STRINGS).to_numpy()],
        [1.0, 0.0],
        default=-1.0,
    )
  return out


def to_datetime_utc(series: pd.Series) -> pd.Series:
  """Parses a column to timezone-aware UTC datetimes (naive values are taken as UTC); bad -> NaT."""
  if pd.api.types.is_datetime64_any_dtype(series.dtype):
    if getattr(series.dt, "tz", None) is None:
      return series.dt.tz_localize("UTC")
    return series.dt.tz_convert("UTC")
  return pd.to_datetime(series, utc=True, format="ISO8601", errors="coerce")


def to_float(series: pd.Series) -> np.ndarray:
  """Numeric values as float64 `[N]`; missing, unparsable strings and +-inf become NaN."""
  values = np.array(
      pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
  )
  values[~np.isfinite(values)] = np.nan
  return values
