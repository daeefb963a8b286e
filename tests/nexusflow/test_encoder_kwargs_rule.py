"""The config -> encoder kwargs rule (`model_spec.config_encoder_kwargs`) in `nexus_former_spec` and
`flat.build_row_model`: a key the chosen encoder lacks is left out while it holds the library's
default (it serves another encoder kind) and raises, naming the config field, once set on purpose.
"""

from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest

from nexus_jax.nexusflow.config import PRESETS, tabular_config
from nexus_jax.nexusflow.flat import build_row_model
from nexus_jax.nexusflow.model_spec import build_nexus_former, nexus_former_spec

INFO = SimpleNamespace(numeric_names=["a", "b"], categorical_cardinalities=[3])
DATA = SimpleNamespace(
    feature_info=INFO,
    contexts={
        "k->parent": SimpleNamespace(feature_info=INFO, spec=SimpleNamespace(table="parent")),
        "hist.k=k": SimpleNamespace(feature_info=INFO, spec=SimpleNamespace(table="hist")),
    },
)
PRE = SimpleNamespace(get_feature_info=lambda: INFO)


def spec_for(**changes):
  c = tabular_config()
  with c.unlocked():  # encoders.<table> fields are added per schema
    for path, value in changes.items():
      *parents, last = path.split(".")
      node = c.model
      for key in parents:
        node = node[key]
      node[last] = value
  return nexus_former_spec(c.model, DATA, n_outputs=1)


def row_model_for(**changes):
  c = tabular_config()
  c.model.row.update(changes)
  return build_row_model(c, PRE)


def test_default_config_drops_the_plr_defaults_lean_mlp_lacks():
  spec = spec_for()
  assert spec["target_encoder"] == "mlp"
  assert spec["target_encoder_kwargs"] == {
      "d_layers": [128],
      "d_embedding": 8,
      "numeric_embedding": "plr_lite",
      "plr_frequencies": 16,
      "dropout": 0.1,
  }
  for ctx in spec["contexts"]:  # lean_mlp: no numeric_embedding / plr_frequencies
    assert ctx["encoder"] == "lean_mlp"
    assert ctx["encoder_kwargs"] == {"d_layers": [32], "d_embedding": 4, "dropout": 0.0}


def test_other_encoder_kind_keeps_only_what_it_accepts_and_builds():
  spec = spec_for(**{"encoders.target": "ft_transformer", "encoders.hist": "mlp"})
  assert spec["target_encoder_kwargs"] == {"numeric_embedding": "plr_lite"}
  by_name = {c["name"]: c for c in spec["contexts"]}
  assert by_name["hist.k=k"]["encoder_kwargs"]["plr_frequencies"] == 16
  assert "plr_frequencies" not in by_name["k->parent"]["encoder_kwargs"]
  model = build_nexus_former(spec)  # the strict model accepts every kwargs dict of the spec

  def rows(lead):
    return {
        "numeric": np.zeros(lead + (2,), np.float32),
        "numeric_missing": np.zeros(lead + (2,), bool),
        "categorical": np.zeros(lead + (1,), np.int32),
    }

  ctx = {**rows((2, 3)), "mask": np.ones((2, 3), bool), "ages": np.zeros((2, 3), np.float32)}
  contexts = {"k->parent": ctx, "hist.k=k": ctx}
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), rows((2,)), contexts)))
  assert "block0" in params["params"]["target_encoder"]  # an FT-Transformer


def test_preset_values_count_as_library_defaults():
  full = PRESETS["full"]["model.target_encoder_kwargs.d_layers"]
  spec = spec_for(
      **{"encoders.target": "ft_transformer", "target_encoder_kwargs.d_layers": tuple(full)}
  )
  assert "d_layers" not in spec["target_encoder_kwargs"]


def test_explicit_setting_the_encoder_lacks_names_the_config_field():
  with pytest.raises(
      ValueError,
      match=r"config\.model\.context_encoder_kwargs\.plr_frequencies = 8, but encoder 'lean_mlp' "
      r"has no 'plr_frequencies'; it accepts: d_embedding, d_layers, dropout\.",
  ):
    spec_for(**{"context_encoder_kwargs.plr_frequencies": 8})
  with pytest.raises(ValueError, match=r"config\.model\.target_encoder_kwargs\.d_layers"):
    spec_for(**{"encoders.target": "ft_transformer", "target_encoder_kwargs.d_layers": (7,)})


def test_row_model_keeps_defaults_for_other_encoders_and_refuses_explicit_ones():
  assert row_model_for().encoder_kwargs == {
      "d_embedding": 16,
      "numeric_embedding": "plr",
      "dropout": 0.1,
      "d_layers": [256, 256],
  }
  assert row_model_for(encoder="ft_transformer").encoder_kwargs == {"numeric_embedding": "plr"}
  assert row_model_for(encoder="tabnet").encoder_kwargs == {}
  with pytest.raises(
      ValueError,
      match=r"config\.model\.row\.numeric_embedding = 'linear', but encoder 'lean_mlp' has no "
      r"'numeric_embedding'; it accepts: d_embedding, d_layers, dropout\.",
  ):
    row_model_for(encoder="lean_mlp", numeric_embedding="linear")
