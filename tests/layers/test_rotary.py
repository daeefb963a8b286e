"""RoPE: scores depend only on position differences; partial rotation; norms preserved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nexus_jax.layers import rotary

import layers_testing as lt

_rope = jax.jit(rotary.apply_rope, static_argnames=("rotary_fraction", "theta"))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(-200, 2000),
    fraction=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_scores_depend_only_on_relative_position(seed, m, n, shift, fraction):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)
  shift = max(shift, -min(m, n))  # keep positions non-negative

  def score(pm, pn):
    rq = _rope(q, jnp.array([[pm]]), rotary_fraction=fraction)
    rk = _rope(k, jnp.array([[pn]]), rotary_fraction=fraction)
    return np.asarray(jnp.sum(rq * rk, -1))

  np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), atol=2e-4, rtol=1e-4)


def test_partial_rotation_leaves_tail_untouched_and_preserves_norm():
  x = lt.normal(0, (2, 5, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(5) * 7, (2, 5))
  y = _rope(x, pos, rotary_fraction=0.5)
  np.testing.assert_array_equal(np.asarray(y[..., 4:]), np.asarray(x[..., 4:]))
  np.testing.assert_allclose(
      np.linalg.norm(y[..., :4], axis=-1), np.linalg.norm(x[..., :4], axis=-1), rtol=1e-5
  )
  assert not np.allclose(np.asarray(y[:, 1:, :, :4]), np.asarray(x[:, 1:, :, :4]))
  np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(x[:, 0]), atol=1e-6)  # position 0
  np.testing.assert_array_equal(np.asarray(_rope(x, pos, rotary_fraction=0.0)), np.asarray(x))
  assert rotary.rotary_dim(10, 0.25) == 2 and rotary.rotary_dim(10, 0.5) == 4


def test_matches_explicit_rotation_formula():
  x = lt.normal(1, (1, 1, 1, 4))
  y = np.asarray(_rope(x, jnp.array([[3]]), rotary_fraction=1.0, theta=100.0))[0, 0, 0]
  x = np.asarray(x)[0, 0, 0]
  for i, freq in enumerate([1.0, 100.0**-0.5]):
    a = 3 * freq
    np.testing.assert_allclose(
        y[[i, i + 2]],
        [x[i] * np.cos(a) - x[i + 2] * np.sin(a), x[i + 2] * np.cos(a) + x[i] * np.sin(a)],
        rtol=1e-5,
    )


def test_bad_fraction():
  with pytest.raises(ValueError, match="rotary_fraction must be in"):
    rotary.rotary_dim(8, -0.1)
