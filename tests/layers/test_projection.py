"""`Projection` has `nn.DenseGeneral`'s params (names, shapes, initial values) and outputs, with
logical names of the kernel's own rank (its use under a mesh: tests/train/test_sharded_training.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.projection import Projection


@pytest.mark.parametrize(
    "shape, features, axis, names",
    [
        ((6, 16), (4, 8), -1, ("embed", "heads", "kv")),
        ((6, 4, 8), 16, (-2, -1), ("heads", "kv", "embed")),
        ((2, 3, 16), (2, 5), -1, ("embed", None, "mlp")),
        ((6, 16), 5, -1, ("embed", "mlp")),
    ],
)
def test_projection_matches_dense_general(shape, features, axis, names):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  bias_init = nn.initializers.normal(1.0)  # nonzero, so the bias layout is checked too
  ours = Projection(
      features,
      kernel_axes=names,
      axis=axis,
      use_bias=True,
      kernel_init=default_kernel_init(),
      bias_init=bias_init,
  )
  ref = nn.DenseGeneral(
      features, axis=axis, use_bias=True, kernel_init=default_kernel_init(), bias_init=bias_init
  )
  p_ours = ours.init(jax.random.key(3), x)
  p_ref = ref.init(jax.random.key(3), x)
  assert p_ours["params"]["kernel"].names == names
  assert p_ours["params"]["bias"].names == names[-len(np.atleast_1d(features)) :]
  p_ours = nn.unbox(p_ours)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)
  np.testing.assert_array_equal(ours.apply(p_ours, x), ref.apply(p_ref, x))


def test_projection_rejects_wrong_number_of_names():
  with pytest.raises(ValueError, match="kernel_axes .* name 2 dims but the kernel"):
    Projection((4, 8), kernel_axes=("embed", "heads")).init(jax.random.key(0), jnp.ones((2, 16)))


def test_projection_bfloat16_compute():
  x = jnp.ones((3, 16), jnp.bfloat16)
  layer = Projection((2, 4), kernel_axes=("embed", "heads", "kv"), dtype=jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.key(0), x))
  assert params["params"]["kernel"].dtype == jnp.float32
  assert layer.apply(params, x).dtype == jnp.bfloat16
