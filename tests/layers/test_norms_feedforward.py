"""Norms (RMS, Layer, Adaptive) and the feed-forward MLP variants against numpy formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers import feedforward, norms

import layers_testing as lt


def _init_apply(module, *args):
  variables = jax.jit(module.init)(lt.key(0), *args)
  return nn.unbox(variables), jax.jit(module.apply)(variables, *args)


def test_rms_and_layer_norm_match_numpy_in_bf16():
  x = lt.normal(0, (2, 3, 8), jnp.bfloat16) * 30 + 5
  xf = np.asarray(x, np.float64)
  _, y = _init_apply(norms.RMSNorm(), x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(y, np.float64), xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-6), rtol=2e-2
  )
  _, y = _init_apply(norms.LayerNorm(dtype=jnp.float32), x)
  ref = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)
  with pytest.raises(ValueError, match="Unknown norm"):
    norms.make_norm("batch")


def test_adaptive_norm_starts_as_plain_norm_and_follows_condition():
  x = lt.normal(1, (2, 4, 8))
  cond = lt.normal(2, (2, 3))
  module = norms.AdaptiveNorm(norm="rms")
  params, y = _init_apply(module, x, cond)
  _, plain = _init_apply(norms.RMSNorm(use_scale=False), x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(plain), atol=1e-6)
  p = jax.tree.map(lambda a: a + 0.5, params)  # non-zero projections
  y2 = np.asarray(module.apply(p, x, cond))
  scale = 1 + np.asarray(cond) @ np.asarray(p["params"]["scale"]["kernel"]) + 0.5
  shift = np.asarray(cond) @ np.asarray(p["params"]["shift"]["kernel"]) + 0.5
  np.testing.assert_allclose(y2, np.asarray(plain) * scale[:, None] + shift[:, None], atol=1e-5)
  with pytest.raises(ValueError, match="cond must be"):
    module.init(lt.key(0), x, cond[:1])


@pytest.mark.parametrize("activation", ["gelu", "relu", "swish", "swiglu", "geglu"])
def test_mlp_matches_formula(activation):
  x = lt.normal(3, (2, 5, 6))
  params, y = _init_apply(feedforward.MLP(hidden_dim=12, activation=activation), x)
  p = params["params"]
  fn, gated = feedforward.get_activation(activation)
  if gated:
    h = fn(x @ p["wi_gate"]["kernel"]) * (x @ p["wi_up"]["kernel"])
  else:
    h = fn(x @ p["wi"]["kernel"])
  np.testing.assert_allclose(np.asarray(y), np.asarray(h @ p["wo"]["kernel"]), atol=1e-5)


def test_mlp_annotations_dropout_and_errors():
  x = jnp.ones((2, 5, 6))
  module = feedforward.MLP(hidden_dim=12, activation="swiglu", dropout_rate=0.5, out_dim=3)
  boxed = jax.eval_shape(module.init, lt.key(0), x)["params"]
  assert boxed["wi_gate"]["kernel"].names == ("embed", "mlp")
  assert boxed["wo"]["kernel"].names == ("mlp", "embed")
  variables = module.init(lt.key(0), x)
  train = module.apply(variables, x, False, rngs={"dropout": lt.key(1)})
  assert train.shape == (2, 5, 3)
  assert not np.allclose(np.asarray(train), np.asarray(module.apply(variables, x)))
  with pytest.raises(ValueError, match="Unknown activation"):
    feedforward.MLP(hidden_dim=4, activation="tanh").init(lt.key(0), x)
