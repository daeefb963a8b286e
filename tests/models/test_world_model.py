"""JEPA world model: VICReg terms vs hand-computed values, EMA target, span masks, no leakage."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.models import world_model as wm


def _key(seed):
  return jax.random.key(seed, impl="rbg")  # compiles much faster than threefry on CPU


def test_vicreg_terms_equal_hand_computed_values():
  z_a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  z_b = np.array([[1.0, 1.0], [0.0, 2.0], [3.0, 1.0]])
  # invariance: mean over rows and dims of squared differences = (0 + 1 + 0 + 0 + 4 + 0) / 6
  invariance = 5 / 6
  # a: column means (2/3, 1); var (ddof 1): col0 = (1/9 + 4/9 + 1/9) / 2 = 1/3, col1 = 1;
  # cov01 = ((1/3)(-1) + (-2/3)(1) + (1/3)(0)) / 2 = -1/2.
  # b: means (4/3, 4/3); col0 = (1/9 + 16/9 + 25/9) / 2 = 7/3, col1 = (1/9 + 4/9 + 1/9) / 2 = 1/3;
  # cov01 = ((-1/3)(-1/3) + (-4/3)(2/3) + (5/3)(-1/3)) / 2 = -2/3.
  hinge = lambda var: np.mean(np.maximum(0.0, 1.0 - np.sqrt(np.array(var) + 1e-4)))
  variance = (hinge([1 / 3, 1.0]) + hinge([7 / 3, 1 / 3])) / 2
  covariance = 2 * (1 / 2) ** 2 / 2 + 2 * (2 / 3) ** 2 / 2
  terms = wm.vicreg_terms(jnp.asarray(z_a), jnp.asarray(z_b))
  np.testing.assert_allclose(terms["invariance"], invariance, rtol=1e-6)
  np.testing.assert_allclose(terms["variance"], variance, rtol=1e-5)
  np.testing.assert_allclose(terms["covariance"], covariance, rtol=1e-5)


def test_vicreg_weights_select_rows():
  rng = np.random.default_rng(0)
  z_a, z_b = rng.normal(size=(2, 9, 4)).astype(np.float32)
  w = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], np.float32)
  keep = w > 0
  weighted = wm.vicreg_terms(jnp.asarray(z_a), jnp.asarray(z_b), jnp.asarray(w))
  selected = wm.vicreg_terms(jnp.asarray(z_a[keep]), jnp.asarray(z_b[keep]))
  for name in weighted:
    np.testing.assert_allclose(weighted[name], selected[name], rtol=1e-5, err_msg=name)


def test_span_mask_has_exact_count_in_contiguous_spans():
  mask = np.asarray(wm.span_mask(_key(0), batch=16, length=80, mask_ratio=0.15, span_length=4))
  assert mask.shape == (16, 80)
  np.testing.assert_array_equal(mask.sum(1), 12)  # 15% of 80
  for row in mask:  # runs of True (ends joined, as spans may wrap) are multiples of 4 long
    rolled = np.roll(row, -int(np.argmin(row)))  # start at a False position
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], rolled.astype(int), [0]]))))[::2]
    assert np.all(runs % 4 == 0), runs
  assert len({row.tobytes() for row in mask}) > 1  # different rows get different spans
  np.testing.assert_array_equal(mask, wm.span_mask(_key(0), 16, 80))  # deterministic


def test_ema_update_moves_target_towards_online_weights():
  target = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
  online = {"w": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
  new = wm.ema_update(target, online, decay=0.75)
  np.testing.assert_allclose(new["w"], [1.5, 1.5])
  np.testing.assert_allclose(new["b"]["c"], 3.0)


@functools.lru_cache(maxsize=None)
def _setup(vocab_size=None):
  model = wm.JEPAWorldModel(
      embed_dim=16,
      num_layers=1,
      num_heads=2,
      mlp_dim=32,
      vocab_size=vocab_size,
      predictor_dim=16,
      predictor_heads=2,
      predictor_mlp_dim=32,
  )
  rng = np.random.default_rng(0)
  if vocab_size:
    x = jnp.asarray(rng.integers(0, vocab_size, (4, 24)), jnp.int32)
  else:
    x = jnp.asarray(rng.normal(size=(4, 24, 3)), jnp.float32)
  mask = wm.span_mask(_key(1), 4, 24, span_length=2)
  params = nn.unbox(jax.jit(model.init)(_key(2), x, mask)["params"])
  return model, x, mask, params


def test_train_step_updates_online_weights_by_gradient_and_target_by_ema():
  model, x, mask, params = _setup()
  target = wm.init_target(params)
  for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(params["encoder"])):
    np.testing.assert_array_equal(a, b)
  opt = optax.sgd(0.1)

  @jax.jit
  def step(params, target, opt_state):
    (loss, aux), (g_params, g_target) = jax.value_and_grad(
        lambda p, t: wm.jepa_loss(model, p, t, x, mask), argnums=(0, 1), has_aux=True
    )(params, target)
    updates, opt_state = opt.update(g_params, opt_state)
    new_params = optax.apply_updates(params, updates)
    return new_params, wm.ema_update(target, new_params["encoder"], 0.9), g_target, loss

  new_params, new_target, g_target, loss = step(params, target, opt.init(params))
  assert np.isfinite(loss)
  assert all(np.all(g == 0) for g in jax.tree.leaves(g_target))  # targets: stop_gradient
  moved = 0
  for t_new, t_old, p_new in zip(
      jax.tree.leaves(new_target), jax.tree.leaves(target), jax.tree.leaves(new_params["encoder"])
  ):
    np.testing.assert_allclose(t_new, 0.9 * t_old + 0.1 * p_new, rtol=1e-6, atol=1e-7)
    moved += int(np.any(t_new != t_old))
  assert moved > 0


def test_context_latents_do_not_depend_on_masked_inputs():
  model, x, mask, params = _setup(vocab_size=11)
  encode = jax.jit(lambda x: model.apply({"params": params}, x, mask)[1]["context"])
  changed = jnp.where(mask, (x + 5) % 11, x)
  np.testing.assert_allclose(encode(changed), encode(x), rtol=1e-6, atol=1e-6)
  unmasked_change = jnp.where(mask, x, (x + 5) % 11)
  assert np.abs(np.asarray(encode(unmasked_change) - encode(x))).max() > 1e-3


def test_loss_terms_and_shapes():
  model, x, mask, params = _setup()
  loss, aux = jax.jit(
      lambda p: wm.jepa_loss(
          model, p, wm.init_target(p), x, mask, vicreg_on="all", actions=jnp.ones((4, 24, 2))
      )
  )(
      {
          **params,
          "predictor": {
              **params["predictor"],
              "actions": {"kernel": jnp.zeros((2, 16)), "bias": jnp.zeros((16,))},
          },
      }
  )
  assert aux["context"].shape == (4, 24, 16)
  assert aux["embeddings"].shape == (4, 24, model.expander_dims[-1])
  np.testing.assert_allclose(
      loss, 25 * aux["invariance"] + 25 * aux["variance"] + aux["covariance"], rtol=1e-5
  )
  # variance / covariance act on the expander's embeddings, not on the representations
  expanded = model.apply({"params": params}, aux["context"], method="expand")
  np.testing.assert_allclose(expanded, aux["embeddings"], rtol=1e-5, atol=1e-6)
  var, cov = wm.variance_covariance(jnp.asarray(aux["embeddings"]).reshape(24 * 4, -1))
  np.testing.assert_allclose([aux["variance"], aux["covariance"]], [var, cov], rtol=1e-5)


def test_vicreg_on_masked_positions_uses_only_those_embeddings():
  model, x, mask, params = _setup()
  _, aux = jax.jit(
      lambda p: wm.jepa_loss(model, p, wm.init_target(p), x, mask, vicreg_on="masked")
  )(params)
  rows = np.asarray(aux["embeddings"])[np.asarray(mask)]  # [masked positions, D]
  var, cov = wm.variance_covariance(jnp.asarray(rows))
  np.testing.assert_allclose([aux["variance"], aux["covariance"]], [var, cov], rtol=1e-4)
  with pytest.raises(ValueError, match="vicreg_on"):
    wm.jepa_loss(model, params, wm.init_target(params), x, mask, vicreg_on="visible")


def test_without_expander_vicreg_terms_act_on_the_representations():
  model = wm.JEPAWorldModel(
      embed_dim=16,
      num_layers=1,
      num_heads=2,
      mlp_dim=32,
      predictor_dim=16,
      predictor_heads=2,
      predictor_mlp_dim=32,
      expander_dims=(),
  )
  _, x, mask, _ = _setup()
  params = nn.unbox(jax.jit(model.init)(_key(2), x, mask)["params"])
  assert "expander" not in params
  _, aux = jax.jit(lambda p: wm.jepa_loss(model, p, wm.init_target(p), x, mask, vicreg_on="all"))(
      params
  )
  np.testing.assert_array_equal(aux["embeddings"], aux["context"])
  var, cov = wm.variance_covariance(jnp.asarray(aux["context"]).reshape(-1, 16))
  np.testing.assert_allclose([aux["variance"], aux["covariance"]], [var, cov], rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="mask_ratio"):
    wm.span_mask(_key(0), 2, 20, mask_ratio=1.5)
  with pytest.raises(ValueError, match="span_length"):
    wm.span_mask(_key(0), 2, 6, span_length=4)
  with pytest.raises(ValueError, match="branches"):
    wm.vicreg_terms(jnp.ones((3, 2)), jnp.ones((3, 3)))
  model, x, mask, params = _setup()
  with pytest.raises(ValueError, match="feature inputs"):
    jax.eval_shape(lambda: model.apply({"params": params}, x[..., 0], mask))
  with pytest.raises(ValueError, match="mask must be"):
    jax.eval_shape(lambda: model.apply({"params": params}, x, mask[:, :5]))
