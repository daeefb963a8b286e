"""PonderNet head on the LM: halting per token, KV-cache decoding == full forward, expected loss,
the configs/lm.py switch, saving, and the settings it refuses."""

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

from nexus_jax.inference.generate import Sampling, generate
from nexus_jax.models.lm import LanguageModel, lm_from_config
from nexus_jax.models.ponder_lm import ponder_lm_objective
from nexus_jax.models.saving import load_model, save_model

TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 256)


def _model(**kw):
  base = dict(
      vocab_size=256, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=32,
      num_experts=0, ponder_steps=3,
  )  # fmt: skip
  return LanguageModel(**{**base, **kw})


def _varied_params(model, seed=1):
  """Init params with a halting unit that halts tokens at different steps."""
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), TOKENS))["params"]
  halt = params["ponder"]["halt"]
  kernel = 3.0 * jax.random.normal(jax.random.PRNGKey(7), halt["kernel"].shape)
  return {
      **params,
      "ponder": {**params["ponder"], "halt": {"kernel": kernel, "bias": halt["bias"] * 0}},
  }


def test_halting_per_token_sums_to_one_and_logits_are_the_halting_steps():
  model = _model()
  params = _varied_params(model)
  logits, aux = jax.jit(model.apply)({"params": params}, TOKENS)
  p = aux["ponder"]
  assert p["per_step_logits"].shape == (3, 2, 12, 256) and logits.shape == (2, 12, 256)
  np.testing.assert_allclose(np.asarray(p["halting_probs"].sum(0)), 1.0, rtol=1e-6)
  halt = np.asarray(p["halt_step"])
  assert len(np.unique(halt)) > 1, halt  # tokens halt at different depths
  cum = np.cumsum(np.asarray(p["halting_probs"]), 0)
  np.testing.assert_array_equal(halt, (cum >= 0.5).argmax(0) + 1)  # threshold 0.5
  picked = np.take_along_axis(np.asarray(p["per_step_logits"]), (halt - 1)[None, ..., None], 0)
  np.testing.assert_array_equal(np.asarray(logits), picked[0])
  expected = (np.arange(1, 4)[:, None, None] * np.asarray(p["halting_probs"])).sum(0)
  np.testing.assert_allclose(np.asarray(p["expected_steps"]), expected, rtol=1e-5)


def test_cached_decoding_equals_the_full_forward():
  """Every step has its own KV cache; greedy `generate` == argmax of full forwards."""
  model = _model()
  params = _varied_params(model, seed=2)
  prompts = [[5, 17, 99, 3], [42, 7]]
  out = generate(model, params, prompts, max_new_tokens=6, sampling=Sampling(temperature=0.0))
  full = jax.jit(lambda t: model.apply({"params": params}, t)[0])
  width = max(map(len, prompts)) + 6  # right padding never reaches earlier (causal) positions
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(6):
      logits = full(jnp.asarray([seq + [0] * (width - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert out.tokens[row, : out.lengths[row]].tolist() == seq[len(prompt) :]


def test_objective_is_the_expected_loss_and_training_lowers_it():
  model = _model()
  params = _varied_params(model)
  objective = ponder_lm_objective(model)
  batch = {"tokens": TOKENS, "weight": jnp.ones((2,), jnp.float32)}
  outputs, _ = objective.model.apply({"params": params}, **objective.inputs(batch, False))
  loss, metrics = objective.loss(outputs, batch)
  per_step, probs, _ = (np.asarray(o, np.float64) for o in outputs)
  targets = np.asarray(TOKENS[:, 1:])
  logp = per_step - logsumexp(per_step, -1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[None, ..., None], -1)[..., 0]  # [N, B, T]
  np.testing.assert_allclose(float(loss), (probs * nll).sum(0).mean(), rtol=1e-4)
  assert 1.0 <= float(metrics["expected_steps"]) <= 3.0

  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      (outs, _), sown = objective.model.apply(
          {"params": p}, **objective.inputs(batch, True), mutable=["aux_loss"]
      )
      kl = sum(jnp.sum(v) for v in jax.tree.leaves(sown["aux_loss"]))
      return objective.loss(outs, batch)[0] + kl

    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value, grads

  opt = tx.init(params)
  params, opt, first, grads = step(params, opt)
  assert float(jnp.abs(grads["ponder"]["halt"]["kernel"]).max()) > 0  # halting learns
  for _ in range(30):
    params, opt, last, _ = step(params, opt)
  assert float(last) < 0.8 * float(first)


def test_config_switch_builds_it_and_saving_round_trips(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[2]
  spec = importlib.util.spec_from_file_location("lm_config", root / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  mc = module.get_config().model
  mc.update(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16, num_experts=2)
  assert lm_from_config(mc).ponder_steps == 0
  mc.update(ponder_steps=2, ponder_prior=0.3)
  model = lm_from_config(mc)
  assert (model.ponder_steps, model.ponder_prior) == (2, 0.3)
  variables = model.init(jax.random.PRNGKey(0), TOKENS)
  assert "ponder" in variables["params"]
  path = save_model(tmp_path / "ponder", model, variables)
  saved = load_model(path, family="lm")
  assert saved.model.ponder_steps == 2
  a, _ = model.apply(variables, TOKENS)
  b, _ = saved.model.apply(saved.variables, TOKENS)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(ponder_prior=0.0), "ponder_prior"),
        (dict(ponder_threshold=1.5), "ponder_threshold"),
        (dict(ponder_beta=-1.0), "ponder_beta"),
        (dict(ponder_steps=-2), "ponder_steps"),
    ],
)
def test_bad_settings_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    _model(**kw).init(jax.random.PRNGKey(0), TOKENS)


def test_a_non_lm_head_is_refused():
  from nexus_jax.models.transformer import Decoder

  model = Decoder(
      vocab_size=256, num_layers=1, embed_dim=16, num_heads=2, mlp_dim=16, head="classification",
      num_outputs=2, ponder_steps=2,
  )  # fmt: skip
  with pytest.raises(ValueError, match="decoder-only LM"):
    model.init(jax.random.PRNGKey(0), TOKENS)


def test_early_exit_refuses_a_ponder_model():
  from nexus_jax.models.anytime import check_supported

  with pytest.raises(ValueError, match="ponder_steps=0"):
    check_supported(_model())
