"""FT-Transformer: shapes, paper structure and presets, CLS-only last block, missing values, dropout, fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tabular_testing import CARDS, fit, init_variables, synthetic_rows, fast_jit
from nexus_jax.models.tabular.ft_transformer import FT_TRANSFORMER_PRESETS, FTTransformer


def _ft(**kw):
  return FTTransformer(
      num_numeric=3, cat_cardinalities=CARDS, d_out=5, n_blocks=2, d_token=16, n_heads=2, **kw
  )


@pytest.fixture(scope="module")
def ft():
  """(model, variables, jitted apply) of a 2-block FT-Transformer initialised on [8, 3] rows."""
  x_num, x_cat, _ = synthetic_rows(8)
  model = _ft()
  v = init_variables(model, x_num, x_cat)
  apply = fast_jit(lambda v, xn, xc, miss=None: model.apply(v, xn, xc, miss))
  return model, v, apply


def test_shapes_for_batch_and_batch_rows(ft):
  _, v, apply = ft
  x_num, x_cat, _ = synthetic_rows(8)
  out, aux = apply(v, x_num, x_cat)
  assert out.shape == (8, 5) and aux["cls_attention"].shape == (8, 6)
  np.testing.assert_allclose(aux["cls_attention"].sum(-1), 1.0, atol=1e-5)
  out3, aux3 = apply(v, x_num.reshape(2, 4, 3), x_cat.reshape(2, 4, 2))  # [batch, rows, F]
  assert out3.shape == (2, 4, 5) and aux3["cls_attention"].shape == (2, 4, 6)
  np.testing.assert_allclose(out3.reshape(8, 5), out, atol=1e-5)


def test_paper_structure_first_block_without_attention_norm(ft):
  _, v, _ = ft
  params = v["params"]
  assert "attention_norm" not in params["block0"] and "attention_norm" in params["block1"]
  # ReGLU: the first FFN matrix has 2 * d_hidden outputs, d_hidden = int(4/3 * d_token)
  assert params["block0"]["ffn"]["wi"]["kernel"].value.shape == (16, 2 * 21)
  assert params["block0"]["attention"]["query"]["kernel"].names == ("embed", "heads", "kv")


def test_presets_are_rtdl_defaults():
  small, medium, large = (FT_TRANSFORMER_PRESETS[k] for k in ("small", "medium", "large"))
  assert (
      small["n_blocks"],
      small["d_token"],
      small["attention_dropout"],
      small["ffn_dropout"],
  ) == (1, 96, 0.1, 0.0)
  assert (
      medium["n_blocks"],
      medium["d_token"],
      medium["attention_dropout"],
      medium["ffn_dropout"],
  ) == (2, 128, 0.15, 0.05)
  assert (
      large["n_blocks"],
      large["d_token"],
      large["attention_dropout"],
      large["ffn_dropout"],
  ) == (3, 192, 0.2, 0.1)
  default = FTTransformer(num_numeric=1)
  assert all(getattr(default, k) == v for k, v in FT_TRANSFORMER_PRESETS["default"].items())
  m = FTTransformer.from_preset("small", num_numeric=2, n_heads=4)
  assert (m.n_blocks, m.d_token, m.n_heads) == (1, 96, 4)
  with pytest.raises(ValueError, match="known"):
    FTTransformer.from_preset("huge", num_numeric=2)


def test_cls_only_last_block_matches_full_computation(ft):
  _, v, apply = ft
  x_num, x_cat, _ = synthetic_rows(8)
  out, aux = apply(v, x_num, x_cat)
  full = _ft(return_tokens=True)
  out_full, aux_full = fast_jit(lambda v: full.apply(v, x_num, x_cat))(v)  # same params
  np.testing.assert_allclose(out_full, out, atol=1e-5)
  np.testing.assert_allclose(aux_full["cls_attention"], aux["cls_attention"], atol=1e-5)
  assert aux_full["tokens"].shape == (8, 5, 16)


def test_missing_values_use_the_missing_token(ft):
  _, v, apply = ft
  x_num, x_cat, _ = synthetic_rows(8)
  miss = jnp.zeros((8, 3), bool).at[:, 1].set(True)
  ref, _ = apply(v, x_num.at[:, 1].set(0.0), x_cat, miss)
  nan_out, _ = apply(v, x_num.at[:, 1].set(jnp.nan), x_cat, None)  # NaN counts as missing
  other, _ = apply(v, x_num.at[:, 1].set(7.0), x_cat, miss)  # imputed value is ignored
  np.testing.assert_allclose(nan_out, ref, atol=1e-5)
  np.testing.assert_allclose(other, ref, atol=1e-5)
  assert np.isfinite(np.asarray(nan_out)).all()


def test_dropout_and_bfloat16(ft):
  _, v, apply = ft  # dtype and dropout rates do not change the params: reuse the fixture's
  x_num, x_cat, _ = synthetic_rows(8)
  model = _ft(attention_dropout=0.5, ffn_dropout=0.5, residual_dropout=0.2, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(v))
  train = fast_jit(
      lambda key: model.apply(v, x_num, x_cat, deterministic=False, rngs={"dropout": key})[0]
  )
  a, b = train(jax.random.key(1)), train(jax.random.key(2))
  assert a.dtype == jnp.bfloat16 and np.isfinite(np.asarray(a, np.float32)).all()
  assert not np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32))
  out16 = fast_jit(lambda: model.apply(v, x_num, x_cat)[0])()  # deterministic: no dropout
  np.testing.assert_allclose(
      np.asarray(out16, np.float32), apply(v, x_num, x_cat)[0], atol=0.1, rtol=0.1
  )


@pytest.mark.slow  # the dropless MoE's grouped matmul costs ~10 s of CPU compile
def test_moe_feed_forward_and_sown_losses():
  x_num, x_cat, _ = synthetic_rows(8)
  model = _ft(moe_experts=3, moe_top_k=2)
  v = init_variables(model, x_num, x_cat)
  assert "moe" in v["params"]["block0"] and "ffn" not in v["params"]["block0"]
  assert v["params"]["block0"]["moe"]["wo"].value.shape == (3, 21, 16)  # [expert, mlp, embed]
  (out, _), sown = fast_jit(lambda v: model.apply(v, x_num, x_cat, mutable=["aux_loss"]))(v)
  assert out.shape == (8, 5) and np.isfinite(np.asarray(out)).all()
  assert set(sown["aux_loss"]["block0"]["moe"]) == {"load_balance", "router_z"}
  assert "block1" in sown["aux_loss"]  # the CLS-only last block routes too


def test_ft_transformer_fits_synthetic_task(rows):
  x_num, x_cat, y = rows
  model = FTTransformer(
      num_numeric=3,
      cat_cardinalities=CARDS,
      d_out=8,
      n_blocks=1,
      d_token=16,
      n_heads=2,
      attention_dropout=0.0,
      ffn_dropout=0.0,
  )
  first, last = fit(model, (x_num, x_cat), y, lr=3e-3)
  assert last < 0.5 * first and last < 0.5, (first, last)


def test_init_under_a_mesh_with_logical_axis_rules():
  """Params keep their full rank when created, so the logical sharding constraint applies (as in the
  training loop); `nn.DenseGeneral`'s flattened kernels used to fail here."""
  import flax.linen as nn
  import ml_collections

  from nexus_jax.train import sharding

  x_num, x_cat, _ = synthetic_rows(8)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(None)):
    shapes = jax.eval_shape(lambda: _ft().init(jax.random.key(0), x_num, x_cat))
  attention = shapes["params"]["block0"]["attention"]
  assert attention["query"]["kernel"].value.shape == (16, 2, 8)
  assert attention["out"]["kernel"].names == ("heads", "kv", "embed")
