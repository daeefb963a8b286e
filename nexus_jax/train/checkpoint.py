"""Orbax checkpoints: latest N plus the best, atomic, checked against the model before restore.

Layout: `workdir/checkpoints/<step>/{state, meta}`. `state` holds the TrainState arrays (Orbax
StandardSave; no pickle), `meta` is JSON: the loop's host state (early stopping, epoch), the
validation metrics of that step and a fingerprint of the parameter shapes. Orbax writes each step
to a temporary folder and renames it when complete, so a crash never leaves a half checkpoint
that looks finished.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(RuntimeError):
  """A checkpoint folder cannot be used for this run (corrupted, or written by another model)."""


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


class Checkpointer:
  """Keeps the latest `keep` checkpoints and the best one by `best_metric`.

  Args:
    directory: checkpoint folder (created if missing).
    keep: how many of the most recent checkpoints to keep.
    best_metric / best_mode: validation metric (name in the `metrics` passed to `save`) and
      "max" | "min"; the best checkpoint is kept in addition to the latest ones.
  """

  def __init__(
      self,
      directory: str | pathlib.Path,
      keep: int = 2,
      best_metric: str | None = None,
      best_mode: str = "min",
  ):
    self.directory = pathlib.Path(directory).absolute()
    preserve: list[Any] = [policies.LatestN(n=max(int(keep), 1))]
    if best_metric:
      preserve.append(
          policies.BestN(
              get_metric_fn=lambda m: m[best_metric],
              reverse=best_mode == "min",
              n=1,
              keep_checkpoints_without_metrics=False,
          )
      )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve),
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

  def save(self, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    step = int(jax.device_get(state.step))
    meta = {**meta, "step": step, "fingerprint": fingerprint(state.params)}
    if metrics is not None:
      meta["metrics"] = {k: float(v) for k, v in metrics.items()}
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)
        ),
        metrics=None if metrics is None else meta["metrics"],
        force=True,
    )
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as err:  # Orbax raises many types for unreadable folders.
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} is corrupted or unreadable ({type(err).__name__}: "
          f"{err}). It was left untouched; delete it or use a fresh --workdir."
      ) from err
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure/shardings of `abstract_state`; returns (state, meta).

    Raises CheckpointError (naming the folder) if the checkpoint is unreadable or was written by
    a model with different parameters; nothing on disk is changed.
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
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )
    except Exception as err:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} is corrupted or unreadable ({type(err).__name__}: "
          f"{err}). It was left untouched; delete it or use a fresh --workdir."
      ) from err
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
