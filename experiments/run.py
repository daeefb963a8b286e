"""Entry point: `python -m experiments.run --config configs/tabular.py [--config.a.b=v ...] [--workdir DIR]`.

Parses flags, picks the experiment named by `config.experiment` and calls its `run(config, workdir)`.
All logic lives in the library so a notebook can call the same function (`run_experiment`).

The console scripts run the same command as a function, on their own argument list (the process's
absl flags are untouched):

    results = train_command(["--config.train.num_steps=300", "--workdir", "runs/lm"],
                            default_config="<installed configs>/lm.py")   # `nexus-lm train ...`
    args = parse_train_args(argv, default_config)   # parsed + checked, nothing run yet
    results = run_train_args(args)                  # {"workdir": ..., **the experiment's results}

Both paths parse `--config FILE[:arg]`, `--config.a.b=v` / `--noconfig.a.b` overrides and
`--workdir DIR` the same way, fail on a misspelt field naming it (`check_config_overrides`), resolve
the config file's presets without touching the fields set on the command line, and turn the
library's errors into one line (`NEXUS_DEBUG=1` re-raises them, with the traceback).

Across processes (README "Many hosts") every process runs the same command with its own
`--config.distributed.process_id` (or `--config.distributed.auto=True` on a SLURM / Open MPI
cluster or a TPU pod slice); `run_experiment` starts `jax.distributed` first, and only process 0
writes config.json and prints the results.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import json
import os
import pathlib
import sys
from types import ModuleType
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.registry import get_experiment
from nexus_jax.train import distributed
from nexus_jax.train.checkpoint import CheckpointError
from nexus_jax.train.presets import resolve_preset

_CONFIG_HELP = (
    "Experiment config file, e.g. configs/tabular.py. Override fields with --config.a.b=v."
)
_WORKDIR_HELP = (
    "Output folder (checkpoints, metrics, results). Default: a fresh folder under runs/. "
    "Rerunning with the same folder resumes training."
)
_CONFIG = config_flags.DEFINE_config_file("config", None, _CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, _WORKDIR_HELP)
flags.mark_flag_as_required("config")
TRAIN_FLAGS = ("--config", "--workdir")


def default_workdir(config_path: str) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return pathlib.Path("runs") / f"{pathlib.Path(config_path).stem}-{stamp}"


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` and checks it is writable; a clear error otherwise."""
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{os.getpid()}"  # one per process: several may share a workdir
    probe.write_text("ok")
    probe.unlink()
  except OSError as err:
    raise SystemExit(
        f"--workdir {path} cannot be written ({err.strerror or err}); choose another folder."
    )
  return path


def load_config_module(file: str | os.PathLike) -> ModuleType:
  """The config file as a module (its `get_config()` and `PRESETS`)."""
  if not os.path.isfile(file):
    raise SystemExit(f"--config {file}: no such config file (see configs/ for the available ones).")
  spec = importlib.util.spec_from_file_location("_nexus_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_experiment(
    config, workdir: str | os.PathLike, config_module: ModuleType | None = None, explicit=()
) -> dict:
  """Resolves `config.preset`, then runs `config.experiment` in `workdir` (created if needed).

  Args:
    config: the experiment config (from the config file's `get_config()`, possibly edited).
    workdir: output folder; rerunning in the same folder resumes.
    config_module: the config file's module; its `PRESETS` and `get_config()` resolve the preset
      (`nexus_jax.train.presets.resolve_preset`). Needed only for a preset other than the default.
    explicit: dotted paths the user set (command-line overrides): the preset never changes them.
  Returns:
    the experiment's results dict (also in `workdir/results.json`).
  """
  experiment = get_experiment(config.experiment)
  if "distributed" in config:
    distributed.initialize(config.distributed)  # before any JAX computation; 1 process: no-op
  if config_module is not None and hasattr(config_module, "PRESETS"):
    changes = resolve_preset(config, config_module.PRESETS, config_module.get_config(), explicit)
    if changes:
      logging.warning("preset %r set %s", config.preset, changes)
  elif config.get("preset") not in (None, "default", "quick"):
    raise ValueError(
        f"config.preset={config.preset!r}: pass the config file's module (config_module=) so its "
        "PRESETS can be resolved"
    )
  workdir = prepare_workdir(workdir)
  if distributed.is_primary():
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  return experiment.run(config, workdir)


def override_paths(argv: list[str]) -> list[str]:
  """The dotted field paths of the `--config.a.b=v` (and `--noconfig.a.b`) flags in `argv`."""
  paths = []
  for raw in argv:
    for prefix in ("--config.", "--noconfig."):
      if raw.startswith(prefix):
        paths.append(raw[len(prefix) :].split("=", 1)[0])
        break
  return paths


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_overrides(argv: list[str]) -> None:
  """Fails at once, naming the field, when a `--config.a.b=v` override names no existing field.

  (ml_collections would raise a bare AttributeError from deep inside flag parsing.)
  """
  path = _config_path(argv)
  if path is None:
    return
  file, _, arg = path.partition(":")
  module = load_config_module(file)
  config = module.get_config(arg) if arg else module.get_config()
  for field in override_paths(argv):
    node, walked = config, []
    for key in field.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = "config." + ".".join(walked) if walked else "config"
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" Did you mean {'.'.join(walked + close)}?" if close else ""
        raise SystemExit(
            f"--config.{field}: {where} has no field {key!r}.{hint} "
            f"Fields of {where}: {', '.join(sorted(keys)) or '(none)'}."
        )
      node, walked = node[key], walked + [key]


