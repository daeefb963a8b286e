"""apply_preset: `--config.preset=full` for the timeseries and seq2seq experiments."""

import importlib.util
import pathlib

import pytest

from experiments import seq2seq, timeseries
from nexus_jax.train.presets import apply_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name, module", [("timeseries", timeseries), ("seq2seq", seq2seq)])
def test_full_preset_replaces_its_fields_and_default_changes_nothing(name, module):
  config = load_config(name)
  assert config.preset == "default"
  assert apply_preset(config, module.PRESETS).to_dict() == config.to_dict()
  config.preset = "full"
  full = apply_preset(config, module.PRESETS)
  for path, value in module.PRESETS["full"].items():
    section, field = path.split(".")
    assert full[section][field] == value != config[section][field]
  assert (
      full.train.batch_size == config.train.batch_size
  )  # fields the preset does not name are kept


def test_unknown_preset_and_missing_field_name_the_problem():
  config = load_config("timeseries")
  config.preset = "huge"
  with pytest.raises(
      ValueError, match=r"config.preset='huge' is unknown; choose one of \['default', 'full'\]"
  ):
    apply_preset(config, timeseries.PRESETS)
  config.preset = "full"
  with pytest.raises(ValueError, match=r"sets config.model.widht, which this config does not have"):
    apply_preset(config, {"full": {"model.widht": 3}})
  with pytest.raises(ValueError, match=r"sets config.modle.width"):
    apply_preset(config, {"full": {"modle.width": 3}})
