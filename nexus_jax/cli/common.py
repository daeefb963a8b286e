"""What the console scripts share: one-line errors, the argument parser, output-folder checks.

    parser = Parser(prog="nexusflow", description=..., epilog="example: ...")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)   # subcommands use it too
    return run_main("nexusflow", lambda: run(parser.parse_args(argv)))  # -> exit code

Exit codes: 0 success (and `--help`), 2 refused input (a usage error, or input the library refused
with an error naming the culprit), 130 interrupted. Every refusal is ONE line on stderr,
``<prog>: <message>`` for usage errors (unknown subcommand or flag, with a "did you mean") and
``<prog>: error: <message>`` for the rest; ``NEXUS_DEBUG=1`` re-raises instead, with the traceback.
Exceptions that are not input errors (bugs) keep their traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import sys
import textwrap
from typing import Any, Callable, Iterable, Sequence

EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
  """Input a command refuses; its message (one line) names the culprit."""


class UsageError(CommandError):
  """A malformed command line (unknown subcommand or flag, bad combination of flags)."""


def one_line(text: Any) -> str:
  """`text` with its line breaks and runs of spaces collapsed."""
  return " ".join(str(text).split())


def did_you_mean(word: str, choices: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
  close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def input_errors() -> tuple[type[BaseException], ...]:
  """The exceptions that mean "bad input" (their messages name the culprit)."""
  from nexus_jax.train.checkpoint import CheckpointError  # imports jax: only when needed

  return (CommandError, ValueError, OSError, CheckpointError, FloatingPointError)


class HelpFormatter(argparse.HelpFormatter):
  """Wraps each line of a description on its own; keeps indented lines (examples) as written."""

  def _fill_text(self, text: str, width: int, indent: str) -> str:
    out = []
    for line in text.splitlines():
      if line.startswith("  ") or not line.strip():
        out.append(indent + line)
      else:
        out.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
    return "\n".join(out)


class Parser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors are one line and exit 2 (see the module docstring).

  An unknown subcommand reads ``unknown subcommand 'trian' (did you mean 'train'?)``; an unknown
  flag names the subcommand and the closest flag it has. Abbreviated flags are not accepted.
  Descriptions and epilogs keep their line breaks (so examples print as written). A subcommand
  made with ``add_help=False`` (one that forwards its flags, like ``train``) still prints its help
  for ``-h`` / ``--help``. Errors exit (SystemExit(2)) like argparse's, so a parser used outside
  `run_main` behaves the same.
  """

  def __init__(self, *args: Any, **kwargs: Any):
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    self.fail(f"{self.prog}: {message}")

  @staticmethod
  def fail(message: str):
    if os.environ.get("NEXUS_DEBUG"):
      raise UsageError(one_line(message))
    print(one_line(message), file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)

  def _check_value(self, action: argparse.Action, value: Any) -> None:
    if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
      self.fail(
          f"{self.prog}: unknown subcommand {value!r}{did_you_mean(value, action.choices)}; "
          f"choose one of {', '.join(action.choices)}"
      )
    super()._check_value(action, value)

  def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):
    # An unknown flag is named before argparse's "required" check would hide it (leaf parsers).
    forwards = not self.add_help or any(
        isinstance(a, argparse._SubParsersAction) for a in self._actions
    )
    if not forwards:
      for arg in sys.argv[1:] if args is None else args:
        if arg == "--":
          break
        flag = str(arg).split("=", 1)[0]
        if flag.startswith("--") and flag not in self._option_string_actions:
          options = [o for a in self._actions for o in a.option_strings]
          self.fail(f"{self.prog}: unknown flag {flag!r}{did_you_mean(flag, options)}")
    return super().parse_known_args(args, namespace)

  def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
    ns, extras = self.parse_known_args(args, namespace)
    if extras:
      parser = self._selected(ns)
      if not parser.add_help and ("-h" in extras or "--help" in extras):
        parser.print_help()
        raise SystemExit(0)
      first = extras[0]
      if first.startswith("-"):
        flag = first.split("=", 1)[0]
        options = [o for a in parser._actions for o in a.option_strings]
        self.fail(f"{parser.prog}: unknown flag {flag!r}{did_you_mean(flag, options)}")
      self.fail(f"{parser.prog}: unexpected argument {first!r}")
    return ns

  def _selected(self, ns: Any) -> argparse.ArgumentParser:
    """The (sub)parser that the parsed subcommand names: the innermost one."""
    for action in self._actions:
      if isinstance(action, argparse._SubParsersAction):
        chosen = action.choices.get(getattr(ns, action.dest, None) or "")
        if chosen is not None:
          return chosen._selected(ns) if isinstance(chosen, Parser) else chosen
    return self


