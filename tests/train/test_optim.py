"""Learning-rate schedules against their formulas; weight-decay mask; optimizer variants."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nexus_jax.train.optim import build_optimizer, learning_rate_schedule, weight_decay_mask


def optim_config(**kw):
  c = ml_collections.ConfigDict(
      dict(
          name="adamw",
          learning_rate=1e-2,
          warmup_steps=10,
          schedule="cosine",
          end_factor=0.1,
          weight_decay=0.1,
          clip_norm=0.0,
          grad_accum_steps=1,
          b1=0.9,
          b2=0.999,
          momentum=0.9,
      )
  )
  c.update(kw)
  return c


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_matches_formula(kind):
  peak, warm, total, end = 1e-2, 10, 110, 0.1
  sched = learning_rate_schedule(optim_config(schedule=kind), total)
  for step in [0, 5, 10, 35, 60, 109, 110]:
    if step < warm:
      expected = peak * step / warm
    elif kind == "constant":
      expected = peak
    else:
      frac = (step - warm) / (total - warm)
      if kind == "linear":
        expected = peak + (peak * end - peak) * frac
      else:
        expected = peak * end + (peak - peak * end) * 0.5 * (1 + math.cos(math.pi * frac))
    np.testing.assert_allclose(
        float(sched(step)), expected, rtol=1e-5, atol=1e-9, err_msg=f"{kind} @ {step}"
    )


def test_unknown_schedule_and_optimizer_name_the_field():
  with pytest.raises(ValueError, match="config.optim.schedule"):
    learning_rate_schedule(optim_config(schedule="cosin"), 100)
  with pytest.raises(ValueError, match="config.optim.name"):
    build_optimizer(optim_config(name="adam_w"), 100)


def test_weight_decay_mask_skips_norms_biases_embeddings():
  params = {
      "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
      "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
      "token_embed": {"embedding": jnp.ones((10, 4))},
      "block": {
          "attn": {"query": {"kernel": jnp.ones((4, 2, 2))}},
          "rms_norm": {"scale": jnp.ones(4)},
      },
      "tabnet": {"cat_embedding_0": jnp.ones((5, 3)), "step1_bn0": {"scale": jnp.ones(3)}},
      "tokenizer": {
          "plr_bias": jnp.ones((3, 4)),
          "plr_weight": jnp.ones((3, 8, 4)),
          "missing": jnp.ones((3, 4)),
      },
  }
  mask = weight_decay_mask(params)
  assert mask["Dense_0"] == {"kernel": True, "bias": False}
  assert mask["LayerNorm_0"] == {"scale": False, "bias": False}
  assert mask["token_embed"] == {"embedding": False}
  assert mask["block"]["attn"]["query"]["kernel"] is True
  assert mask["block"]["rms_norm"]["scale"] is False
  assert mask["tabnet"] == {"cat_embedding_0": False, "step1_bn0": {"scale": False}}
  assert mask["tokenizer"] == {"plr_bias": False, "plr_weight": True, "missing": False}


def test_weight_decay_applies_only_where_masked():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx, _ = build_optimizer(
      optim_config(
          name="sgd",
          momentum=0.0,
          warmup_steps=0,
          schedule="constant",
          learning_rate=0.1,
          weight_decay=0.5,
      ),
      10,
  )
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_each_optimizer_minimises_a_quadratic(name):
  tx, _ = build_optimizer(
      optim_config(
          name=name,
          learning_rate=0.05,
          warmup_steps=0,
          schedule="constant",
          weight_decay=0.0,
          clip_norm=1.0,
      ),
      200,
  )
  params = {"w": jnp.array([3.0, -2.0])}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2)
  for _ in range(200):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.05


def test_gradient_accumulation_averages_micro_batches():
  tx, _ = build_optimizer(
      optim_config(
          name="sgd",
          momentum=0.0,
          warmup_steps=0,
          schedule="constant",
          learning_rate=1.0,
          weight_decay=0.0,
          grad_accum_steps=2,
      ),
      10,
  )
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.array([1.0])}, state, params)
  np.testing.assert_allclose(u1["w"], 0.0)  # no update mid-accumulation
  u2, state = tx.update({"w": jnp.array([3.0])}, state, params)
  np.testing.assert_allclose(u2["w"], -2.0)  # mean of the two micro-batch gradients


def _sgd(**kw):
  return optim_config(
      name="sgd",
      momentum=0.0,
      warmup_steps=0,
      schedule="constant",
      learning_rate=1.0,
      weight_decay=0.0,
      **kw,
  )


def test_ewc_fields_chain_the_penalty_before_the_optimizer(tmp_path):
  from nexus_jax.train.ewc import consolidated, find_ewc_state, save_ewc_prior

  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
  grads = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([-0.3])}
  plain, _ = build_optimizer(_sgd(), 10)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  tx, _ = build_optimizer(_sgd(ewc_lambda=2.0), 10)
  state = tx.init(params)
  u, _ = tx.update(grads, state, params)  # Fisher 0 before anything is consolidated
  jax.tree.map(np.testing.assert_allclose, u, u_plain)
  # A consolidated prior (anchor theta*, Fisher F) saved by one run starts the next run's state.
  anchor = {"w": jnp.array([0.0, 0.0]), "b": jnp.array([1.5])}
  fisher = {"w": jnp.array([1.0, 3.0]), "b": jnp.array([2.0])}
  merged = consolidated(find_ewc_state(state), anchor, fisher)
  path = save_ewc_prior(tmp_path / "prior.npz", merged)
  tx, _ = build_optimizer(_sgd(ewc_lambda=2.0, ewc_prior=str(path)), 10)
  state = tx.init(params)
  assert int(find_ewc_state(state).num_tasks) == 1
  u, _ = tx.update(grads, state, params)
  want = jax.tree.map(lambda g, f, p, a: -(g + 2.0 * f * (p - a)), grads, fisher, params, anchor)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, want)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(ewc_lambda=-1.0), "config.optim.ewc_lambda"),
        (dict(ewc_lambda=float("nan")), "config.optim.ewc_lambda"),
        (dict(ewc_lambda=1.0, ewc_gamma=1.5), "config.optim.ewc_gamma"),
        (dict(ewc_lambda=1.0, ewc_gamma=-0.1), "config.optim.ewc_gamma"),
        (dict(ewc_lambda=0.0, ewc_prior="x.npz"), "config.optim.ewc_prior"),
        (dict(ewc_lambda=1.0, ewc_prior="/nonexistent/x.npz"), "config.optim.ewc_prior"),
    ],
)
def test_bad_ewc_fields_raise_naming_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    build_optimizer(_sgd(**fields), 10)


def test_ewc_prior_must_fit_the_params(tmp_path):
  from nexus_jax.train.ewc import ewc, find_ewc_state, save_ewc_prior

  state = ewc(1.0).init({"w": jnp.zeros(2)})
  path = save_ewc_prior(tmp_path / "p.npz", find_ewc_state(state))
  tx, _ = build_optimizer(_sgd(ewc_lambda=1.0, ewc_prior=str(path)), 10)
  with pytest.raises(ValueError, match="shape"):
    tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="missing"):
    tx.init({"v": jnp.zeros(2)})
