"""MoE LanguageModel: presets (counts from eval_shape = the analytic formula), active parameters
vs the dense equivalent, sown aux losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models import decoding
from nexus_jax.models.lm import (
    PRESETS,
    LanguageModel,
    active_params,
    analytic_param_counts,
    count_params,
    dense_equivalent,
    preset_param_counts,
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


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_counts_from_eval_shape_equal_the_analytic_formula(preset):
  counts = preset_param_counts(preset)
  assert counts == analytic_param_counts(LanguageModel.from_preset(preset))
  assert 0 < counts["active"] < counts["total"]


@pytest.mark.parametrize("preset, target", [("3b", 3e9), ("7b", 7e9), ("13b", 13e9)])
def test_neuralflex_presets_follow_the_seed_spec(preset, target):
  model = LanguageModel.from_preset(preset)
  spec = (model.embed_dim, model.num_heads, model.num_kv_heads, model.num_experts, model.moe_top_k)
  assert spec == (2048, 32, 8, 16, 2)
  assert model.vocab_size == 65_536 and model.max_len == 32_768
  assert abs(preset_param_counts(preset)["total"] - target) / target < 0.01
  with pytest.raises(ValueError, match="cache_len 32769 exceeds the model's max_len 32768"):
    decoding.init_cache(model, 1, 32_769)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=0),
        dict(tie_embeddings=True, qk_norm=True, norm="layer", activation="gelu"),
        dict(moe_every=2, num_layers=4, share_layers=True),
        dict(moe_every=2, num_layers=4, position_embedding="learned", max_len=16),
        dict(norm="adaptive_rms", condition_dim=3, head_dim=8, num_kv_heads=1),
        dict(norm_placement="post", use_final_norm=False, moe_top_k=1),
    ],
)
def test_analytic_formula_covers_the_options(overrides):
  model = LanguageModel.from_preset("tiny", vocab_size=32, **overrides)
  kw = {"condition": jnp.zeros((2, 3))} if model.adaptive_norm else {}
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS, **kw)["params"]
  expected = {"total": count_params(shapes), "active": active_params(model, shapes)}
  assert analytic_param_counts(model) == expected


def test_lm_config_reaches_positions_and_final_norm():
  import importlib.util
  import pathlib

  import jax
  import jax.numpy as jnp

  from nexus_jax.models.lm import lm_from_config

  root = pathlib.Path(__file__).resolve().parents[2]
  spec = importlib.util.spec_from_file_location("lm_config", root / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  mc = module.get_config().model
  mc.update(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16)
  default = lm_from_config(mc)
  mc.update(position_embedding="learned", max_len=64, use_final_norm=False)
  learned = lm_from_config(mc)
  assert (default.position_embedding, default.max_len) == ("rope", 0)
  assert (learned.position_embedding, learned.max_len, learned.use_final_norm) == (
      "learned",
      64,
      False,
  )
  tokens = jnp.zeros((1, 8), jnp.int32)
  paths = lambda m: {  # noqa: E731
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(
          jax.eval_shape(m.init, jax.random.PRNGKey(0), tokens)["params"]
      )[0]
  }
  added, removed = paths(learned) - paths(default), paths(default) - paths(learned)
  assert any("position" in p for p in added)  # the learned table
  assert removed and all("norm" in p for p in removed)  # no final norm


def test_lm_config_moe_top_p_routes_by_probability_mass():
  import importlib.util
  import pathlib

  from nexus_jax.models.lm import lm_from_config

  root = pathlib.Path(__file__).resolve().parents[2]
  spec = importlib.util.spec_from_file_location("lm_config", root / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  mc = module.get_config().model
  mc.update(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16, moe_top_k=4)
  assert lm_from_config(mc).moe_top_p is None  # 0.0: top-k routing
  mc.update(moe_top_p=0.3)
  model = lm_from_config(mc)
  assert model.moe_top_p == 0.3
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
  params = model.init(jax.random.PRNGKey(0), tokens)
  _, aux = model.apply(params, tokens)
  used = float(aux["moe"]["experts_per_token"].mean())
  assert 1.0 <= used < 4.0  # fewer than top_k=4 experts: the mass 0.3 is reached earlier
