"""Gathered batches of context sets equal the dense arrays bit for bit (nycflights13 and random schemas).

`RelationalData.arrays()` materialises every row as the builder once stored them (whole-array
`np.take`, ages over all rows); `RelationalData.batch` and the lazy leaves of `lazy_arrays` gather per
batch from the shared feature tables. Both must agree exactly, after `take` / `subset` and a
save / load round trip, and through `ArrayDataset` as the training loop uses it.
"""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_jax.data.context_batches import GatheredArray, lazy_arrays
from nexus_jax.data.context_sets import RelationalData
from nexus_jax.data.datasets import nycflights13
from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.data.schema import Schema
from nexus_jax.train.data import ArrayDataset
from relational_strategies import PRE, tasks

pytestmark = pytest.mark.filterwarnings("ignore::nexus_jax.data.schema.SchemaWarning")


def assert_same_bits(a, b, where=""):
  """Equal pytrees: same structure, dtypes, shapes and bytes (NaN == NaN, -0.0 != 0.0)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, where
  for path, x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (where, path[0], x.dtype, y.dtype)
    assert x.tobytes() == y.tobytes(), (where, path[0])


def check_gather_equals_dense(data: RelationalData, rng: np.random.Generator, batch: int = 7):
  dense = data.arrays()
  n = data.num_rows
  for rows in (np.arange(n), rng.integers(0, max(n, 1), size=batch) if n else np.arange(0)):
    want = jax.tree.map(lambda a: a[rows], dense)
    assert_same_bits(data.batch(rows), want, "batch")
    assert_same_bits(jax.tree.map(lambda a: a[rows], lazy_arrays(data)), want, "lazy")


@pytest.fixture(scope="module")
def flights():
  tables = nycflights13.load_tables(max_target_rows=3000, seed=0)
  builder = ContextSetBuilder(nycflights13.schema(), **nycflights13.BUILDER_KWARGS).fit(tables)
  return builder.transform(tables)


def test_nycflights13_batches_equal_dense_arrays(flights, tmp_path):
  rng = np.random.default_rng(0)
  check_gather_equals_dense(flights, rng, batch=256)
  train = flights.subset("train")
  check_gather_equals_dense(train, rng, batch=256)
  train.save(tmp_path)
  back = RelationalData.load(tmp_path)
  assert_same_bits(back.arrays(), train.arrays(), "save/load")
  assert back.summary() == train.summary()
  # One feature table per source table: the three contexts reading `flights` and the target share it.
  shared = {id(c.table) for c in train.contexts.values() if c.spec.table == "flights"}
  assert shared == {id(train.own)}
  assert all(c.row_index.dtype == np.int32 for c in train.contexts.values())


def test_lazy_leaves_through_array_dataset_equal_dense_batches(flights):
  data = flights.subset("valid")
  lazy = ArrayDataset(lazy_arrays(data), batch_size=64, seed=3)
  dense = ArrayDataset(data.arrays(), batch_size=64, seed=3)
  for step in (0, 1, lazy.steps_per_epoch + 2):
    assert_same_bits(lazy.train_batch(step), dense.train_batch(step), f"step {step}")
  for got, want in zip(lazy.eval_batches(), dense.eval_batches(), strict=True):
    assert_same_bits(got, want, "eval")


def test_gathered_array_indexing_and_shapes(flights):
  leaves = lazy_arrays(flights)
  ctx = leaves["contexts"]["weather.origin=origin"]["numeric"]
  assert isinstance(ctx, GatheredArray) and len(ctx) == flights.num_rows
  dense = flights.contexts["weather.origin=origin"].arrays()["numeric"]
  assert ctx.shape == dense.shape and ctx.dtype == dense.dtype and ctx.ndim == 3
  np.testing.assert_array_equal(ctx[3:9], dense[3:9])
  np.testing.assert_array_equal(ctx[5], dense[5])
  np.testing.assert_array_equal(ctx[flights.split == "test"], dense[flights.split == "test"])
  np.testing.assert_array_equal(np.asarray(ctx), dense)
  with pytest.raises(IndexError, match="bool index"):
    ctx[np.ones(3, bool)]
  with pytest.raises(IndexError, match="int positions"):
    ctx[np.array([0.5])]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=tasks(), m=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_schema_batches_equal_dense_arrays(task, m, seed):
  tables, schema_d = task
  builder = ContextSetBuilder(
      Schema.from_dict(schema_d), max_history=m, preprocessor=PRE, count_windows=(2,)
  )
  data = builder.fit_transform(tables)
  rng = np.random.default_rng(seed)
  check_gather_equals_dense(data, rng)
  check_gather_equals_dense(data.take(rng.permutation(data.num_rows)[: data.num_rows // 2]), rng)
