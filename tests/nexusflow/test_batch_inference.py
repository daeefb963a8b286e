"""batch_inference: padded fixed-size batches give the same predictions as one full batch, and
lazily gathered inputs the same as dense ones."""

import jax
import numpy as np
from relational_testing import predict_tables

from nexus_jax.data.context_batches import GatheredArray
from nexus_jax.nexusflow.batch_inference import make_predict_fn, predict_arrays
from nexus_jax.nexusflow.objectives import relational_arrays


def test_batched_predict_with_padding_equals_unbatched(fitted, tables):
  predictor = fitted.predictor_
  new, history = predict_tables(tables)
  arrays = relational_arrays(predictor.relational_data(new, history))
  n = len(new["orders"])
  whole, _ = predict_arrays(predictor.model, predictor.variables, arrays, "binary", batch_size=n)
  for batch in (1, 7, n - 1):  # the last batch is padded with copies of the last row
    parts, aux = predict_arrays(
        predictor.model,
        predictor.variables,
        arrays,
        "binary",
        batch_size=batch,
        aux_keys=("context_attention",),
    )
    assert parts.shape == (n,) and aux["context_attention"].shape[0] == n
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)


def test_lazily_gathered_arrays_predict_exactly_like_dense_arrays(fitted, tables):
  """The prediction path slices `GatheredArray` leaves (no dense per-row copies): same numbers."""
  predictor = fitted.predictor_
  new, history = predict_tables(tables)
  data = predictor.relational_data(new, history)
  lazy = relational_arrays(data)
  assert all(isinstance(leaf, GatheredArray) for leaf in jax.tree.leaves(lazy))
  step = make_predict_fn(predictor.model, "binary")
  got, _ = predict_arrays(
      predictor.model, predictor.variables, lazy, "binary", batch_size=16, predict_fn=step
  )
  want, _ = predict_arrays(
      predictor.model, predictor.variables, data.arrays(), "binary", batch_size=16, predict_fn=step
  )
  np.testing.assert_array_equal(got, want)
