"""History indexes and window counts computed by DuckDB, out of core (the ``[duckdb]`` extra).

The numpy engine (`context_index.SortedHistory`) holds every key and time in memory; this engine
reads Parquet, runs under a memory limit (DuckDB spills sorts and joins to its temp directory) and
writes Parquet, so the index of tables larger than memory can be built:

    con = connect(memory_limit="1GB")
    history_parquet(con, "targets.parquet", "candidates.parquet", "index.parquet",
                    max_rows=8, strict=True, use_time=True, windows=(3 * NS_PER_HOUR,))
    index, counts, visible = read_index(con, "index.parquet", n_targets, max_rows, n_windows=1)

Inputs are Parquet files with plain columns ``row`` (BIGINT position), ``key`` (any type; NULL: no
history) and ``t`` (BIGINT ticks or DOUBLE; for candidates NULL = never visible, for targets NULL
reads as 0, as `context_index.time_ticks` does). The query never range-joins: candidates are
numbered per key by ``row_number() over (partition by key order by t, row)`` and carry their M - 1
predecessors (``lag``); the last candidate of each (key, time) then answers every target at or after
that time through ONE ASOF join on (key, t) -- its number is how many rows the target sees, its lags
are the most recent M. Window counts are further ASOF joins at ``t - w`` (a materialised column).
Without times every candidate of the key is visible (an equi-join on the key's last candidate).

The output has ``row``, ``n_visible`` (rows seen without the M cap), ``r0 .. r{M-1}`` (most recent
first, NULL = padding) and ``c0 .. c{W-1}`` (window counts); it gives exactly the numpy engine's
rows: same key, time at or before the target's (strictly before when `strict`), ties in time broken
by table position (the later row is the more recent), `exclude_self` for a table's own history
without times. `DuckDBHistory` wraps it for `relational.ContextSetBuilder(engine="duckdb")`.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
import pandas as pd

from nexus_jax.data import context_index as ci


def _duckdb():
  try:
    import duckdb
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'engine="duckdb" needs the duckdb package: pip install "nexus_jax[duckdb]"'
    ) from err
  return duckdb


def connect(
    memory_limit: str = "1GB", threads: int | None = None, temp_directory: str | None = None
):
  """A DuckDB connection with ``SET memory_limit`` (spilling to `temp_directory` beyond it)."""
  con = _duckdb().connect()
  con.execute(f"SET memory_limit = '{memory_limit}'")
  con.execute("SET preserve_insertion_order = false")
  if threads is not None:
    con.execute(f"SET threads = {int(threads)}")
  if temp_directory is not None:
    con.execute(f"SET temp_directory = '{temp_directory}'")
  return con


def _quote(path: str | os.PathLike) -> str:
  return "'" + str(path).replace("'", "''") + "'"


def history_sql(
    targets: str,
    candidates: str,
    max_rows: int,
    strict: bool = False,
    use_time: bool = True,
    exclude_self: bool = False,
    windows: Sequence[float] = (),
) -> str:
  """The SELECT computing the history rows (module docstring) of `targets` from `candidates`.

  Args:
    targets, candidates: SQL relations (e.g. ``read_parquet('x.parquet')``) with row, key, t.
    max_rows: M.
    strict: candidates strictly before the target time (a table's own history).
    use_time: cut by time; False: every candidate of the key is visible, ordered by its own t
      (NULL read as 0), then row.
    exclude_self: (without times) a target row never lists the candidate with its own row.
    windows: W window lengths in tick units (ns for datetimes), times only.
  """
  m = int(max_rows)
  if m < 1:
    raise ValueError(f"max_rows={max_rows}; must be >= 1")
  if windows and not use_time:
    raise ValueError("window counts need times (use_time=True)")
  if exclude_self and use_time:
    raise ValueError("exclude_self applies without times (a time cut already excludes the row)")
  lags = m + (1 if exclude_self else 0)
  order = "t, row" if use_time else "coalesce(t, 0), row"
  lag_cols = ", ".join(["row AS r0"] + [f"lag(row, {j}) OVER w AS r{j}" for j in range(1, lags)])
  r_cols = ", ".join(f"r{j}" for j in range(lags))
  visible = "key IS NOT NULL" + (" AND t IS NOT NULL" if use_time else "")
  numbered = f"""
    numbered AS (
      SELECT key, t, row_number() OVER w AS ord, lead(t) OVER w AS next_t,
             lead(row) OVER w AS next_row, {lag_cols}
      FROM {candidates} WHERE {visible}
      WINDOW w AS (PARTITION BY key ORDER BY {order})
    )"""
  if use_time:
    spans = list(windows)
    t_cols = "".join(f", coalesce(t, 0) - {_literal(w)} AS tw{j}" for j, w in enumerate(spans))
    op = ">" if strict else ">="
    joins = f"ASOF LEFT JOIN last h ON tg.key = h.key AND tg.t {op} h.t"
    counts = ""
    for j in range(len(spans)):
      joins += f"\n      ASOF LEFT JOIN last h{j} ON tg.key = h{j}.key AND tg.tw{j} >= h{j}.t"
      counts += f", greatest(coalesce(h.ord, 0) - coalesce(h{j}.ord, 0), 0) AS c{j}"
    return f"""
    WITH {numbered},
    last AS (SELECT key, t, ord, {r_cols} FROM numbered WHERE next_t IS DISTINCT FROM t),
    tg AS (SELECT row, key, coalesce(t, 0) AS t{t_cols} FROM {targets} WHERE key IS NOT NULL)
    SELECT tg.row AS row, coalesce(h.ord, 0) AS n_visible,
           {", ".join(f"h.r{j} AS r{j}" for j in range(m))}{counts}
    FROM tg {joins}"""
  if exclude_self:  # drop the target's own row from its M + 1 most recent, keep M
    kept = f"list_filter([{r_cols}], lambda x: x IS NULL OR x != tg.row)"
    rs = ", ".join(f"{kept}[{j + 1}] AS r{j}" for j in range(m))
    n_visible = "greatest(coalesce(h.ord, 0) - 1, 0)"
  else:
    rs = ", ".join(f"h.r{j} AS r{j}" for j in range(m))
    n_visible = "coalesce(h.ord, 0)"
  return f"""
    WITH {numbered},
    last AS (SELECT key, ord, {r_cols} FROM numbered WHERE next_row IS NULL),
    tg AS (SELECT row, key FROM {targets} WHERE key IS NOT NULL)
    SELECT tg.row AS row, {n_visible} AS n_visible, {rs}
    FROM tg LEFT JOIN last h ON tg.key = h.key"""


def _literal(w: float) -> str:
  """An exact SQL literal: integers (ns spans) as BIGINT, floats parsed as DOUBLE from repr."""
  if isinstance(w, (int, np.integer)):
    return f"CAST({int(w)} AS BIGINT)"
  return f"CAST('{float(w)!r}' AS DOUBLE)"


def history_parquet(
    con,
    targets: str | os.PathLike,
    candidates: str | os.PathLike,
    out: str | os.PathLike,
    max_rows: int,
    strict: bool = False,
    use_time: bool = True,
    exclude_self: bool = False,
    windows: Sequence[float] = (),
) -> None:
  """Runs `history_sql` on two Parquet files and writes the rows to Parquet `out`."""
  sql = history_sql(
      f"read_parquet({_quote(targets)})",
      f"read_parquet({_quote(candidates)})",
      max_rows,
      strict,
      use_time,
      exclude_self,
      windows,
  )
  con.execute(f"COPY ({sql}) TO {_quote(out)} (FORMAT parquet)")


def read_index(
    con, path: str | os.PathLike, n: int, max_rows: int, n_windows: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads a `history_parquet` output back, one column at a time.

  Returns:
    (index i32[N, M] with -1 padding, counts i64[N, W], n_visible i64[N]); target rows the file
    does not list (null keys) get -1 / 0.
  """
  source = f"read_parquet({_quote(path)})"
  index = np.full((n, int(max_rows)), -1, np.int32)
  counts = np.zeros((n, int(n_windows)), np.int64)
  visible = np.zeros(n, np.int64)

  def scatter(out, name):  # one column (with its rows: scans need not keep order) at a time
    got = con.execute(f"SELECT row, {name} AS v FROM {source}").fetchnumpy()
    values = got["v"]
    out[np.asarray(got["row"], np.int64)] = (
        np.ma.filled(values, -1) if np.ma.isMaskedArray(values) else values
    )

  for j in range(int(max_rows)):
    scatter(index[:, j], f"r{j}")
  for j in range(int(n_windows)):
    scatter(counts[:, j], f"c{j}")
  scatter(visible, "n_visible")
  return index, counts, visible


class DuckDBHistory:
  """`context_index.SortedHistory`'s answers (index, window counts, key counts) from DuckDB.

  Arguments as `SortedHistory`, plus the M, `exclude_self` and windows (hours for datetimes, raw
  units otherwise) to compute in one query, and the `connect` options. Keys are coded with
  `context_index.shared_codes` (the numpy engine's key equality) and written with the ticks to
  Parquet in a temporary directory; the query's output is read back and the directory removed.
  """

  def __init__(
      self,
      target_keys: pd.Series,
      cand_keys: pd.Series,
      target_ticks: np.ndarray | None,
      cand_ticks: np.ndarray | None,
      cand_time_valid: np.ndarray | None,
      strict: bool,
      max_rows: int,
      exclude_self: bool = False,
      windows: Sequence[float] = (),
      is_datetime: bool = True,
      memory_limit: str = "1GB",
      threads: int | None = None,
      temp_directory: str | None = None,
  ):
    t_codes, c_codes = ci.shared_codes(target_keys, cand_keys)
    self.use_time = target_ticks is not None and cand_ticks is not None
    self.max_rows, self.exclude_self = int(max_rows), bool(exclude_self)
    self.windows = tuple(float(w) for w in windows) if self.use_time else ()
    self.is_datetime = is_datetime
    spans = [int(round(w * ci.NS_PER_HOUR)) if is_datetime else w for w in self.windows]
    n = len(t_codes)
    with tempfile.TemporaryDirectory(dir=temp_directory) as tmp:
      con = connect(memory_limit, threads, temp_directory or tmp)
      try:
        t_path, c_path, out = (
            pathlib.Path(tmp) / f for f in ("t.parquet", "c.parquet", "o.parquet")
        )
        c_null = None
        if self.use_time and cand_time_valid is not None:  # without a cut, order by raw ticks
          c_null = ~np.asarray(cand_time_valid, bool)
        _write(con, t_path, t_codes, target_ticks)
        _write(con, c_path, c_codes, cand_ticks, c_null)
        history_parquet(
            con,
            t_path,
            c_path,
            out,
            self.max_rows,
            strict,
            self.use_time,
            self.exclude_self,
            spans,
        )
        self._index, self._counts, self._visible = read_index(
            con, out, n, self.max_rows, len(spans)
        )
      finally:
        con.close()

  def index(self, max_rows: int, exclude_self: bool = False, dtype: type = np.int64) -> np.ndarray:
    """`[N, M]` positions, most recent first, -1 padding (as computed at construction)."""
    if (int(max_rows), bool(exclude_self)) != (self.max_rows, self.exclude_self):
      raise ValueError(
          f"DuckDBHistory was built for max_rows={self.max_rows}, exclude_self="
          f"{self.exclude_self}; asked for {max_rows}, {exclude_self}"
      )
    return self._index.astype(dtype, copy=False)

  def window_counts(self, windows: Sequence[float], is_datetime: bool = True) -> np.ndarray:
    """i64 `[N, W]` visible rows per trailing window (the windows given at construction)."""
    if not self.use_time:
      raise ValueError("window_counts: needs target and candidate times")
    if tuple(float(w) for w in windows) != self.windows or is_datetime != self.is_datetime:
      raise ValueError(f"DuckDBHistory was built for windows {self.windows}; asked for {windows}")
    return self._counts

  def key_counts(self, exclude_self: bool = False) -> np.ndarray:
    """i64 `[N]` visible rows sharing each target row's key, without the M cap."""
    if bool(exclude_self) != self.exclude_self:
      raise ValueError(f"DuckDBHistory was built for exclude_self={self.exclude_self}")
    return self._visible


def _nullable(values: np.ndarray, null: np.ndarray):
  """A pandas masked array (NULL where `null`) that DuckDB scans without pyarrow."""
  values = np.asarray(values)
  if np.issubdtype(values.dtype, np.integer):
    return pd.arrays.IntegerArray(values.astype(np.int64), null)
  return pd.arrays.FloatingArray(values.astype(np.float64), null)


def _write(
    con, path: pathlib.Path, codes: np.ndarray, ticks: np.ndarray | None, t_null=None
) -> None:
  """Writes (row, key, t) to Parquet: key NULL where the code is -1, t NULL where `t_null` (all
  NULL without ticks)."""
  n = len(codes)
  if ticks is None:
    t = _nullable(np.zeros(n, np.int64), np.ones(n, bool))
  else:
    t = _nullable(ticks, np.zeros(n, bool) if t_null is None else t_null)
  frame = pd.DataFrame(
      {
          "row": np.arange(n, dtype=np.int64),
          "key": _nullable(np.where(codes >= 0, codes, 0), codes < 0),
          "t": t,
      }
  )
  con.register("frame_view", frame)
  try:
    con.execute(f"COPY frame_view TO {_quote(path)} (FORMAT parquet)")
  finally:
    con.unregister("frame_view")
