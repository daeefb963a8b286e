"""`nexusflow` command line without a model: help with examples, one-line refusals with exit code 2
(unknown subcommand / flag, misspelt config field, bad --optimize), the installed console script.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

from nexus_jax.cli import nexusflow
from nexus_jax.cli.common import packaged_config

SUBCOMMANDS = ("train", "predict", "optimize", "package", "serve")


def refused(capsys, argv):
  """(exit code, the stderr line) of `nexusflow argv`; asserts the message is one line."""
  code = nexusflow.main(argv)
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  return code, err.strip()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_shows_an_example(capsys, command):
  assert nexusflow.main([command, "--help"]) == 0
  out = capsys.readouterr().out
  assert "example" in out and f"nexusflow {command}" in out


def test_top_level_help_lists_every_subcommand(capsys):
  assert nexusflow.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "examples:" in out and all(c in out for c in SUBCOMMANDS)
  assert nexusflow.main(["package", "verify", "--help"]) == 0
  assert "example" in capsys.readouterr().out


def test_unknown_subcommand_suggests_the_closest(capsys):
  code, err = refused(capsys, ["trian"])
  assert code == 2
  assert err.startswith("nexusflow: unknown subcommand 'trian' (did you mean 'train'?)")


def test_unknown_flag_names_the_subcommand_and_the_closest_flag(capsys):
  code, err = refused(capsys, ["optimize", "--model", "m", "--outptu", "o"])
  assert (code, err) == (
      2,
      "nexusflow optimize: unknown flag '--outptu' (did you mean '--output'?)",
  )
  code, err = refused(capsys, ["train", "--workdirr", "w"])
  assert code == 2 and "unknown flag '--workdirr' (did you mean '--workdir'?)" in err


def test_bad_choice_and_missing_flags_are_one_line(capsys):
  code, err = refused(capsys, ["package", "--model", "m", "--output", "o", "--target", "edge"])
  assert code == 2 and "--target" in err and "invalid choice: 'edge'" in err
  code, err = refused(capsys, ["optimize", "--model", "m"])
  assert code == 2 and "required" in err and "--output" in err


def test_misspelt_config_field_is_named_before_anything_runs(capsys, tmp_path):
  code, err = refused(
      capsys, ["train", "--config.train.batch_sise=3", "--workdir", str(tmp_path / "w")]
  )
  assert code == 2
  assert "config.train has no field 'batch_sise'. Did you mean train.batch_size?" in err
  assert not (tmp_path / "w").exists()


def test_bad_optimize_choice_and_a_config_without_artifact(capsys, tmp_path):
  code, err = refused(capsys, ["train", "--optimize", "quantisation"])
  assert code == 2 and "(did you mean 'quantization'?)" in err
  argv = ["train", "--optimize=pruning", "--config.eval.save_artifact=False"]
  code, err = refused(capsys, argv + ["--workdir", str(tmp_path / "w")])
  assert code == 2 and "config.eval.save_artifact=False" in err
  assert not (tmp_path / "w").exists()  # refused before training


def test_train_defaults_to_the_packaged_tabular_config():
  from experiments.run import parse_train_args

  args = parse_train_args(
      ["--config.train.num_steps=7", "--workdir", "w"], packaged_config("tabular.py")
  )
  assert args.config.experiment == "tabular" and args.config.train.num_steps == 7
  assert args.explicit == ["train.num_steps"] and str(args.workdir) == "w"
  assert pathlib.Path(args.config_file) == packaged_config("tabular.py")


def test_installed_console_script_runs():
  exe = shutil.which("nexusflow") or str(pathlib.Path(sys.executable).parent / "nexusflow")
  proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "examples:" in proc.stdout
  proc = subprocess.run([exe, "srve"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "(did you mean 'serve'?)" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_serve_without_the_serve_extra_says_what_to_install(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
  code, err = refused(capsys, ["serve", "--model", "any"])
  assert code == 2 and "pip install 'nexus_jax[serve]'" in err
  code, err = refused(capsys, ["serve", "--model", "any", "--port", "70000"])
  assert code == 2 and "--port 70000" in err
