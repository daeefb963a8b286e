"""Vectorised index computation for relational context sets (no Python loop over rows).

Given the keys (and times) of N target rows and of the rows of a related table, these functions
return which related rows each target row may see:

- `parent_index`: the one row whose primary key equals the target's foreign key (or -1), `[N]`
  (`parent_match` also says which keys are non-null; schema validation counts orphans with it).
- `history_index`: up to M rows sharing the target's key whose time is at or before the target's
  time (strictly before when `strict`), most recent first, `[N, M]` padded with -1.
- `window_counts`: how many of those rows (without the M cap) fall in trailing time windows, `[N, W]`;
  `key_counts`: how many rows share the key at all (no times), `[N]`.

How `history_index` stays vectorised: candidate rows are sorted by (key code, time, position); each
(key, time) pair is mapped to one sortable int64 ``key * R + rank(time)``; one `np.searchsorted` per
target row finds the end of its visible window, and the M slots before that end (inside the key's
group) are the most recent visible rows.

Times are `time_ticks` values: int64 nanoseconds for datetimes, float64 for numeric time columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

NS_PER_HOUR = 3_600_000_000_000
INDEX_BLOCK = 1 << 16  # target rows per block of `SortedHistory.index`


def time_ticks(times: pd.Series | None) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
  """Comparable time values of a parsed time column.

  Args:
    times: `schema.parse_time` output `[N]` (UTC datetimes or float64), or None.
  Returns:
    (ticks `[N]` int64 ns or float64, valid `[N]` bool, is_datetime); (None, None, False) for None.
  """
  if times is None:
    return None, None, False
  if pd.api.types.is_datetime64_any_dtype(times.dtype):
    valid = times.notna().to_numpy()
    naive = times.dt.tz_convert("UTC").dt.tz_localize(None) if times.dt.tz is not None else times
    ticks = naive.to_numpy("datetime64[ns]").view(np.int64).copy()
    ticks[~valid] = 0
    return ticks, valid, True
  values = times.to_numpy(np.float64)
  valid = np.isfinite(values)
  return np.where(valid, values, 0.0), valid, False


def ages_between(target_ticks: np.ndarray, row_ticks: np.ndarray, is_datetime: bool) -> np.ndarray:
  """Target time minus row time: hours for datetimes, raw units otherwise; float32, same shape."""
  diff = (target_ticks - row_ticks).astype(np.float64)
  return (diff / NS_PER_HOUR if is_datetime else diff).astype(np.float32)


def shared_codes(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
  """Integer codes of two key columns in one vocabulary; -1 where the key is null.

  A numeric key compared with a string key is compared by canonical strings (``3.0`` == ``"3"``).
  """
  a_num, b_num = pd.api.types.is_numeric_dtype(a.dtype), pd.api.types.is_numeric_dtype(b.dtype)
  if a_num != b_num:
    from nexus_jax.data.column_types import category_keys

    a, b = category_keys(a), category_keys(b)
  both = pd.concat([a.reset_index(drop=True), b.reset_index(drop=True)], ignore_index=True)
  codes, _ = pd.factorize(both, use_na_sentinel=True)
  return codes[: len(a)].astype(np.int64), codes[len(a) :].astype(np.int64)


def parent_match(target_keys: pd.Series, parent_keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
  """The join of a foreign key to its parent's primary key, keys normalised as `shared_codes` does.

  `Schema.validate` counts orphan keys with this very function, so the count agrees with the join.

  Args:
    target_keys: foreign-key values `[N]`.
    parent_keys: the parent's primary key `[P]`; must be unique (a validated primary key).
  Returns:
    (index `[N]` int64: position of the matching parent row, -1 if none or null;
     has_key `[N]` bool: the value is not null).
  """
  t_codes, p_codes = shared_codes(target_keys, parent_keys)
  lookup = np.full(
      max(int(p_codes.max(initial=-1)), int(t_codes.max(initial=-1))) + 2, -1, np.int64
  )
  valid = p_codes >= 0
  lookup[p_codes[valid]] = np.flatnonzero(valid)
  has_key = t_codes >= 0
  return np.where(has_key, lookup[t_codes], -1), has_key


def parent_index(target_keys: pd.Series, parent_keys: pd.Series) -> np.ndarray:
  """Row (position) of the parent whose key equals each target's key, -1 if none/null; `[N]` int64.

  `parent_keys` must be unique (a validated primary key).
  """
  return parent_match(target_keys, parent_keys)[0]


class SortedHistory:
  """The visible related rows of N target rows, sorted once. `history_index`, `window_counts` and
  `key_counts` are its methods on a fresh instance; the context-set builder reuses one per context.

  Visible candidate rows are sorted by (key code, time rank, position): ``composite[j] = key * width
  + rank(time)`` is sorted and a target row's visible rows are ``[start, end)`` of that array (its
  key's group, times up to its own). Arguments as `history_index`.
  """

  def __init__(
      self,
      target_keys: pd.Series,
      cand_keys: pd.Series,
      target_ticks: np.ndarray | None = None,
      cand_ticks: np.ndarray | None = None,
      cand_time_valid: np.ndarray | None = None,
      strict: bool = False,
  ):
    self.t_codes, c_codes = shared_codes(target_keys, cand_keys)
    self.use_time = target_ticks is not None and cand_ticks is not None
    self.target_ticks = target_ticks
    visible = c_codes >= 0
    if self.use_time and cand_time_valid is not None:
      visible &= cand_time_valid
    rows = np.flatnonzero(visible)
    keys = c_codes[rows]
    if self.use_time:
      self.uniq, rank = np.unique(
          np.concatenate([cand_ticks[rows], target_ticks]), return_inverse=True
      )
      self.width = len(self.uniq) + 1
      c_rank, t_rank = rank[: len(rows)], rank[len(rows) :]
    else:  # no cut: order by the candidate's own time if it has one, else by table position
      self.width = 1
    n_keys = max(int(c_codes.max(initial=-1)), int(self.t_codes.max(initial=-1))) + 2
    if n_keys * self.width >= np.iinfo(np.int64).max // 2:
      raise OverflowError(
          f"history_index: {n_keys} keys x {self.width} distinct times overflow int64"
      )
    self.t_base = np.where(self.t_codes >= 0, self.t_codes, 0) * self.width
    if self.use_time:
      order = np.lexsort((rows, c_rank, keys))
      self.composite = keys[order] * self.width + c_rank[order]
      self.end = np.searchsorted(
          self.composite, self.t_base + t_rank, side="left" if strict else "right"
      )
    else:
      within = cand_ticks[rows] if cand_ticks is not None else np.zeros(len(rows))
      order = np.lexsort((rows, within, keys))
      self.composite = keys[order]
      self.end = np.searchsorted(self.composite, self.t_base, side="right")
    self.start = np.searchsorted(self.composite, self.t_base, side="left")
    self.sorted_rows = rows[order]
    self.sorted_keys = keys[order]  # key code of each sorted row (its group)

  def index(self, max_rows: int, exclude_self: bool = False, dtype: type = np.int64) -> np.ndarray:
    """`history_index`: `[N, M]` positions (`dtype`), most recent first, -1 padding.

    Computed in blocks of `INDEX_BLOCK` target rows, so the temporaries stay small next to the
    `[N, M]` result."""
    n, m = len(self.t_codes), int(max_rows)
    out = np.empty((n, m), dtype)
    for lo in range(0, n, INDEX_BLOCK):
      hi = min(lo + INDEX_BLOCK, n)
      out[lo:hi] = self._index_block(lo, hi, m, exclude_self)
    return out

  def _index_block(self, lo: int, hi: int, m: int, exclude_self: bool) -> np.ndarray:
    start, end, sorted_rows = self.start[lo:hi], self.end[lo:hi], self.sorted_rows
    extra = 1 if exclude_self else 0
    pos = end[:, None] - 1 - np.arange(m + extra)[None, :]  # [B, M(+1)]
    ok = (pos >= start[:, None]) & (self.t_codes[lo:hi] >= 0)[:, None]
    index = np.where(
        ok,
        sorted_rows[np.clip(pos, 0, max(len(sorted_rows) - 1, 0))] if len(sorted_rows) else -1,
        -1,
    )
    if exclude_self:
      index = np.where(index == np.arange(lo, hi)[:, None], -1, index)
      # Compact: move the removed slot (at most one per row) to the end, keeping recency order.
      index = np.take_along_axis(index, np.argsort(index < 0, axis=1, kind="stable"), axis=1)[:, :m]
    return index

  def window_counts(self, windows: Sequence[float], is_datetime: bool = True) -> np.ndarray:
    """`window_counts`: int64 `[N, W]` visible rows per trailing window (needs times)."""
    if not self.use_time:
      raise ValueError("window_counts: needs target and candidate times")
    counts = np.zeros((len(self.t_codes), len(windows)), np.int64)
    for j, w in enumerate(windows):
      if not w > 0:
        raise ValueError(f"window_counts: windows must be > 0, got {w}")
      span = int(round(w * NS_PER_HOUR)) if is_datetime else w
      first_rank = np.searchsorted(
          self.uniq, self.target_ticks - span, side="right"
      )  # first time > t - w
      lo = np.maximum(
          np.searchsorted(self.composite, self.t_base + first_rank, side="left"), self.start
      )
      counts[:, j] = np.maximum(self.end - lo, 0)
    return np.where((self.t_codes >= 0)[:, None], counts, 0)

  def key_counts(self, exclude_self: bool = False) -> np.ndarray:
    """`key_counts`: int64 `[N]` visible rows sharing each target row's key, without the M cap."""
    counts = np.where(self.t_codes >= 0, self.end - self.start, 0)
    return (counts - (exclude_self & (self.t_codes >= 0))).astype(np.int64)

  def summaries(self, values: np.ndarray) -> dict[str, np.ndarray]:
    """Aggregates of per-row `values` over each target row's visible rows, without the M cap.

    Args:
      values: f64 `[C]` or `[C, F]`, one value per candidate row (table order); NaN = missing.
    Returns:
      {"count": `[N]` visible rows; "n": `[N, F]` of them with a value; "mean", "min", "max" over
      those values and "last"
      (the most recent visible row's value, NaN if it is missing): `[N, F]` float64}; NaN where a
      target row sees no value. A self-history without a time cut must not use this (each row
      would see itself).
    """
    v = np.asarray(values, np.float64)
    v = v[:, None] if v.ndim == 1 else v
    sv = v[self.sorted_rows]  # [S, F], each target row's visible rows are [start, end)
    valid = ~np.isnan(sv)
    start = np.where(self.t_codes >= 0, self.start, 0)
    end = np.where(self.t_codes >= 0, self.end, 0)
    zero = np.zeros((1, sv.shape[1]))
    sums = np.concatenate([zero, np.cumsum(np.where(valid, sv, 0.0), axis=0)])
    counts = np.concatenate([zero, np.cumsum(valid, axis=0)])
    n_valid = counts[end] - counts[start]
    has = n_valid > 0
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = np.where(has, (sums[end] - sums[start]) / n_valid, np.nan)
    out = {
        "count": (end - start).astype(np.float64),
        "n": n_valid,
        "mean": mean,
        "min": np.where(
            has, self._prefix_reduce(np.where(valid, sv, np.inf), end, "cummin"), np.nan
        ),
        "max": np.where(
            has, self._prefix_reduce(np.where(valid, sv, -np.inf), end, "cummax"), np.nan
        ),
    }
    last = np.concatenate([sv, np.full((1, sv.shape[1]), np.nan)])[
        np.where(end > start, end - 1, -1)
    ]
    out["last"] = last
    return out

  def _prefix_reduce(self, sv: np.ndarray, end: np.ndarray, how: str) -> np.ndarray:
    """Running min / max (`how` = "cummin" / "cummax"; missing values passed as +-inf) of `sv` `[S, F]` within each
    key group, read at each target row's last visible row: a visible range always starts at its key
    group's first row, so this is the range's reduction in O(S) (garbage where a range is empty,
    masked by the caller)."""
    if len(sv) == 0:
      return np.full((len(end), sv.shape[1]), np.nan)
    running = getattr(pd.DataFrame(sv).groupby(self.sorted_keys, sort=False), how)().to_numpy()
    return running[np.clip(end - 1, 0, len(sv) - 1)]


