"""Anytime LM objective: per-layer logits through the shared head (last layer == the model's
logits, layer l == an l-layer model with the same first l blocks), the CALM-weighted loss against
a numpy hand computation, the training-loop objective and bad inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.models import anytime
from nexus_jax.models.lm import LanguageModel
from nexus_jax.models.transformer import Decoder
from nexus_jax.train.state import TrainState
from nexus_jax.train.steps import make_eval_step, make_train_step

V = 11


def _model(**kw):
  base = dict(num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32, num_experts=0)
  return LanguageModel(vocab_size=V, **{**base, **kw})


def _tokens(b=2, t=7, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, V)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"scan_layers": False},
        {"tie_embeddings": True},
        pytest.param({"num_experts": 4}, marks=pytest.mark.slow),
    ],
)
def test_last_layer_logits_equal_the_model(kw):
  model, tokens = _model(**kw), _tokens()
  variables = model.init(jax.random.PRNGKey(0), tokens)
  logits, _ = model.apply(variables, tokens)
  states = anytime.layer_states(model, variables, tokens)
  assert states.shape == (3, 2, 7, 16)
  per_layer = anytime.layer_logits(model, variables["params"], states[1:])
  assert per_layer.shape == (2, 2, 7, V)
  np.testing.assert_array_equal(per_layer[-1], logits)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_anytime_loss_equals_a_hand_computation():
  """Layer 1's logits are those of a 1-layer model holding block 0 (same embedding, final norm
  and head); the loss is (1 * CE_1 + 2 * CE_2) / 3 over the weighted tokens, in numpy."""
  model, tokens = _model(scan_layers=False), _tokens()
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  inputs, targets = tokens[:, :-1], np.asarray(tokens[:, 1:])
  weights = np.ones(targets.shape, np.float32)
  weights[1, 3:] = 0.0  # padding: excluded
  one = model.clone(num_layers=1)
  p1 = {**params, "decoder": {"layers_0": params["decoder"]["layers_0"],
                              "final_norm": params["decoder"]["final_norm"]}}  # fmt: skip
  ref_logits = [np.asarray(one.apply({"params": p1}, inputs)[0])]
  ref_logits.append(np.asarray(model.apply({"params": params}, inputs)[0]))

  def ce(logits):
    nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)
    return float((nll[..., 0] * weights).sum() / weights.sum())

  hand = [ce(x) for x in ref_logits]
  states = anytime.layer_states(model, {"params": params}, inputs)
  logits = anytime.layer_logits(model, params, states[1:])
  loss, per_layer = anytime.anytime_loss(logits, jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(per_layer, hand, rtol=1e-5)
  np.testing.assert_allclose(loss, (hand[0] + 2 * hand[1]) / 3, rtol=1e-5)
  np.testing.assert_allclose(anytime.calm_layer_weights(4), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
  # Custom weights are normalised: (1, 0) is layer 1 alone.
  only_first, _ = anytime.anytime_loss(logits, jnp.asarray(targets), jnp.asarray(weights), [1, 0])
  np.testing.assert_allclose(only_first, hand[0], rtol=1e-5)


def test_objective_trains_every_layer_and_reports_the_last():
  model, tokens = _model(), _tokens(b=4, t=9)
  objective = anytime.anytime_lm_objective(model)
  batch = {"tokens": tokens, "weight": jnp.ones((4,), jnp.float32)}
  variables = objective.model.init(jax.random.PRNGKey(0), **objective.inputs(batch, False))
  tx = optax.adam(1e-2)
  state = TrainState.create(
      apply_fn=objective.model.apply, params=variables["params"], tx=tx, rng=jax.random.PRNGKey(1)
  )
  sums, preds = jax.jit(make_eval_step(objective))(state, batch)
  logits, _ = model.apply(variables, tokens[:, :-1])
  full = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  np.testing.assert_allclose(sums["last_layer_loss"] / 4, full, rtol=1e-5)
  np.testing.assert_allclose(sums["bits_per_token"] / 4, full / math.log(2), rtol=1e-5)
  np.testing.assert_array_equal(preds, jnp.argmax(logits, -1))
  step = jax.jit(make_train_step(objective, lambda s: 1e-2))
  first = None
  for _ in range(15):
    state, metrics = step(state, batch)
    first = first if first is not None else metrics
  assert float(metrics["loss"]) < float(first["loss"])
  assert float(metrics["bits_per_token_layer_1"]) < float(first["bits_per_token_layer_1"])


def test_bad_inputs_raise():
  logits = jnp.zeros((2, 1, 3, V))
  with pytest.raises(ValueError, match="layer_weights"):
    anytime.anytime_loss(logits, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)), [1, 2, 3])
  with pytest.raises(ValueError, match="cross_attention"):
    anytime.check_supported(Decoder(vocab_size=V, cross_attention=True))
  with pytest.raises(ValueError, match="moe_every"):
    anytime.anytime_lm_objective(_model(num_layers=2, num_experts=2, moe_every=2))


@pytest.mark.slow
def test_lm_experiment_with_the_anytime_switch(tmp_path):
  """configs/lm.py with `model.anytime_loss=True`: trains, logs per-layer bits and scores the
  test bytes with the last layer."""
  import importlib.util
  import json
  import pathlib

  from experiments.run import run_experiment
  from nexus_jax.train.metrics import read_metrics

  root = pathlib.Path(__file__).resolve().parents[2]
  spec = importlib.util.spec_from_file_location("lm_config", root / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.update(seq_len=32, valid_bytes=2048, test_bytes=4096)
  c.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=32)
  c.model.update(num_experts=0, train_dense_baseline=False, anytime_loss=True)
  c.train.update(batch_size=8, num_steps=20, eval_every_steps=10, log_every_steps=5)
  c.train.update(progress=False, tensorboard=False)
  c.optim.warmup_steps = 2
  c.sample.num_bytes = 8
  run_experiment(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert 0 < saved["test_bits_per_byte"]["moe"] < 8.0
  rows = read_metrics(tmp_path / "moe", "valid")
  assert rows and {"bits_per_token_layer_1", "bits_per_token_layer_2"} <= set(rows[-1])