def run_main(prog: str, fn: Callable[[], int | None]) -> int:
  """Runs a command; returns its exit code, turning refused input into one line on stderr."""
  try:
    code = fn()
  except SystemExit as exc:  # argparse --help (0), a runner message (str)
    if exc.code is None or isinstance(exc.code, int):
      return int(exc.code or 0)
    if os.environ.get("NEXUS_DEBUG"):
      raise
    message = one_line(exc.code)
    print(message if message.startswith(prog) else f"{prog}: {message}", file=sys.stderr)
    return EXIT_REFUSED
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except input_errors() as err:
    if os.environ.get("NEXUS_DEBUG"):
      raise
    if isinstance(err, UsageError):
      print(one_line(err), file=sys.stderr)
    else:
      print(f"{prog}: error: {one_line(err) or type(err).__name__}", file=sys.stderr)
    return EXIT_REFUSED
  return int(code or 0)


def packaged_config(name: str) -> pathlib.Path:
  """The config file `name` (e.g. "tabular.py") of the installed `configs` package.

  `configs` is a namespace package (no __init__.py, so no `__file__`): its `__path__` is searched.
  """
  import configs

  folders = [pathlib.Path(p) for p in getattr(configs, "__path__", [])]
  for folder in folders:
    if (folder / name).is_file():
      return (folder / name).resolve()
  raise CommandError(
      f"packaged config {name!r} not found in {[str(f) for f in folders] or 'the configs package'}"
  )


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool,
    is_ours: Callable[[pathlib.Path], bool],
    kind: str,
    flag: str = "--output",
    inputs: Sequence[str | os.PathLike] = (),
) -> pathlib.Path:
  """Where a command may write folder `path`: a new or empty folder; with `overwrite`, also one
  that holds a previous `kind` (`is_ours`). Never one of `inputs` (or inside / around one), never
  a file, never the working directory. Raises CommandError naming `flag`; nothing is touched.
  """
  out = pathlib.Path(path).absolute()
  if out.exists() and not out.is_dir():
    raise CommandError(f"{flag} {path} is a file; give a new folder")
  cwd = pathlib.Path.cwd().absolute()
  if out == cwd or out in cwd.parents:
    raise CommandError(f"{flag} {path} is the working directory (or holds it); give a new folder")
  for given in inputs:
    src = pathlib.Path(given).absolute()
    if out == src or src in out.parents or out in src.parents:
      raise CommandError(
          f"{flag} {path} overlaps the input {given}; inputs are never modified, give a new folder"
      )
  if out.is_dir() and any(out.iterdir()):
    if not overwrite:
      raise CommandError(
          f"{flag} {path} already exists; choose a new folder, or pass --overwrite to replace a "
          f"previous {kind}"
      )
    if not is_ours(out):
      raise CommandError(
          f"{flag} {path} exists and does not hold a previous {kind}; it was left untouched "
          "(--overwrite "
          f"only replaces a previous {kind})"
      )
  if not out.parent.is_dir():
    raise CommandError(f"{flag} {path}: folder {out.parent} does not exist")
  return out


def format_bytes(n: int | float) -> str:
  """1500 -> '1.5 kB' (decimal units, like --target-size-mb; exact byte counts go in JSON)."""
  n = float(n)
  for unit in ("B", "kB", "MB"):
    if abs(n) < 1000:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} GB"
