"""The runner: config overrides, clear errors for bad fields / types / experiments / workdirs."""

import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from experiments.registry import get_experiment
from experiments.run import check_config_overrides, prepare_workdir

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tabular.py")


def parse(*overrides):
  argv = ["prog", f"--config={CONFIG}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_nested_override_is_applied():
  config = parse("--config.train.early_stopping.patience=7", "--config.optim.name=lion")
  assert config.train.early_stopping.patience == 7 and config.optim.name == "lion"
  assert config.train.batch_size == parse().train.batch_size


def test_wrong_type_fails_naming_the_flag():
  with pytest.raises(flags.IllegalFlagValueError, match="config.train.batch_size"):
    parse("--config.train.batch_size=abc")


def test_misspelt_field_fails_naming_it():
  with pytest.raises(
      SystemExit, match=r"config.train has no field 'batch_sise'. Did you mean train.batch_size"
  ):
    check_config_overrides([f"--config={CONFIG}", "--config.train.batch_sise=3"])
  with pytest.raises(SystemExit, match=r"config has no field 'trian'"):
    check_config_overrides(["--config", CONFIG, "--config.trian.batch_size=3"])
  check_config_overrides([f"--config={CONFIG}", "--config.train.batch_size=3"])  # valid: no error


def test_misspelt_field_from_the_command_line():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.run", f"--config={CONFIG}", "--config.model.encodr=mlp"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0
  assert "config.model has no field 'encodr'. Did you mean model.encoders?" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_unknown_experiment_lists_known_ones():
  with pytest.raises(
      ValueError, match=r"config.experiment='tabularr' is not a known experiment.*'tabular'"
  ):
    get_experiment("tabularr")


def test_unwritable_workdir_fails_clearly(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(SystemExit, match=r"--workdir .*a_file/run cannot be written"):
    prepare_workdir(blocker / "run")
