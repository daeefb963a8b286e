"""The tabular config and its presets (resolved at run time; command-line values win)."""

import importlib.util
import pathlib

import pytest

from nexus_jax.nexusflow.config import PRESETS, apply_preset, tabular_config
from nexus_jax.train.presets import get_path

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_config_file_is_the_shared_quick_config():
  spec = importlib.util.spec_from_file_location("tabular_config", ROOT / "configs" / "tabular.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.to_dict() == tabular_config().to_dict()
  assert c.model.name == "nexus_former" and c.preset == "quick" and c.experiment == "tabular"


def test_full_preset_changes_only_fields_at_their_quick_default():
  c = tabular_config()
  c.preset = "full"
  c.train.num_epochs = 3  # as if given on the command line
  changed = apply_preset(c)
  assert c.train.num_epochs == 3 and "train.num_epochs" not in changed
  for path, value in PRESETS["full"].items():
    if path != "train.num_epochs":
      assert get_path(c, path) == value and path in changed
  quick = tabular_config()
  assert apply_preset(quick) == {} and quick.to_dict() == tabular_config().to_dict()


def test_unknown_preset_names_the_field():
  c = tabular_config()
  c.preset = "huge"
  with pytest.raises(ValueError, match="config.preset='huge'"):
    apply_preset(c)


def test_preset_paths_exist():
  c = tabular_config()
  for path in PRESETS["full"]:
    get_path(c, path)