def key_counts(
    target_keys: pd.Series, cand_keys: pd.Series, exclude_self: bool = False
) -> np.ndarray:
  """How many candidate rows share each target row's key (0 for a null key); `[N]` int64.

  `exclude_self`: the candidates are the target rows themselves (same order); a row does not count itself.
  """
  return SortedHistory(target_keys, cand_keys).key_counts(exclude_self)


def history_index(
    target_keys: pd.Series,
    cand_keys: pd.Series,
    max_rows: int,
    target_ticks: np.ndarray | None = None,
    cand_ticks: np.ndarray | None = None,
    cand_time_valid: np.ndarray | None = None,
    strict: bool = False,
    exclude_self: bool = False,
) -> np.ndarray:
  """Most recent visible related rows per target row.

  Args:
    target_keys: key of each target row `[N]` (null -> no history).
    cand_keys: key of each candidate row `[C]` (null -> never visible).
    max_rows: M, rows kept per target row.
    target_ticks: target times `[N]`, or None when the target table has no time column (then
      every candidate is visible).
    cand_ticks: candidate times `[C]`, or None when the related table has no time column (then
      every candidate is visible and "most recent" means last in table order).
    cand_time_valid: `[C]` False where a candidate's time is null (never visible when times are used).
    strict: times must be strictly before the target's (rows of the target table itself).
    exclude_self: candidates are the target rows themselves (same order): never return row i for
      target i. Needed only when times do not already exclude it (no time column).
  Returns:
    int64 `[N, M]` candidate positions, most recent first, -1 padding after the last real row.
  """
  history = SortedHistory(target_keys, cand_keys, target_ticks, cand_ticks, cand_time_valid, strict)
  return history.index(max_rows, exclude_self)


def window_counts(
    target_keys: pd.Series,
    cand_keys: pd.Series,
    windows: Sequence[float],
    target_ticks: np.ndarray,
    cand_ticks: np.ndarray,
    cand_time_valid: np.ndarray | None = None,
    strict: bool = False,
    is_datetime: bool = True,
) -> np.ndarray:
  """How many visible related rows share the target's key within trailing time windows.

  The rows `history_index` would list, counted without the M cap: a row counts for window w when
  ``target time - w < row time <= target time`` (``< target time`` when `strict`).

  Args:
    target_keys, cand_keys, target_ticks, cand_ticks, cand_time_valid, strict: as `history_index`
      (times are required).
    windows: W window lengths: hours for datetimes, raw time units otherwise.
    is_datetime: ticks are int64 nanoseconds (windows in hours) rather than raw numbers.
  Returns:
    int64 `[N, W]` counts (0 for a null key).
  """
  history = SortedHistory(target_keys, cand_keys, target_ticks, cand_ticks, cand_time_valid, strict)
  return history.window_counts(windows, is_datetime)
