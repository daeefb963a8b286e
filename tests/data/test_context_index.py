"""Tests for nexus_jax.data.context_index against a plain-Python reference."""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_jax.data import context_index as ci


def _reference(t_keys, c_keys, m, t_times, c_times, c_valid, strict, exclude_self):
  """Row-by-row definition of history_index (slow, obviously correct)."""
  out = np.full((len(t_keys), m), -1)
  for i, key in enumerate(t_keys):
    if key is None:
      continue
    rows = []
    for j, ck in enumerate(c_keys):
      if ck is None or ck != key or (exclude_self and i == j):
        continue
      if t_times is not None and c_times is not None:
        if not c_valid[j] or (c_times[j] >= t_times[i] if strict else c_times[j] > t_times[i]):
          continue
      rows.append(j)
    if c_times is not None:
      rows.sort(key=lambda j: (c_times[j], j))
    out[i, : min(m, len(rows))] = rows[::-1][:m]
  return out


def _draw_rows(data, n, c, max_time):
  """n target and c candidate rows: keys in {None, 0..3}, integer times, candidate time validity."""
  keys = st.one_of(st.none(), st.integers(0, 3))
  t_keys = data.draw(st.lists(keys, min_size=n, max_size=n))
  c_keys = data.draw(st.lists(keys, min_size=c, max_size=c))
  t_times = np.array(
      data.draw(st.lists(st.integers(0, max_time), min_size=n, max_size=n)), np.int64
  )
  c_times = np.array(
      data.draw(st.lists(st.integers(0, max_time), min_size=c, max_size=c)), np.int64
  )
  c_valid = np.array(data.draw(st.lists(st.booleans(), min_size=c, max_size=c)), bool)
  return t_keys, c_keys, t_times, c_times, c_valid


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 12),
    c=st.integers(0, 15),
    m=st.integers(1, 4),
    strict=st.booleans(),
    timed=st.sampled_from(["both", "target_only", "cand_only", "none"]),
)
def test_history_index_matches_reference(data, n, c, m, strict, timed):
  t_keys, c_keys, t_times, c_times, c_valid = _draw_rows(data, n, c, max_time=6)
  t_arg = t_times if timed in ("both", "target_only") else None
  c_arg = c_times if timed in ("both", "cand_only") else None
  got = ci.history_index(
      pd.Series(t_keys, dtype=object),
      pd.Series(c_keys, dtype=object),
      m,
      target_ticks=t_arg,
      cand_ticks=c_arg,
      cand_time_valid=c_valid,
      strict=strict,
  )
  want = _reference(t_keys, c_keys, m, t_arg, c_arg, c_valid, strict, False)
  np.testing.assert_array_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(st.one_of(st.none(), st.integers(0, 2)), max_size=12), m=st.integers(1, 3))
def test_history_index_exclude_self_without_times(keys, m):
  s = pd.Series(keys, dtype=object)
  got = ci.history_index(s, s, m, exclude_self=True)
  np.testing.assert_array_equal(got, _reference(keys, keys, m, None, None, None, False, True))
  assert not (got == np.arange(len(keys))[:, None]).any()


def test_parent_index_and_mixed_key_types():
  got = ci.parent_index(pd.Series(["b", None, "zz", "a", "b"]), pd.Series(["a", "b", "c"]))
  np.testing.assert_array_equal(got, [1, -1, -1, 0, 1])
  # An int key read as float (NaN in a CSV) still matches a string primary key.
  got = ci.parent_index(pd.Series([2.0, np.nan, 7.0]), pd.Series(["1", "2"]))
  np.testing.assert_array_equal(got, [1, -1, -1])
  # parent_match also tells a null key (no parent by definition) from an orphan (7.0).
  index, has_key = ci.parent_match(pd.Series([2.0, np.nan, 7.0]), pd.Series(["1", "2"]))
  assert index.tolist() == [1, -1, -1] and has_key.tolist() == [True, False, True]


def test_time_ticks_and_ages():
  times = pd.Series(pd.to_datetime(["2020-01-01T00:00Z", None, "2020-01-01T01:30Z"], utc=True))
  ticks, valid, is_dt = ci.time_ticks(times)
  assert is_dt and valid.tolist() == [True, False, True]
  assert ci.ages_between(ticks[2], ticks[0], True) == np.float32(1.5)
  ticks, valid, is_dt = ci.time_ticks(pd.Series([1.0, np.nan, 4.0]))
  assert not is_dt and valid.tolist() == [True, False, True]
  assert ci.ages_between(ticks[2], ticks[0], False) == np.float32(3.0)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 12),
    c=st.integers(0, 15),
    strict=st.booleans(),
    windows=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.5, 10.0]), min_size=1, max_size=3),
)
def test_window_counts_match_reference(data, n, c, strict, windows):
  t_keys, c_keys, t_times, c_times, c_valid = _draw_rows(data, n, c, max_time=8)
  t_times, c_times = t_times.astype(np.float64), c_times.astype(
      np.float64
  )  # numeric (non-datetime) times
  got = ci.window_counts(
      pd.Series(t_keys, dtype=object),
      pd.Series(c_keys, dtype=object),
      windows,
      t_times,
      c_times,
      c_valid,
      strict=strict,
      is_datetime=False,
  )
  want = np.zeros((n, len(windows)), np.int64)
  for i, key in enumerate(t_keys):
    for j, ck in enumerate(c_keys):
      if key is None or ck != key or not c_valid[j]:
        continue
      before = c_times[j] < t_times[i] if strict else c_times[j] <= t_times[i]
      for w, width in enumerate(windows):
        want[i, w] += before and c_times[j] > t_times[i] - width
  np.testing.assert_array_equal(got, want)


def test_window_counts_datetimes_use_hours():
  hours = pd.to_datetime(
      ["2013-01-01 00:00", "2013-01-01 01:00", "2013-01-01 02:30", "2013-01-01 03:00"]
  )
  ticks = hours.to_numpy("datetime64[ns]").view(np.int64)
  keys = pd.Series(["a", "a", "a", "b"])
  got = ci.window_counts(keys, keys, [1, 3], ticks, ticks, strict=True)
  # Windows are (t - w, t]: row 1 (01:00) sees 00:00 only within 3 h (exactly 1 h ago is outside 1 h);
  # row 2 (02:30) sees 01:00 and 00:00 within 3 h, nothing within 1 h.
  np.testing.assert_array_equal(got, [[0, 0], [0, 1], [0, 2], [0, 0]])
  assert ci.window_counts(keys, keys, [3], ticks, ticks, strict=False)[2, 0] == 3  # itself included


def test_key_counts_and_exclude_self():
  keys = pd.Series(["a", None, "a", "b", "a"])
  np.testing.assert_array_equal(ci.key_counts(keys, keys), [3, 0, 3, 1, 3])
  np.testing.assert_array_equal(ci.key_counts(keys, keys, exclude_self=True), [2, 0, 2, 0, 2])
  np.testing.assert_array_equal(ci.key_counts(pd.Series(["z", "b"]), keys), [0, 1])
