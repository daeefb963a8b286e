"""TabNet: sparsemax / entmax against numpy references, masks, ghost batch norm, sparsity loss, fit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tabular_testing import CARDS, fit, init_variables, synthetic_rows, fast_jit
from nexus_jax.models.tabular.tabnet import GhostBatchNorm, TabNet, entmax15, feature_groups, sparsemax, sparsity_loss


def _bisect_tau(z: np.ndarray, mass) -> float:
  """tau with mass(z, tau) == 1 by bisection (an algorithm independent of the sort-based one)."""
  lo, hi = z.min() - 2.0, z.max()
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mass(z, mid) > 1 else (lo, mid)
  return (lo + hi) / 2


def np_sparsemax(z: np.ndarray) -> np.ndarray:
  tau = _bisect_tau(z, lambda z, t: np.maximum(z - t, 0).sum())
  return np.maximum(z - tau, 0)


def np_entmax15(z: np.ndarray) -> np.ndarray:
  z = z / 2
  tau = _bisect_tau(z, lambda z, t: (np.maximum(z - t, 0) ** 2).sum())
  return np.maximum(z - tau, 0) ** 2


def test_sparsemax_exact_on_known_input():
  # support {1.0, 0.9, 0.5}: tau = (1 + 0.9 + 0.5 - 1) / 3 = 7/15
  p = sparsemax(jnp.array([1.0, 0.5, -1.0, 0.9]))
  np.testing.assert_allclose(p, [8 / 15, 1 / 30, 0.0, 13 / 30], atol=1e-6)


@pytest.mark.parametrize("fn, ref", [(sparsemax, np_sparsemax), (entmax15, np_entmax15)])
def test_sparse_maps_match_numpy_reference(fn, ref):
  z = np.random.default_rng(0).normal(scale=2.0, size=(16, 7)).astype(np.float32)
  p = np.asarray(fn(jnp.asarray(z)))
  np.testing.assert_allclose(p, np.stack([ref(r.astype(np.float64)) for r in z]), atol=2e-5)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  assert (p >= 0).all() and (p == 0).any(axis=-1).mean() > 0.5  # sparse: most rows drop features
  # axis argument: same result along another axis
  np.testing.assert_allclose(fn(jnp.asarray(z.T), axis=0), p.T, atol=1e-6)
  # ties and constant input give the uniform distribution
  np.testing.assert_allclose(fn(jnp.zeros((3,))), np.full(3, 1 / 3), atol=1e-6)


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_sparse_maps_gradients(fn):
  z = jnp.array([[1.0, 0.5, -1.0, 0.9, 0.2]])
  w = jnp.arange(5.0)
  check_grads(lambda z: fn(z) * w, (z,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  g = jax.grad(lambda z: jnp.sum(fn(z) * w))(jnp.array([0.0, 0.0, 50.0, -50.0, 0.0]))
  assert np.isfinite(np.asarray(g)).all()


def test_sparsity_loss_hand_computation():
  masks = jnp.array(
      [[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]]
  )  # [steps=2, N=2, F=3]
  h = lambda p: -sum(x * math.log(x) for x in p if x > 0)
  expected = (h([0.5, 0.5]) + 0.0 + h([0.25, 0.25, 0.5]) + h([0.2, 0.3, 0.5])) / 4
  np.testing.assert_allclose(sparsity_loss(masks), expected, rtol=1e-5)
  only_row0 = (h([0.5, 0.5]) + h([0.25, 0.25, 0.5])) / 2
  np.testing.assert_allclose(sparsity_loss(masks, jnp.array([True, False])), only_row0, rtol=1e-5)


def _tabnet(**kw):
  return TabNet(
      num_numeric=3,
      cat_cardinalities=CARDS,
      d_out=6,
      n_d=4,
      n_a=4,
      n_steps=2,
      n_shared=1,
      n_independent=1,
      virtual_batch_size=8,
      **kw,
  )


TRAIN = dict(deterministic=False, mutable=["batch_stats", "aux_loss"])


@pytest.fixture(scope="module")
def tabnet16():
  """(model, variables, train_apply, eval_apply) for 16 rows; applies are jitted once per module."""
  x_num, x_cat, _ = synthetic_rows()
  model = _tabnet(sparsity_coef=0.01)
  v = init_variables(model, x_num[:16], x_cat[:16])
  train = fast_jit(lambda v, xn, xc, mask=None: model.apply(v, xn, xc, row_mask=mask, **TRAIN))
  evaluate = fast_jit(lambda v, xn, xc: model.apply(v, xn, xc))
  return model, v, train, evaluate


def test_tabnet_shapes_masks_and_sown_loss(rows, tabnet16):
  _, v, train, _ = tabnet16
  x_num, x_cat, _ = rows
  x_num, x_cat = x_num[:16].reshape(4, 4, 3), x_cat[:16].reshape(4, 4, 2)  # [batch, rows, F]
  (out, aux), upd = train(v, x_num, x_cat)
  assert out.shape == (4, 4, 6)
  assert aux["masks"].shape == (2, 4, 4, 5) and aux["importance"].shape == (4, 4, 5)
  np.testing.assert_allclose(aux["masks"].sum(-1), 1.0, atol=1e-5)
  total = np.asarray(
      aux["importance"].sum(-1)
  )  # 1, or 0 for a row whose decisions are all relu'd to 0
  assert np.all(np.isclose(total, 1.0, atol=1e-5) | (total == 0)) and np.mean(total) > 0.5
  (sown,) = upd["aux_loss"]["tabnet_sparsity"]
  np.testing.assert_allclose(sown, 0.01 * sparsity_loss(aux["masks"].reshape(2, 16, 5)), rtol=1e-5)
  assert feature_groups(3, CARDS, 2, True) == [0, 1, 2, 0, 1, 2, 3, 3, 4, 4]


def test_tabnet_entmax_masks_sum_to_one(rows, tabnet16):
  _, v, _, _ = tabnet16  # the mask type does not change the params
  x_num, x_cat, _ = rows
  model = _tabnet(mask_type="entmax15")
  (_, aux), _ = fast_jit(lambda v: model.apply(v, x_num[:16], x_cat[:16], **TRAIN))(v)
  np.testing.assert_allclose(aux["masks"].sum(-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="mask_type"):
    _tabnet(mask_type="softmax").apply(v, x_num[:2], x_cat[:2])


def test_ghost_batch_norm_train_and_eval():
  x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, size=(8, 3)), jnp.float32)
  bn = GhostBatchNorm(virtual_batch_size=4, momentum=0.9)
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)  # init does not move the statistics
  y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  xn = np.asarray(x)
  # each virtual batch is normalised with its own statistics
  expected = np.concatenate([(c - c.mean(0)) / np.sqrt(c.var(0) + 1e-5) for c in (xn[:4], xn[4:])])
  np.testing.assert_allclose(y, expected, atol=1e-4)
  chunk_mean = (xn[:4].mean(0) + xn[4:].mean(0)) / 2
  chunk_var = (xn[:4].var(0) + xn[4:].var(0)) / 2
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * chunk_mean, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * chunk_var, rtol=1e-5)
  # eval: running statistics, nothing mutated, each row independent of the others
  stats = {"params": v["params"], **upd}
  y_eval = bn.apply(stats, x, use_running_average=True)
  m, s = np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd["batch_stats"]["var"])
  np.testing.assert_allclose(y_eval, (xn - m) / np.sqrt(s + 1e-5), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      bn.apply(stats, x[:1], use_running_average=True), y_eval[:1], atol=1e-6
  )
  # rows with weight 0 are left out of the statistics; uneven chunk sizes work
  w = jnp.array([1, 1, 1, 0, 1, 1, 1, 0], jnp.float32)
  y_w = bn.apply(
      v,
      x.at[3].set(1e6).at[7].set(-1e6),
      use_running_average=False,
      weights=w,
      mutable=["batch_stats"],
  )[0]
  exp_w = np.concatenate([(c - c.mean(0)) / np.sqrt(c.var(0) + 1e-5) for c in (xn[:3], xn[4:7])])
  np.testing.assert_allclose(np.asarray(y_w)[[0, 1, 2, 4, 5, 6]], exp_w, atol=1e-4)
  y7 = bn.apply(v, x[:7], use_running_average=False, mutable=["batch_stats"])[0]
  assert y7.shape == (7, 3) and np.isfinite(np.asarray(y7)).all()


def test_tabnet_batch_stats_train_vs_eval(rows, tabnet16):
  _, v, train, evaluate = tabnet16
  x_num, x_cat, _ = rows
  _, upd = train(v, x_num[:16], x_cat[:16])
  before = jax.tree_util.tree_leaves(v["batch_stats"])
  after = jax.tree_util.tree_leaves(upd["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  v2 = {**v, "batch_stats": upd["batch_stats"]}
  out_all, _ = evaluate(v2, x_num[:16], x_cat[:16])  # eval: no mutable collections needed
  out_perm, _ = evaluate(v2, x_num[:16][::-1], x_cat[:16][::-1])
  np.testing.assert_allclose(
      out_perm[::-1], out_all, atol=1e-5
  )  # eval output of a row ignores the batch
  out_train, _ = train(v2, x_num[:16], x_cat[:16])[0]
  assert not np.allclose(out_train, out_all, atol=1e-3)  # train mode uses batch statistics instead


def test_tabnet_row_mask_excludes_padding_from_batch_stats(rows, tabnet16):
  _, v, train, _ = tabnet16
  x_num, x_cat, _ = rows
  mask = jnp.arange(16) % 4 != 3
  (out_a, _), upd_a = train(v, x_num[:16], x_cat[:16], mask)
  (out_b, _), upd_b = train(v, x_num[:16].at[3].set(100.0).at[7].set(jnp.nan), x_cat[:16], mask)
  np.testing.assert_allclose(out_a[mask], out_b[mask], atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(upd_a), jax.tree_util.tree_leaves(upd_b)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_tabnet_fits_synthetic_task(rows):
  x_num, x_cat, y = rows
  model = TabNet(
      num_numeric=3,
      cat_cardinalities=CARDS,
      d_out=8,
      n_d=8,
      n_a=8,
      n_steps=2,
      n_shared=1,
      n_independent=1,
      virtual_batch_size=64,
      momentum=0.9,
      gamma=1.5,
  )
  first, last = fit(model, (x_num, x_cat), y, lr=1e-2)
  assert last < 0.5 * first and last < 0.5, (first, last)
