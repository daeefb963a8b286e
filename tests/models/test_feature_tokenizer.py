"""Tests for nexus_jax.models.tabular.feature_tokenizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models.tabular.feature_tokenizer import FeatureTokenizer, token_missing_mask

CARDS = (4, 7)


def _inputs(lead=(3,), fn=5, seed=0):
  rng = np.random.default_rng(seed)
  x_num = jnp.asarray(rng.normal(size=lead + (fn,)), jnp.float32)
  x_cat = jnp.asarray(np.stack([rng.integers(0, c, size=lead) for c in CARDS], -1), jnp.int32)
  missing = jnp.asarray(rng.random(lead + (fn,)) < 0.3)
  return x_num, x_cat, missing


def _init(model, x_num, x_cat, missing=None):
  return model.init(jax.random.key(0), x_num, x_cat, missing)


@pytest.mark.parametrize("lead", [(3,), (2, 6)])
@pytest.mark.parametrize("kind", ["linear", "plr"])
@pytest.mark.parametrize("cls", [True, False])
def test_shapes_and_cls_first(lead, kind, cls):
  x_num, x_cat, missing = _inputs(lead)
  model = FeatureTokenizer(
      5, CARDS, dim=8, numeric_embedding=kind, plr_frequencies=6, cls_token=cls
  )
  params = _init(model, x_num, x_cat, missing)
  tokens = model.apply(params, x_num, x_cat, missing)
  assert tokens.shape == lead + (model.num_tokens, 8) and model.num_tokens == int(cls) + 7
  if cls:
    cls_param = nn.unbox(params)["params"]["cls"]
    np.testing.assert_array_equal(tokens[..., 0, :], np.broadcast_to(cls_param, lead + (8,)))
  assert token_missing_mask(missing, x_cat, cls).shape == tokens.shape[:-1]


def test_linear_and_categorical_match_numpy_reference():
  x_num, x_cat, _ = _inputs((4,))
  model = FeatureTokenizer(5, CARDS, dim=3, cls_token=False)
  p = nn.unbox(_init(model, x_num, x_cat))["params"]
  tokens = np.asarray(model.apply({"params": p}, x_num, x_cat))
  ref_num = np.asarray(x_num)[..., None] * np.asarray(p["num_weight"]) + np.asarray(p["num_bias"])
  table, bias = np.asarray(p["cat_embedding"]), np.asarray(p["cat_bias"])
  ref_cat = (
      np.stack([table[np.asarray(x_cat)[:, 0]], table[CARDS[0] + np.asarray(x_cat)[:, 1]]], 1)
      + bias
  )
  np.testing.assert_allclose(tokens[:, :5], ref_num, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tokens[:, 5:], ref_cat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["plr", "plr_lite"])
def test_plr_matches_numpy_reference(kind):
  x_num, x_cat, _ = _inputs((2, 3))
  model = FeatureTokenizer(
      5, CARDS, dim=4, numeric_embedding=kind, plr_frequencies=3, plr_sigma=0.5
  )
  p = nn.unbox(_init(model, x_num, x_cat))["params"]
  tokens = np.asarray(model.apply({"params": p}, x_num, x_cat))
  c, w, b = (np.asarray(p[k], np.float64) for k in ("plr_frequencies", "plr_weight", "plr_bias"))
  x = np.asarray(x_num, np.float64)
  ref = np.zeros((2, 3, 5, 4))
  for f in range(5):  # explicit per-feature reference, as written in the paper
    v = 2 * np.pi * c[f] * x[..., f, None]  # [2, 3, K]
    periodic = np.concatenate([np.cos(v), np.sin(v)], -1)
    w_f = w if kind == "plr_lite" else w[f]  # lite: one linear shared by every feature
    ref[..., f, :] = np.maximum(periodic @ w_f + b[f], 0.0)
  np.testing.assert_allclose(tokens[..., 1:6, :], ref, rtol=1e-5, atol=1e-5)
  assert np.abs(c).max() <= 3 * 0.5 + 1e-6  # truncated-normal init of the frequencies


def test_missing_mask_replaces_token_with_learned_missing_embedding():
  x_num, x_cat, _ = _inputs((2,))
  model = FeatureTokenizer(5, CARDS, dim=4)
  params = _init(model, x_num, x_cat)
  missing = jnp.zeros((2, 5), bool).at[0, 2].set(True)
  base = model.apply(params, x_num, x_cat)
  masked = model.apply(params, x_num, x_cat, missing)
  other_value = model.apply(params, x_num.at[0, 2].set(123.0), x_cat, missing)
  m = nn.unbox(params)["params"]["missing"]
  np.testing.assert_array_equal(masked[0, 1 + 2], m[2])
  assert not np.allclose(base[0, 3], masked[0, 3])
  np.testing.assert_array_equal(masked, other_value)  # the imputed value no longer matters
  np.testing.assert_array_equal(
      np.delete(np.asarray(masked), 3, axis=1)[0], np.delete(np.asarray(base), 3, axis=1)[0]
  )
  mask = token_missing_mask(missing, x_cat.at[1, 0].set(0))
  assert mask[0].tolist() == [False, False, False, True, False, False, False, x_cat[0, 1] == 0]
  assert bool(mask[1, 6])


def test_jit_grad_and_bfloat16():
  x_num, x_cat, missing = _inputs((2, 3))
  model = FeatureTokenizer(5, CARDS, dim=8, numeric_embedding="plr", plr_frequencies=4)
  params = _init(model, x_num, x_cat, missing)

  def loss(p, x):
    return jnp.sum(model.apply(p, x, x_cat, missing) ** 2)

  grads = jax.jit(jax.grad(loss))(params, x_num)
  for name, g in nn.unbox(grads)["params"].items():
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, name
  out = jax.jit(model.apply)(params, x_num.astype(jnp.bfloat16), x_cat, missing)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, model.apply(params, x_num, x_cat, missing), atol=0.05)
  bf16 = FeatureTokenizer(
      5, CARDS, dim=8, numeric_embedding="plr", plr_frequencies=4, dtype=jnp.bfloat16
  )
  out16 = bf16.apply(params, x_num.astype(jnp.bfloat16), x_cat, missing)
  assert out16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out16, np.float32)).all()


def test_logical_partitioning_names():
  x_num, x_cat, _ = _inputs()
  for kind, expected in [
      ("linear", {"num_weight": ("feature", "embed"), "num_bias": ("feature", "embed")}),
      (
          "plr",
          {
              "plr_frequencies": ("feature", None),
              "plr_weight": ("feature", None, "embed"),
              "plr_bias": ("feature", "embed"),
          },
      ),
  ]:
    params = _init(FeatureTokenizer(5, CARDS, dim=4, numeric_embedding=kind), x_num, x_cat)
    specs = nn.get_partition_spec(params)["params"]
    expected |= {
        "cls": ("embed",),
        "missing": ("feature", "embed"),
        "cat_embedding": (None, "embed"),  # rows = category counts: replicated
        "cat_bias": ("feature", "embed"),
    }
    assert {k: tuple(v) for k, v in specs.items()} == expected


def test_out_of_range_codes_read_as_unknown_and_single_kind_inputs():
  x_num, x_cat, _ = _inputs((2,))
  model = FeatureTokenizer(5, CARDS, dim=4)
  params = _init(model, x_num, x_cat)
  bad = model.apply(params, x_num, x_cat.at[:, 1].set(jnp.array([-5, 99])))
  unknown = model.apply(params, x_num, x_cat.at[:, 1].set(1))
  np.testing.assert_array_equal(bad, unknown)
  only_cat = FeatureTokenizer(0, CARDS, dim=4)
  assert only_cat.apply(_init(only_cat, None, x_cat), None, x_cat).shape == (2, 3, 4)
  only_num = FeatureTokenizer(5, (), dim=4, cls_token=False)
  assert only_num.apply(_init(only_num, x_num, None), x_num, None).shape == (2, 5, 4)


def test_bad_inputs_raise_clear_errors():
  x_num, x_cat, missing = _inputs((2,))
  with pytest.raises(ValueError, match="x_num has shape"):
    _init(FeatureTokenizer(4, CARDS, dim=4), x_num, x_cat)
  with pytest.raises(ValueError, match="leading shape"):
    _init(FeatureTokenizer(5, CARDS, dim=4), x_num, x_cat[:1])
  with pytest.raises(ValueError, match="numeric_embedding"):
    _init(FeatureTokenizer(5, CARDS, dim=4, numeric_embedding="fourier"), x_num, x_cat)
  with pytest.raises(TypeError, match="integer codes"):
    _init(FeatureTokenizer(5, CARDS, dim=4), x_num, x_cat.astype(jnp.float32))
  with pytest.raises(ValueError, match="x_cat is None"):
    _init(FeatureTokenizer(5, CARDS, dim=4), x_num, None)