@dataclasses.dataclass
class TrainArgs:
  """A parsed, checked training command: what `run_train_args` runs."""

  config: Any  # ml_collections.ConfigDict, overrides applied, preset not yet resolved
  config_file: str  # as given, e.g. "configs/tabular.py" or "configs/lm.py:small"
  module: ModuleType  # the config file as a module (its PRESETS)
  workdir: pathlib.Path
  explicit: list[str]  # dotted paths set on the command line (the preset never changes them)


def train_args(
    config: Any, config_file: str, workdir: str | os.PathLike | None, explicit: list[str]
) -> TrainArgs:
  """Checks `config.experiment`, loads the config module, picks the default workdir."""
  try:
    get_experiment(config.experiment)
  except ValueError as err:
    raise SystemExit(str(err))
  module = load_config_module(config_file.partition(":")[0])
  workdir = pathlib.Path(workdir or default_workdir(config_file))
  return TrainArgs(config, config_file, module, workdir, explicit)


def parse_train_args(argv: list[str], default_config: str | os.PathLike | None = None) -> TrainArgs:
  """Parses a training command line (no program name) like `python -m experiments.run` does.

  Args:
    argv: e.g. ["--config", "configs/tabular.py", "--config.train.num_steps=5", "--workdir", "w"].
    default_config: the config file used when `argv` has no --config (None: --config required).
  Raises:
    SystemExit with a one-line message for a missing config file, a misspelt field, an unknown
    flag, a value of the wrong type or an unknown experiment.
  """
  argv = [str(a) for a in argv]
  if _config_path(argv) is None:
    if default_config is None:
      raise SystemExit("--config FILE is required, e.g. --config configs/tabular.py")
    argv = [f"--config={default_config}", *argv]
  check_config_overrides(argv)
  from nexus_jax.cli.common import did_you_mean, one_line  # noqa: PLC0415 (no cycle at import)

  prog = "train"
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, _CONFIG_HELP, flag_values=fv, lock_config=True, sys_argv=[prog, *argv]
  )
  flags.DEFINE_string("workdir", None, _WORKDIR_HELP, flag_values=fv)
  try:
    rest = fv([prog, *argv])
  except flags.UnrecognizedFlagError as err:
    flag = f"--{err.flagname}"
    raise SystemExit(
        f"unknown flag {flag!r}{did_you_mean(flag, TRAIN_FLAGS)}; training takes --config FILE, "
        "--config.a.b=v overrides and --workdir DIR"
    ) from None
  except flags.Error as err:
    raise SystemExit(one_line(err)) from None
  if len(rest) > 1:
    raise SystemExit(f"unexpected arguments {rest[1:]}; config fields are set as --config.a.b=v")
  config_file = config_flags.get_config_filename(fv["config"])
  return train_args(fv.config, config_file, fv.workdir, override_paths(argv))


def run_train_args(args: TrainArgs) -> dict:
  """Runs a parsed command; returns {"workdir": ..., **results}. One-line SystemExit on the
  library's errors (they name the culprit) unless NEXUS_DEBUG is set."""
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
  try:
    results = run_experiment(args.config, args.workdir, args.module, args.explicit)
  except distributed.LostProcessError:
    _exit_now(1)  # its message is on stderr; the peers' collectives cannot finish
  except (ValueError, CheckpointError, FloatingPointError) as err:  # our errors name the culprit
    if os.environ.get("NEXUS_DEBUG"):
      raise
    if distributed.is_multiprocess():
      print(f"error (process {jax.process_index()}): {err}", file=sys.stderr)
      _exit_now(1)
    raise SystemExit(f"error: {err}") from None
  except BaseException:
    if not distributed.is_multiprocess():
      raise
    import traceback  # noqa: PLC0415

    traceback.print_exc()
    _exit_now(1)
  return {"workdir": str(args.workdir), **results}


def _exit_now(code: int) -> None:
  """Ends a failed process of a multi-process run at once: a normal exit would wait up to
  `distributed.shutdown_timeout_seconds` for peers that are stuck in a collective with it."""
  sys.stdout.flush(), sys.stderr.flush()
  os._exit(code)


def train_command(argv: list[str], default_config: str | os.PathLike | None = None) -> dict:
  """`python -m experiments.run` as a function: parses `argv` (see `parse_train_args`), trains,
  returns {"workdir": ..., **the experiment's results} (also in workdir/results.json)."""
  return run_train_args(parse_train_args(argv, default_config))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(
        f"unexpected arguments {argv[1:]}; config fields are set as --config.a.b=v"
    )
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  args = train_args(_CONFIG.value, config_file, _WORKDIR.value, override_paths(sys.argv[1:]))
  results = run_train_args(args)
  if distributed.is_primary():
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
  check_config_overrides(sys.argv[1:])
  sys.exit(app.run(main))
