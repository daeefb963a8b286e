"""HybridJEPA: EMA target encoder update, sown VICReg/JEPA loss, gradients, eval path, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models.hybrid import HybridLM
from nexus_jax.models.hybrid_jepa import HybridJEPA

SMALL = dict(
    vocab_size=32,
    d_model=16,
    num_heads=2,
    num_blocks=1,
    layers_per_block=2,
    attention_index=1,
    ssm_state_dim=4,
    ssm_scan_method="sequential",
)


def test_ema_target_sown_loss_and_gradients():
  model = HybridJEPA(lm=HybridLM(**SMALL), weight=0.5, horizon=2, ema_decay=0.9)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 10)), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), tokens)
  params = jax.tree.map(
      lambda x: getattr(x, "value", x), variables["params"], is_leaf=lambda x: hasattr(x, "value")
  )
  target0 = jax.tree.map(
      lambda x: getattr(x, "value", x),
      variables["jepa_target"]["params"],
      is_leaf=lambda x: hasattr(x, "value"),
  )
  jax.tree.map(np.testing.assert_array_equal, target0, params["lm"])  # a copy at init
  target0 = jax.tree.map(lambda t: t + 1.0, target0)

  def loss(p):
    (_, aux), new = model.apply(
        {"params": p, "jepa_target": {"params": target0}},
        tokens,
        deterministic=False,
        mutable=["jepa_target", "aux_loss"],
    )
    return new["aux_loss"]["jepa"][0], (aux, new)

  (sown, (aux, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  expected = 0.5 * (
      25 * aux["jepa_invariance"] + 25 * aux["jepa_variance"] + aux["jepa_covariance"]
  )
  np.testing.assert_allclose(sown, expected, rtol=1e-5)
  assert float(aux["jepa_invariance"]) > 0
  # EMA: 0.9 * (online + 1) + 0.1 * online = online + 0.9, leaf by leaf.
  jax.tree.map(
      lambda t, o: np.testing.assert_allclose(t, o + 0.9, atol=1e-5),
      new["jepa_target"]["params"],
      params["lm"],
  )
  assert float(jnp.abs(grads["predictor"]["wo"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["lm"]["embed"]["embedding"]).sum()) > 0

  # Evaluation (deterministic): plain LM logits, nothing sown, target untouched.
  (logits, _), state = model.apply(
      {"params": params, "jepa_target": {"params": target0}},
      tokens,
      mutable=["jepa_target", "aux_loss"],
  )
  lm_logits, _ = HybridLM(**SMALL).apply({"params": params["lm"]}, tokens)
  np.testing.assert_allclose(logits, lm_logits, atol=1e-6)
  assert "aux_loss" not in state


def test_bad_settings_fail_clearly():
  tokens = jnp.zeros((1, 6), jnp.int32)
  for kw, match in [
      (dict(horizon=6), "horizon"),
      (dict(weight=0.0), "weight"),
      (dict(ema_decay=1.0), "ema_decay"),
  ]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda: HybridJEPA(lm=HybridLM(**SMALL), **kw).init(jax.random.key(0), tokens))
