"""Encoder registry: built-in encoders, per-table choice from the config, kwargs checks, logical axes."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import pytest

from nexus_jax.models.tabular import registry
from nexus_jax.models.tabular.ft_transformer import FTTransformer
from nexus_jax.models.tabular.lean_mlp import LeanMLP
from nexus_jax.models.tabular.mlp import MLP, ResNetMLP, TabM
from nexus_jax.models.tabular.set_encoder import StandardEncoder
from nexus_jax.models.tabular.tabnet import TabNet


def test_builtin_encoders_registered():
  expected = {
      "ft_transformer": FTTransformer,
      "tabnet": TabNet,
      "tabm": TabM,
      "mlp": MLP,
      "resnet": ResNetMLP,
      "standard": StandardEncoder,
      "lean_mlp": LeanMLP,
  }
  for name, cls in expected.items():
    assert registry.get_encoder(name) is cls
    assert cls.pools_rows is (name == "standard")
  assert set(expected) <= set(registry.encoder_names())


def test_registry_alone_registers_every_builtin_encoder():
  """No encoder depends on another module's import side effect: a fresh interpreter that imports only
  the registry sees them all (lean_mlp included)."""
  code = (
      "import sys; from nexus_jax.models.tabular import registry; "
      "assert 'nexus_jax.models.tabular.nexus_former' not in sys.modules; "
      "print(','.join(registry.encoder_names()))"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  names = proc.stdout.strip().split(",")
  assert {"lean_mlp", "mlp", "ft_transformer", "tabnet", "tabm", "resnet", "standard"} <= set(names)


def test_encoder_kwargs_checks_and_normalises():
  assert registry.encoder_fields("lean_mlp") == ("d_embedding", "d_layers", "dropout")
  assert registry.encoder_kwargs("lean_mlp", {"d_layers": [8, 4], "dropout": 0.1}) == {
      "d_layers": (8, 4),
      "dropout": 0.1,
  }
  assert registry.encoder_kwargs("mlp", None) == {}
  with pytest.raises(
      ValueError,
      match=r"^where: encoder 'lean_mlp' \(LeanMLP\) has no hyperparameter\(s\) \['d_layer', "
      r"'num_numeric'\]; it accepts: d_embedding, d_layers, dropout\.$",
  ):
    registry.encoder_kwargs("lean_mlp", {"d_layer": (8,), "num_numeric": 3}, "where")
  with pytest.raises(KeyError, match="unknown encoder 'nope'"):
    registry.encoder_kwargs("nope", {})


def test_unknown_encoder_error_lists_known_names():
  with pytest.raises(KeyError, match=r"unknown encoder 'xgboost'.*ft_transformer.*tabnet"):
    registry.get_encoder("xgboost")


def test_register_custom_encoder_and_duplicates():
  class Tiny(nn.Module):

    @nn.compact
    def __call__(self, x_num, x_cat, num_missing=None, row_mask=None, *, deterministic=True):
      return x_num, {}

  try:
    assert registry.register_encoder("tiny_test", Tiny) is Tiny
    assert registry.get_encoder("tiny_test") is Tiny
    registry.register_encoder("tiny_test", Tiny)  # same class again is fine
    with pytest.raises(ValueError, match="already registered"):
      registry.register_encoder("tiny_test", MLP)
    registry.register_encoder("tiny_test", MLP, overwrite=True)
    assert registry.get_encoder("tiny_test") is MLP
    with pytest.raises(TypeError, match="Module subclass"):
      registry.register_encoder("not_a_module", dict)
  finally:
    registry._ENCODERS.pop("tiny_test", None)


@pytest.mark.parametrize("make", [dict, ml_collections.ConfigDict])
def test_encoder_for_table(make):
  cfg = make({"default": "ft_transformer", "planes": "tabnet"})
  assert registry.encoder_for_table(cfg, "planes") == "tabnet"
  assert registry.encoder_for_table(cfg, "weather") == "ft_transformer"
  with pytest.raises(
      KeyError, match=r"encoders\.weather = 'gbdt' \(table 'weather'\).*known encoders"
  ):
    registry.encoder_for_table(make({"default": "mlp", "weather": "gbdt"}), "weather")
  with pytest.raises(
      KeyError, match=r"no encoder configured for table 'airports'.*encoders\.default"
  ):
    registry.encoder_for_table(make({"planes": "tabnet"}), "airports")


@pytest.mark.parametrize(
    "name", ["ft_transformer", "tabnet", "tabm", "mlp", "resnet", "standard", "lean_mlp"]
)
def test_every_param_has_distinct_logical_axis_names(name):
  """All params are boxed with logical names (for train/sharding.py), none repeats a name."""
  import jax

  cls = registry.get_encoder(name)
  small = {
      "ft_transformer": dict(n_blocks=1, d_token=8, n_heads=2),
      "tabnet": dict(n_steps=1),
      "tabm": dict(k=2, d_block=8),
      "mlp": dict(d_layers=(8,)),
      "resnet": dict(d_main=8),
      "standard": dict(d_model=8, n_heads=2),
      "lean_mlp": dict(d_layers=(8,)),
  }[name]
  model = cls(num_numeric=2, cat_cardinalities=(4,), d_out=4, **small)
  shape = (3, 2, 2) if cls.pools_rows else (3, 2)
  x_num, x_cat = jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:-1] + (1,), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x_num, x_cat))
  leaves = jax.tree_util.tree_leaves(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)
  for p in leaves:
    names = [n for n in p.names if n is not None]
    assert len(names) == len(set(names)) and len(p.names) == len(p.value.shape), p.names
