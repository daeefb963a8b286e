"""Symbolic reasoner: exact transitive closure on crisp input, fuzzy rules by hand, masking."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nexus_jax.layers import symbolic


def _reachability(adj):
  """Boolean closure by Floyd-Warshall: paths of >= 1 edge."""
  reach = adj.astype(bool).copy()
  for m in range(len(adj)):
    reach |= reach[:, m : m + 1] & reach[m : m + 1, :]
  return reach


@functools.partial(jax.jit, static_argnums=(1, 2))
def _closure(adj, steps, tnorm):
  return symbolic.transitive_closure(adj, steps, tnorm)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.floats(0.05, 0.4))
def test_transitive_closure_is_exact_on_crisp_input(seed, density):
  rng = np.random.default_rng(seed)
  adj = (rng.random((2, 9, 9)) < density).astype(np.float32)  # a batch of random digraphs
  expected = np.stack([_reachability(a) for a in adj]).astype(np.float32)
  for tnorm in symbolic.TNORMS:
    got = np.asarray(_closure(jnp.asarray(adj), 3, tnorm))  # 2^3 = 8 = N - 1 edges
    np.testing.assert_array_equal(got, expected, err_msg=tnorm)


def test_closure_steps_bound_the_path_length():
  chain = np.eye(6, k=1, dtype=np.float32)  # 0 -> 1 -> ... -> 5
  one = np.asarray(_closure(jnp.asarray(chain), 1, "godel"))  # paths of 1 or 2 edges
  np.testing.assert_array_equal(one, np.eye(6, k=1) + np.eye(6, k=2))
  full = np.asarray(_closure(jnp.asarray(chain), 3, "godel"))
  np.testing.assert_array_equal(full, np.triu(np.ones((6, 6)), 1))


def test_fuzzy_rules_equal_hand_computed_values():
  a = jnp.array([[0.0, 0.5], [0.8, 0.0]])
  # product: (a o a)[0, 0] = max(0 * 0, 0.5 * 0.8) = 0.4; [1, 1] = 0.4; off-diagonal 0.
  np.testing.assert_allclose(symbolic.compose(a, a, "product"), [[0.4, 0.0], [0.0, 0.4]])
  # one closure round: S(a, a o a) = a + c - a c elementwise.
  np.testing.assert_allclose(
      symbolic.transitive_closure(a, 1, "product"), [[0.4, 0.5], [0.8, 0.4]], rtol=1e-6
  )
  np.testing.assert_allclose(symbolic.transitive_closure(a, 1, "godel"), [[0.5, 0.5], [0.8, 0.5]])
  np.testing.assert_allclose(
      symbolic.compose(a, a, "lukasiewicz"), [[0.3, 0.0], [0.0, 0.3]], atol=1e-6
  )
  p = jnp.array([[0.9], [0.2]])  # unary predicate on entities 0, 1
  # modus ponens, product: d(0) = max(0 * 0.9, 0.5 * 0.2) = 0.1; d(1) = max(0.8 * 0.9, 0) = 0.72
  np.testing.assert_allclose(symbolic.modus_ponens(a, p, "product"), [[0.1], [0.72]], rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(a=st.floats(0, 1), b=st.floats(0, 1))
def test_tnorms_are_bounded_with_identities(a, b):
  for name in symbolic.TNORMS:
    t, s = symbolic.tnorm_fns(name)
    assert float(t(a, 1.0)) == pytest.approx(a, abs=1e-6) and float(s(a, 0.0)) == pytest.approx(
        a, abs=1e-6
    )
    assert 0.0 <= float(t(a, b)) <= min(a, b) + 1e-6
    assert max(a, b) - 1e-6 <= float(s(a, b)) <= 1.0 + 1e-6


@functools.lru_cache(maxsize=None)
def _setup():
  layer = symbolic.SymbolicReasoner(
      num_relations=2, num_predicates=3, num_derived=2, steps=2, relation_dim=8, value_dim=8
  )
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 16)), jnp.float32)
  mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
  params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), h, mask)["params"]
  return layer, h, mask, params


def test_module_shapes_masking_and_gradients():
  layer, h, mask, params = _setup()
  apply = jax.jit(lambda p, h: layer.apply({"params": p}, h, mask))
  y, aux = apply(params, h)
  assert y.shape == h.shape
  assert aux["derived_relations"].shape == (2, 2, 6, 6)
  assert aux["derived_predicates"].shape == (2, 6, 2, 3)
  np.testing.assert_allclose(aux["relation_choice"].sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(aux["relations"])[1, :, 4:, :] == 0)
  assert np.all(np.asarray(aux["relations"])[1, :, :, 4:] == 0)
  # Padded entities neither change nor influence the real ones.
  h2 = h.at[1, 4:].set(100.0)
  y2, _ = apply(params, h2)
  np.testing.assert_allclose(y2[1, :4], y[1, :4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y2[1, 4:], h2[1, 4:])
  grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, h)[0] ** 2)))(params)
  leaves = jax.tree.leaves(nn.unbox(grads))
  assert all(np.isfinite(g).all() for g in leaves) and all(np.abs(g).sum() > 0 for g in leaves)


def test_params_have_distinct_logical_axis_names():
  layer, h, mask, _ = _setup()
  boxed = jax.eval_shape(layer.init, jax.random.key(0, impl="rbg"), h, mask)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for v in leaves:
    named = [a for a in v.names if a is not None]
    assert len(named) == len(set(named)), v.names


def test_bad_inputs_raise_clear_errors():
  layer, h, mask, _ = _setup()
  key = jax.random.key(0, impl="rbg")
  with pytest.raises(ValueError, match="t-norm"):
    jax.eval_shape(symbolic.SymbolicReasoner(tnorm="hamacher").init, key, h)
  with pytest.raises(ValueError, match="batch, entities, embed"):
    jax.eval_shape(layer.init, key, h[0])
  with pytest.raises(ValueError, match="mask must be"):
    jax.eval_shape(layer.init, key, h, mask[:, :3])
  with pytest.raises(ValueError, match="steps"):
    symbolic.transitive_closure(jnp.zeros((3, 3)), -1)
