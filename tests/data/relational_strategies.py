"""Hypothesis strategies shared by the context-set tests: random small schemas and tables."""

import numpy as np
import pandas as pd
from hypothesis import strategies as st

BASE = pd.Timestamp("2020-01-01", tz="UTC")
PRE = {"numeric_transform": "standard"}


@st.composite
def tasks(draw):
  """(tables, schema dict): parent P <- target T (+ history table H on P, + child table K on T).

  H and K may be empty, with or without a time column; every foreign key column has a key with a
  parent row (a column of orphans only is a SchemaError at fit).
  """
  n_p, n_t = draw(st.integers(1, 5)), draw(st.integers(4, 14))
  target_time = draw(st.booleans())
  with_h, with_k = draw(st.booleans()), draw(st.booleans())
  keys = st.one_of(st.none(), st.integers(0, n_p))  # n_p itself is an orphan key
  hours = st.integers(0, 12)

  def times(n):
    return [
        (BASE + pd.Timedelta(hours=h)).isoformat()
        for h in draw(st.lists(hours, min_size=n, max_size=n))
    ]

  tables = {
      "P": pd.DataFrame(
          {
              "pid": range(n_p),
              "size": draw(st.lists(st.floats(0, 9), min_size=n_p, max_size=n_p)),
              "kind": draw(st.lists(st.sampled_from("ab"), min_size=n_p, max_size=n_p)),
          }
      )
  }
  t = pd.DataFrame(
      {
          "tid": range(n_t),
          "pid": draw(st.lists(keys, min_size=n_t, max_size=n_t)),
          "x": draw(st.lists(st.floats(-5, 5), min_size=n_t, max_size=n_t)),
          "leak": np.arange(n_t) * 1000.0,
          "y": [i % 2 for i in range(n_t)],
      }
  )
  spec_t = {"primary_key": "tid", "foreign_keys": {"pid": "P"}, "drop_columns": ["leak"]}
  if target_time:
    t["t"] = times(n_t)
    spec_t["time_column"] = "t"
    split = {
        "method": "time",
        "valid_start": (BASE + pd.Timedelta(hours=6)).isoformat(),
        "test_start": (BASE + pd.Timedelta(hours=9)).isoformat(),
    }
    t.loc[0, "t"] = BASE.isoformat()  # at least one training row
  else:
    split = {
        "method": "random",
        "valid_fraction": 0.25,
        "test_fraction": 0.25,
        "seed": draw(st.integers(0, 3)),
    }
  t.loc[0, "pid"] = 0  # some key has a parent: a column of orphans only is a SchemaError
  tables["T"] = t
  schema = {
      "tables": {"P": {"primary_key": "pid"}, "T": spec_t},
      "target": {"table": "T", "column": "y", "task": "binary"},
      "split": split,
  }
  for name, key, parent, flag in (("H", "pid", "P", with_h), ("K", "tid", "T", with_k)):
    if flag:
      n = draw(st.integers(0, 12))
      parent_keys = st.one_of(st.none(), st.integers(0, len(tables[parent])))
      df = pd.DataFrame(
          {
              key: draw(st.lists(parent_keys, min_size=n, max_size=n)),
              "v": draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)),
          }
      )
      if n:
        df.loc[0, key] = 0
      spec = {"foreign_keys": {key: parent}}
      if draw(st.booleans()):  # also on an empty table
        df["t"] = times(n)
        spec["time_column"] = "t"
      tables[name] = df
      schema["tables"][name] = spec
  return tables, schema
