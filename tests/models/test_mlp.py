"""MLP, ResNet-MLP and TabM: shapes, TabM member arithmetic against numpy, variants, fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tabular_testing import CARDS, fit, init_variables, synthetic_rows, fast_jit
from nexus_jax.models.tabular.feature_tokenizer import FeatureTokenizer
from nexus_jax.models.tabular.mlp import MLP, ResNetMLP, TabM


def _p(tree, *path):
  for key in path:
    tree = tree[key]
  return np.asarray(getattr(tree, "value", tree), np.float64)


@pytest.fixture(scope="module")
def tabm():
  x_num, x_cat, _ = synthetic_rows(12)
  model = TabM(
      num_numeric=3,
      cat_cardinalities=CARDS,
      d_out=3,
      k=4,
      n_blocks=2,
      d_block=8,
      dropout=0.0,
      d_embedding=4,
      numeric_embedding="plr",
  )
  return model, init_variables(model, x_num, x_cat)


def test_tabm_output_is_mean_of_members_computed_by_hand(tabm):
  model, v = tabm
  x_num, x_cat, _ = synthetic_rows(12)
  x_num = x_num.at[0, 0].set(jnp.nan)
  out, aux = fast_jit(lambda v: model.apply(v, x_num.reshape(3, 4, 3), x_cat.reshape(3, 4, 2)))(v)
  assert out.shape == (3, 4, 3) and aux["members"].shape == (3, 4, 4, 3)
  np.testing.assert_allclose(out, aux["members"].mean(axis=-2), atol=1e-6)
  # every member by hand: shared tokenizer -> ((h * r_i) W) * s_i + b_i per block -> own head
  tok = FeatureTokenizer(3, CARDS, 4, numeric_embedding="plr", cls_token=False)
  miss = jnp.isnan(x_num)
  h0 = np.asarray(
      tok.apply({"params": v["params"]["tokenizer"]}, jnp.where(miss, 0.0, x_num), x_cat, miss),
      np.float64,
  ).reshape(12, -1)
  p = v["params"]
  members = aux["members"].reshape(12, 4, 3)
  for i in range(4):
    h = h0
    for b in range(2):
      blk = p[f"block{b}"]
      h = np.maximum(
          (h * _p(blk, "r")[i]) @ _p(blk, "kernel") * _p(blk, "s")[i] + _p(blk, "bias")[i], 0.0
      )
    y = h @ _p(p, "heads", "kernel")[i] + _p(p, "heads", "bias")[i]
    np.testing.assert_allclose(members[:, i], y, atol=1e-4)


def test_tabm_adapter_init_and_mini_variant(tabm):
  _, v = tabm
  r0, r1 = _p(v["params"], "block0", "r"), _p(v["params"], "block1", "r")
  assert set(np.unique(r0)) == {-1.0, 1.0}  # random signs in the first adapter
  np.testing.assert_array_equal(r1, 1.0)
  np.testing.assert_array_equal(_p(v["params"], "block0", "s"), 1.0)
  x_num, x_cat, _ = synthetic_rows(4)
  mini = TabM(
      num_numeric=3,
      cat_cardinalities=CARDS,
      d_out=3,
      k=4,
      n_blocks=2,
      d_block=8,
      variant="tabm_mini",
  )
  shapes = jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(lambda: mini.init(jax.random.key(0), x_num, x_cat))
  )
  blocks = shapes["params"]
  assert set(blocks["block0"]) == {"r", "kernel", "bias"} and blocks["block0"]["bias"].value == (8,)
  assert set(blocks["block1"]) == {"kernel", "bias"} and blocks["heads"]["kernel"].value == (
      4,
      8,
      3,
  )
  with pytest.raises(ValueError, match="variant"):
    TabM(num_numeric=3, variant="big").init(jax.random.key(0), x_num, None)


def test_mlp_and_resnet_shapes_and_leading_dims():
  x_num, x_cat, _ = synthetic_rows(12)
  for model in (
      MLP(num_numeric=3, cat_cardinalities=CARDS, d_out=4, d_layers=(8,), d_embedding=4),
      ResNetMLP(
          num_numeric=3,
          cat_cardinalities=CARDS,
          d_out=4,
          n_blocks=1,
          d_main=8,
          d_embedding=4,
          numeric_embedding="linear",
      ),
  ):
    v = init_variables(model, x_num, x_cat)
    apply = fast_jit(lambda xn, xc: model.apply(v, xn, xc))
    out, aux = apply(x_num, x_cat)
    out3, _ = apply(x_num.reshape(3, 4, 3), x_cat.reshape(3, 4, 2))
    assert out.shape == (12, 4) and out3.shape == (3, 4, 4) and aux == {}
    np.testing.assert_allclose(out3.reshape(12, 4), out, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mlp", marks=pytest.mark.slow),
        pytest.param("resnet", marks=pytest.mark.slow),
        "tabm",
    ],
)
def test_mlp_family_fits_synthetic_task(rows, name):
  x_num, x_cat, y = rows
  model = {
      "mlp": MLP(
          num_numeric=3,
          cat_cardinalities=CARDS,
          d_out=8,
          d_layers=(32, 32),
          dropout=0.0,
          d_embedding=8,
      ),
      "resnet": ResNetMLP(
          num_numeric=3,
          cat_cardinalities=CARDS,
          d_out=8,
          n_blocks=1,
          d_main=32,
          dropout_first=0.0,
          d_embedding=8,
      ),
      "tabm": TabM(
          num_numeric=3,
          cat_cardinalities=CARDS,
          d_out=8,
          k=4,
          n_blocks=2,
          d_block=32,
          dropout=0.0,
          d_embedding=8,
          numeric_embedding="plr",
      ),
  }[name]
  first, last = fit(model, (x_num, x_cat), y, lr=3e-3)
  assert last < 0.5 * first and last < 0.5, (first, last)
