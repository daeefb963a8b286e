"""`train.compute_dtype` reaches every sequence experiment's model: with "bfloat16" the
activations are bfloat16 while the params stay float32 (the lm experiment is also run in bfloat16
end to end in test_lm.py)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from experiments import hybrid as hybrid_experiment
from experiments import seq2seq as seq2seq_experiment
from experiments import timeseries as timeseries_experiment
from nexus_jax.models.lm import lm_from_config
from nexus_jax.train.config import compute_dtype

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(name):
  spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _models(dtype):
  """(model, example inputs) built the way each experiment builds its model."""
  lm_mc = _config("lm").model
  lm_mc.update(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16)
  hy = _config("hybrid")
  hy.model.update(d_model=16, num_heads=2, num_blocks=1, layers_per_block=2, ssm_state_dim=4)
  s2s = _config("seq2seq").model
  s2s.update(num_encoder_layers=1, num_decoder_layers=1, embed_dim=16, num_heads=2, mlp_dim=16)
  ts = _config("timeseries").model
  ts.update(num_encoder_layers=1, num_decoder_layers=1, embed_dim=16, num_heads=2, mlp_dim=16)
  tokens = jnp.ones((2, 8), jnp.int32)
  feats = jnp.ones((2, 8, 3), jnp.float32)
  return {
      "lm": (lm_from_config(lm_mc, 256, dtype), (tokens,)),
      "hybrid": (hybrid_experiment.build_model(hy.model, hy.jepa, 8, 256, dtype)[0], (tokens,)),
      "seq2seq": (seq2seq_experiment.build_model(s2s, dtype), (tokens, tokens)),
      "timeseries": (timeseries_experiment.build_model(ts, 3, dtype), (feats, feats)),
  }


WIDTH = 16  # every model above is 16 wide


def _dtypes(model, inputs):
  """(param dtypes, dtypes of the hidden states [..., T, WIDTH] that the model's modules output);
  the aux statistics and the final logits are float32 by design and not counted."""
  variables = model.init(jax.random.PRNGKey(0), *inputs)
  _, state = model.apply(variables, *inputs, capture_intermediates=True, mutable=["intermediates"])
  hidden = [
      x.dtype
      for x in jax.tree.leaves(state["intermediates"])
      if x.ndim >= 3 and x.shape[-1] == WIDTH
  ]
  return {x.dtype for x in jax.tree.leaves(variables["params"])}, hidden


@pytest.mark.parametrize("experiment", ["lm", "hybrid", "seq2seq", "timeseries"])
def test_bfloat16_activations_with_float32_params(experiment):
  model, inputs = _models(compute_dtype("bfloat16"))[experiment]
  params, hidden = _dtypes(model, inputs)
  assert params == {jnp.dtype("float32")}
  assert len(hidden) >= 3 and set(hidden) == {jnp.dtype("bfloat16")}
  model, inputs = _models(compute_dtype("float32"))[experiment]
  params, hidden = _dtypes(model, inputs)
  assert params == {jnp.dtype("float32")} and set(hidden) == {jnp.dtype("float32")}


def test_an_unknown_compute_dtype_is_named():
  with pytest.raises(ValueError, match="config.train.compute_dtype='float16'"):
    compute_dtype("float16")
