"""The DuckDB engine gives exactly the numpy engine's history rows, window counts and key counts.

Random keys (nulls, keys without candidates), ticks with ties (int64 datetimes and float64 numbers,
candidates with null times), strict and non-strict cuts, the M cap, histories without times (with a
table's own rows excluded), and the whole builder on random schemas and a nycflights13 slice.
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("duckdb")

from nexus_jax.data import context_index as ci  # noqa: E402
from nexus_jax.data import duckdb_index  # noqa: E402
from nexus_jax.data.datasets import nycflights13  # noqa: E402
from nexus_jax.data.relational import ContextSetBuilder  # noqa: E402
from nexus_jax.data.schema import Schema  # noqa: E402
from relational_strategies import PRE, tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::nexus_jax.data.schema.SchemaWarning")


@st.composite
def histories(draw):
  """SortedHistory arguments plus (M, exclude_self, windows, is_datetime)."""
  n, c = draw(st.integers(1, 25)), draw(st.integers(0, 25))
  key = st.one_of(st.none(), st.integers(0, 4))
  use_time = draw(st.booleans())
  self_history = use_time is False and draw(st.booleans())
  t_keys = draw(st.lists(key, min_size=n, max_size=n))
  c_keys = t_keys if self_history else draw(st.lists(key, min_size=c, max_size=c))
  c = len(c_keys)
  is_datetime = draw(st.booleans())
  if is_datetime:  # few distinct hours: many ties
    tick = st.integers(0, 5).map(lambda h: h * ci.NS_PER_HOUR)
    dtype, windows = np.int64, draw(st.sampled_from([(), (1,), (1, 2.5), (0.5, 24)]))
  else:
    tick = st.sampled_from([-1.5, 0.0, 0.25, 1.0, 1.0, 2.75, 3.0])
    dtype, windows = np.float64, draw(st.sampled_from([(), (0.25,), (1, 1.75)]))
  t_ticks = np.array(draw(st.lists(tick, min_size=n, max_size=n)), dtype)
  c_ticks = np.array(draw(st.lists(tick, min_size=c, max_size=c)), dtype)
  c_valid = np.array(draw(st.lists(st.booleans(), min_size=c, max_size=c)), bool)
  if draw(st.booleans()):
    t_keys = [None if k is None else f"k{k}" for k in t_keys]  # string keys
    c_keys = t_keys if self_history else [None if k is None else f"k{k}" for k in c_keys]
  args = (
      pd.Series(t_keys, dtype=object),
      pd.Series(c_keys, dtype=object),
      t_ticks if use_time else None,
      c_ticks if draw(st.booleans()) or use_time else None,
      c_valid,
      draw(st.booleans()),
  )
  m = draw(st.integers(1, 5))
  return args, m, self_history, windows if use_time else (), is_datetime


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=histories())
def test_duckdb_history_equals_numpy(case):
  args, m, exclude_self, windows, is_dt = case
  numpy = ci.SortedHistory(*args)
  duck = duckdb_index.DuckDBHistory(
      *args, max_rows=m, exclude_self=exclude_self, windows=windows, is_datetime=is_dt
  )
  want = numpy.index(m, exclude_self)
  got = duck.index(m, exclude_self)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(duck.key_counts(exclude_self), numpy.key_counts(exclude_self))
  if windows:
    np.testing.assert_array_equal(
        duck.window_counts(windows, is_dt), numpy.window_counts(windows, is_dt)
    )


def test_duckdb_history_known_rows_ties_and_strictness(tmp_path):
  """Keys a, a, a, b, None at times 1, 2, 2, 1, 1: a target of key a at time 2 sees both rows of
  time 2 (the later row first) non-strictly, and only the row of time 1 strictly."""
  con = duckdb_index.connect(memory_limit="256MB")
  con.execute(
      "COPY (SELECT * FROM (VALUES (0, 'a', 1), (1, 'a', 2), (2, 'a', 2), (3, 'b', 1),"
      f" (4, NULL, 1)) v(row, key, t)) TO '{tmp_path}/c.parquet' (FORMAT parquet)"
  )
  con.execute(
      "COPY (SELECT * FROM (VALUES (0, 'a', 2), (1, 'b', 0), (2, NULL, 5), (3, 'z', 9))"
      f" v(row, key, t)) TO '{tmp_path}/t.parquet' (FORMAT parquet)"
  )
  for strict, want, seen in (
      (False, [[2, 1, 0], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]], [3, 0, 0, 0]),
      (True, [[0, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]], [1, 0, 0, 0]),
  ):
    out = tmp_path / f"o{strict}.parquet"
    duckdb_index.history_parquet(
        con, tmp_path / "t.parquet", tmp_path / "c.parquet", out, 3, strict, windows=(1,)
    )
    index, counts, visible = duckdb_index.read_index(con, out, 4, 3, 1)
    np.testing.assert_array_equal(index, want)
    np.testing.assert_array_equal(visible, seen)
    np.testing.assert_array_equal(counts[:, 0], [2 if not strict else 0, 0, 0, 0])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="max_rows=0"):
    duckdb_index.history_sql("t", "c", 0)
  with pytest.raises(ValueError, match="window counts need times"):
    duckdb_index.history_sql("t", "c", 2, use_time=False, windows=(1,))
  with pytest.raises(ValueError, match="engine='spark'"):
    ContextSetBuilder(nycflights13.schema(), engine="spark")


def _same_context_sets(a, b):
  assert list(a.contexts) == list(b.contexts)
  for name in a.contexts:
    np.testing.assert_array_equal(a.contexts[name].row_index, b.contexts[name].row_index)
  assert a.extra_numeric.tobytes() == b.extra_numeric.tobytes()
  assert a.feature_info == b.feature_info


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=tasks(), m=st.integers(1, 3))
def test_builder_duckdb_engine_equals_numpy_on_random_schemas(task, m):
  tables, schema_d = task
  schema = Schema.from_dict(schema_d)
  kw = dict(max_history=m, preprocessor=PRE, count_windows=(2,))
  numpy = ContextSetBuilder(schema, **kw).fit_transform(tables)
  duck = ContextSetBuilder(schema, engine="duckdb", **kw).fit_transform(tables)
  _same_context_sets(numpy, duck)


def test_builder_duckdb_engine_equals_numpy_on_nycflights13():
  tables = nycflights13.load_tables(max_target_rows=4000, seed=0)
  numpy = ContextSetBuilder(nycflights13.schema(), **nycflights13.BUILDER_KWARGS).fit(tables)
  duck = ContextSetBuilder(
      nycflights13.schema(),
      **nycflights13.BUILDER_KWARGS,
      engine="duckdb",
      engine_options={"memory_limit": "512MB", "threads": 1},
  ).fit(tables)
  _same_context_sets(numpy.transform(tables), duck.transform(tables))
