"""resolve_preset: the one preset mechanism of every experiment (presets beside get_config())."""

import importlib.util
import pathlib

import pytest

from nexus_jax.train.presets import get_path, resolve_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ("tabular", "lm", "hybrid", "timeseries", "seq2seq")


def load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_holds_presets_beside_get_config(name):
  module = load(name)
  config = module.get_config()
  default = config.preset
  assert module.PRESETS[default] == {} and "full" in module.PRESETS
  assert resolve_preset(config, module.PRESETS, module.get_config()) == {}
  assert config.to_dict() == module.get_config().to_dict()  # the default preset changes nothing
  assert not any(k == "full" for k in config)  # no second mechanism inside the config


@pytest.mark.parametrize("name", CONFIGS)
def test_full_preset_sets_its_fields_and_overrides_win(name):
  module = load(name)
  full = module.PRESETS["full"]
  first = next(iter(full))
  config = module.get_config()
  config.preset = "full"
  changed = resolve_preset(config, module.PRESETS, module.get_config(), explicit={first})
  assert first not in changed and get_path(config, first) == get_path(module.get_config(), first)
  for path, value in full.items():
    if path != first:
      assert changed[path] == value and get_path(config, path) == (
          tuple(value) if isinstance(value, list) else value
      )


def test_a_field_changed_in_python_counts_as_set():
  module = load("timeseries")
  config = module.get_config()
  config.preset = "full"
  config.train.num_steps = 7  # e.g. a notebook edited it; no explicit list needed
  changed = resolve_preset(config, module.PRESETS, module.get_config())
  assert config.train.num_steps == 7 and "train.num_steps" not in changed
  assert config.model.embed_dim == module.PRESETS["full"]["model.embed_dim"]


def test_unknown_preset_and_missing_field_name_the_problem():
  module = load("timeseries")
  config = module.get_config()
  config.preset = "huge"
  with pytest.raises(
      ValueError, match=r"config.preset='huge' is unknown; choose one of \['default', 'full'\]"
  ):
    resolve_preset(config, module.PRESETS, module.get_config())
  config.preset = "full"
  with pytest.raises(ValueError, match=r"sets config.model.widht, which this config does not have"):
    resolve_preset(config, {"full": {"model.widht": 3}}, module.get_config())
  with pytest.raises(ValueError, match=r"sets config.modle.width"):
    resolve_preset(config, {"full": {"modle.width": 3}}, module.get_config())
