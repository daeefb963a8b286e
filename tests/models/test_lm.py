"""MoE LanguageModel: presets, active parameters vs the dense equivalent, sown aux losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models.lm import (
    PRESETS,
    LanguageModel,
    active_params,
    count_params,
    dense_equivalent,
)

TOKENS = jnp.zeros((2, 8), jnp.int32)


def _shapes(model):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS)["params"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_dense_equivalent_matches_active_params(preset):
  model = LanguageModel.from_preset(preset, vocab_size=256)
  params = _shapes(model)
  dense = dense_equivalent(model)
  assert dense.num_experts == 0 and dense.mlp_dim == model.mlp_dim * model.moe_top_k
  active, total, dense_total = (
      active_params(model, params),
      count_params(params),
      count_params(_shapes(dense)),
  )
  router = model.num_layers * model.embed_dim * model.num_experts
  assert active < total and active - dense_total == router
  assert model.num_heads % model.num_kv_heads == 0 and model.num_kv_heads < model.num_heads


def test_forward_returns_logits_moe_statistics_and_sows_aux_losses():
  model = LanguageModel.from_preset("tiny", vocab_size=32, embed_dim=16, mlp_dim=16)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 6), 0, 32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  (logits, aux), sown = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["aux_loss"]))(
      params, tokens
  )
  assert logits.shape == (2, 6, 32) and np.isfinite(logits).all()
  load = aux["moe"]["expert_load"]
  assert load.shape == (model.num_layers, model.num_experts)
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
  from nexus_jax.train.steps import collect_aux_losses

  losses = collect_aux_losses(sown["aux_loss"])
  assert {"load_balance", "router_z"} <= set(losses) and all(v > 0 for v in losses.values())


def test_lm_config_errors():
  with pytest.raises(ValueError, match="unknown LanguageModel preset 'huge'"):
    LanguageModel.from_preset("huge")
  with pytest.raises(ValueError, match="needs head='lm'"):
    jax.eval_shape(
        LanguageModel(head="regression", num_outputs=1).init, jax.random.PRNGKey(0), TOKENS
    )
