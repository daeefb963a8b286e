"""Orbax checkpoints: the latest N plus the caller's best step, atomic, checked before restore.

Layout: `workdir/checkpoints/<step>/{state, meta}`. `state` holds the TrainState arrays (Orbax
StandardSave; no pickle), `meta` is JSON: the loop's host state (early stopping, epoch), the
validation metrics of that step and a fingerprint of the parameter shapes. Orbax writes each step
to a temporary folder and renames it when complete, so a crash never leaves a half checkpoint
that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import sys
import traceback
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(RuntimeError):
  """A checkpoint folder cannot be used for this run (corrupted, or written by another model).

  For an unreadable checkpoint, `.original` holds the storage library's own exception (for
  debugging; it is not chained, so the user sees one short message).
  """

  original: BaseException | None = None


# Loggers that print internal errors and tracebacks while Orbax / tensorstore fail to read a folder.
_LIBRARY_LOGGERS = ("absl", "asyncio", "orbax")


def _is_stale_loop_callback(unraisable: Any) -> bool:
  """An array read that finished after Orbax closed its event loop (harmless, nothing to report)."""
  tb = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
  return (
      unraisable.exc_type is RuntimeError
      and str(unraisable.exc_value) == "Event loop is closed"
      and any(frame.name == "call_soon_threadsafe" for frame in tb)
  )


class _DropStaleLoopCallbacks:
  """`sys.unraisablehook` that drops `_is_stale_loop_callback` errors and forwards the rest."""

  def __init__(self, previous: Callable[[Any], Any]):
    self.previous = previous

  def __call__(self, unraisable: Any) -> None:
    if not _is_stale_loop_callback(unraisable):
      self.previous(unraisable)


@contextlib.contextmanager
def _quiet_library_errors():
  """Keeps a failing Orbax restore from printing library-internal errors and tracebacks.

  Orbax's (absl) and asyncio's loggers are raised to CRITICAL for the duration. When a restore
  fails, the array reads still in flight finish on tensorstore threads after Orbax has closed its
  event loop and each reports "RuntimeError: Event loop is closed" through `sys.unraisablehook`
  (dozens of tracebacks on stderr); a hook that drops exactly those is installed for the
  duration, and left in place after a failure (the reads may finish later). The library's own
  error stays available as `CheckpointError.original`.
  """
  loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  previous_hook = sys.unraisablehook
  if not isinstance(previous_hook, _DropStaleLoopCallbacks):
    sys.unraisablehook = _DropStaleLoopCallbacks(previous_hook)
  failed = True
  try:
    yield
    failed = False
  finally:
    if not failed:
      sys.unraisablehook = previous_hook
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def fingerprint(params: Any) -> dict[str, str]:
  """{"path/to/param": "float32[3,4]"} for every parameter leaf (works on abstract arrays)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
      jax.tree_util.keystr(path): f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
      for path, leaf in flat
  }


def _describe_mismatch(saved: dict[str, str], current: dict[str, str]) -> str:
  missing = sorted(set(current) - set(saved))
  extra = sorted(set(saved) - set(current))
  changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
  parts = []
  if changed:
    parts.append(
        "shape/dtype differs for "
        + ", ".join(f"{k} ({saved[k]} saved, {current[k]} now)" for k in changed[:5])
    )
  if missing:
    parts.append(f"{len(missing)} params not in the checkpoint, e.g. {missing[:3]}")
  if extra:
    parts.append(f"{len(extra)} checkpoint params unknown to this model, e.g. {extra[:3]}")
  return "; ".join(parts)


@dataclasses.dataclass
class _KeepStep:
  """Orbax preservation policy: keeps the checkpoint of `step` (the loop's best step), if any."""

  step: int | None = None

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    return [self.step is not None and int(c.step) == self.step for c in checkpoints]


class Checkpointer:
  """Keeps the latest `keep` checkpoints and the one the caller names as best.

  There is one source of truth for "the best checkpoint": the caller (the training loop's early
  stopping) passes `best_step` to every `save`, and exactly that step is preserved besides the
  latest ones, ties included. The checkpointer never ranks metrics itself.

  Args:
    directory: checkpoint folder (created if missing).
    keep: how many of the most recent checkpoints to keep.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._best = _KeepStep()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(
            [policies.LatestN(n=max(int(keep), 1)), self._best]
        ),
        enable_async_checkpointing=False,
        create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as err:
      raise CheckpointError(
          f"cannot create or write checkpoint folder {self.directory}: {err}"
      ) from err

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
      self,
      state: Any,
      meta: dict[str, Any],
      metrics: dict[str, float] | None = None,
      best_step: int | None = None,
  ) -> None:
    """Writes the checkpoint of `state.step`; keeps the latest `keep` and `best_step` (if any).

    `best_step` is the caller's best step so far (it may be this step); every other step older
    than the latest `keep` is deleted.
    """
    step = int(jax.device_get(state.step))
    meta = {**meta, "step": step, "fingerprint": fingerprint(state.params)}
    if metrics is not None:
      meta["metrics"] = {k: float(v) for k, v in metrics.items()}
    self._best.step = None if best_step is None else int(best_step)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    self._manager.wait_until_finished()

  def _restore(self, step: int, args: Any) -> Any:
    """`manager.restore`, with a short CheckpointError (original error as `.original`)."""
    if step not in self.all_steps():
      raise CheckpointError(
          f"checkpoint step {step} is not in {self.directory} (it holds steps "
          f"{sorted(self.all_steps())})."
      )
    try:
      with _quiet_library_errors():
        return self._manager.restore(step, args=args)
    except Exception as err:  # Orbax raises many types for unreadable folders.
      reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
      if len(reason) > 60:
        reason = reason[:57] + "..."
      error = CheckpointError(
          f"checkpoint {self.directory / str(step)} is corrupted or unreadable ({reason}).\n"
          "Left untouched: delete it to resume from the previous checkpoint, or use a fresh "
          "--workdir."
      )
      error.original = err
    raise error from None

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON meta of `step`; CheckpointError (short, naming the folder) if unreadable."""
    restored = self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure/shardings of `abstract_state`; returns (state, meta).

    Raises CheckpointError (naming the folder, one or two short lines; the library's own error is
    kept as `.original`) if the checkpoint is unreadable or was written by a model with different
    parameters; nothing on disk is changed.
    """
    meta = self.read_meta(step)
    current = fingerprint(abstract_state.params)
    saved = meta.get("fingerprint")
    if saved != current:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} was written by a different model "
          f"({_describe_mismatch(saved or {}, current)}). It was not overwritten; use a fresh "
          f"--workdir or the config that wrote it."
      )
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        _arrays(abstract_state),
    )
    restored = self._restore(step, ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    arrays = restored["state"]
    state = abstract_state.replace(
        step=arrays["step"],
        params=arrays["params"],
        opt_state=arrays["opt_state"],
        rng=arrays["rng"],
        extra=arrays["extra"],
    )
    return state, meta

  def close(self) -> None:
    self._manager.close()


def _arrays(state: Any) -> dict[str, Any]:
  return {
      "step": state.step,
      "params": state.params,
      "opt_state": state.opt_state,
      "rng": state.rng,
      "extra": state.extra,
  }
