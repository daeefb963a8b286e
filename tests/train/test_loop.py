"""Training loop: resume equals uninterrupted, early stopping + best checkpoint, NaN, bad checkpoints."""

import json
import logging
import math
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.testing import toy_objective, toy_regression_data
from nexus_jax.train.checkpoint import CheckpointError
from nexus_jax.train.config import base_config
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import NonFiniteLossError, UntrainedError, fit, restore_best
from nexus_jax.train.metrics import EarlyStopping, read_metrics
from nexus_jax.train.steps import Objective

BATCH = 16


def config(**train):
  c = base_config()
  c.train.batch_size = BATCH
  c.train.num_epochs = 3
  c.train.log_every_steps = 4
  c.train.progress = False
  c.train.tensorboard = False
  c.optim.warmup_steps = 5
  c.train.update(train)
  return c


def datasets(n=128):
  return ArrayDataset(toy_regression_data(n), BATCH, seed=0), ArrayDataset(
      toy_regression_data(48, seed=1), BATCH
  )


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loss_decreases_and_aux_losses_are_logged_separately(tmp_path):
  train, valid = datasets(256)
  c = config(num_epochs=8)
  c.optim.learning_rate = 1e-2
  result = fit(toy_objective(dropout=0.0), train, valid, c, tmp_path)
  losses = [h["loss"] for h in result.history]
  assert losses[-1] < 0.6 * losses[0]
  rows = read_metrics(tmp_path, "train")
  assert all("aux/toy_l2" in r and r["total_loss"] > r["loss"] for r in rows)
  assert all(
      k in rows[0]
      for k in ("grad_norm", "param_norm", "update_norm", "learning_rate", "rows_per_second")
  )


def test_bfloat16_compute_trains_with_float32_params(tmp_path):
  import jax.numpy as jnp

  train, valid = datasets(256)
  c = config(num_epochs=6)
  c.optim.learning_rate = 1e-2
  result = fit(toy_objective(dropout=0.0, dtype=jnp.bfloat16), train, valid, c, tmp_path)
  losses = [h["loss"] for h in result.history]
  assert losses[-1] < 0.6 * losses[0]
  assert {x.dtype for x in jax.tree.leaves(result.state.params)} == {jnp.dtype("float32")}


def test_interrupted_run_resumes_to_identical_params(tmp_path):
  train, valid = datasets()
  full = fit(toy_objective(batch_norm=True), train, valid, config(), tmp_path / "full")
  part = fit(
      toy_objective(batch_norm=True),
      train,
      valid,
      config(stop_after_steps=11),
      tmp_path / "resumed",
  )
  assert part.steps_run == 11
  rest = fit(toy_objective(batch_norm=True), train, valid, config(), tmp_path / "resumed")
  assert rest.steps_run == full.steps_run - 11
  for a, b in zip(
      leaves(full.state.params) + leaves(full.state.extra),
      leaves(rest.state.params) + leaves(rest.state.extra),
  ):
    np.testing.assert_array_equal(a, b)
  # Rerunning a finished workdir trains nothing more.
  again = fit(toy_objective(batch_norm=True), train, valid, config(), tmp_path / "resumed")
  assert again.steps_run == 0


def test_early_stopping_on_a_scripted_metric_sequence():
  stopper = EarlyStopping(metric="auc", mode="max", patience=2)
  scripted = [0.60, 0.65, 0.64, 0.66, 0.655, 0.65, 0.70]
  stop_at = next(step for step, v in enumerate(scripted) if stopper.update(step, {"auc": v}))
  assert stop_at == 5  # two evaluations without beating 0.66
  assert stopper.best_step == 3 and stopper.best_value == 0.66
  with pytest.raises(KeyError, match="early stopping metric 'loss'"):
    EarlyStopping(metric="loss").update(0, {"auc": 0.5})


def test_early_stopping_ties_keep_the_first_best_and_nan_at_first_falls_back_to_loss():
  stopper = EarlyStopping(metric="auc", mode="max")
  for step, v in enumerate([0.8, 0.9, 0.9, 0.85, 0.9]):
    stopper.update(step, {"auc": v, "loss": 1.0})
  assert stopper.best_step == 1 and stopper.bad_evals == 3
  stopper = EarlyStopping(metric="auc", mode="max", patience=2)
  with pytest.warns(RuntimeWarning, match=r"'auc' is nan.*validation 'loss' \(min\)"):
    stopper.update(4, {"auc": math.nan, "loss": 0.5})
  stopper.update(8, {"auc": math.nan, "loss": 0.4})
  assert (stopper.metric, stopper.mode, stopper.best_step, stopper.best_value) == (
      "loss",
      "min",
      8,
      0.4,
  )
  resumed = EarlyStopping(metric="auc", mode="max", patience=2)  # a resumed run, same config
  resumed.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
  assert (resumed.metric, resumed.mode, resumed.best_step) == ("loss", "min", 8)


def scripted_objective(values):
  """The toy objective whose validation "score" is the next of `values` at each evaluation."""
  scripted = iter(values)
  base = toy_objective()
  return Objective(
      model=base.model,
      loss=base.loss,
      inputs=base.inputs,
      host_metrics=lambda preds, arrays: {"score": next(scripted)},
  )


# Scores at evaluation steps 4, 8, ..., 24 with ties at the best value; the first of the ties wins.
TIES = {
    "first": ([0.9, 0.5, 0.9, 0.6, 0.9, 0.7], 4),
    "middle": ([0.5, 0.6, 0.9, 0.9, 0.7, 0.9], 12),
    "last": ([0.5, 0.6, 0.7, 0.8, 0.9, 0.9], 20),
}


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("ties", sorted(TIES))
def test_restores_exactly_the_checkpoint_early_stopping_chose_on_ties(tmp_path, ties, mode, keep):
  values, best = TIES[ties]
  sign = 1.0 if mode == "max" else -1.0
  objective = scripted_objective([sign * v for v in values])  # shared by both calls
  train, valid = datasets(64)  # 4 steps per epoch, one evaluation per epoch
  c = config(num_epochs=6, checkpoint_keep=keep, stop_after_steps=10)
  c.train.early_stopping.update(metric="score", mode=mode, patience=0)
  part = fit(objective, train, valid, c, tmp_path)  # interrupted after evaluations 4 and 8
  assert part.steps_run == 10
  c.train.stop_after_steps = 0
  result = fit(objective, train, valid, c, tmp_path)  # resumed to the end
  assert [h["step"] for h in result.history] == [12, 16, 20, 24]
  assert result.best_step == best and result.best_metrics["score"] == sign * 0.9
  assert set(result.checkpointer.all_steps()) == {best, *range(24, 24 - 4 * keep, -4)}
  assert int(restore_best(result).step) == best
  assert result.early_stopping == ("score", mode)
  again = fit(objective, train, valid, c, tmp_path)  # a finished run reopens cleanly
  assert again.steps_run == 0 and again.best_step == best
  assert int(restore_best(again).step) == best


def test_selection_metric_that_is_nan_on_validation_falls_back_to_loss(tmp_path):
  base = toy_objective()
  objective = Objective(
      model=base.model,
      loss=base.loss,
      inputs=base.inputs,
      host_metrics=lambda preds, arrays: {"auc": float("nan")},  # e.g. a one-class validation split
  )
  train, valid = datasets(64)
  c = config(num_epochs=4)
  c.optim.learning_rate = 1e-2
  c.train.early_stopping.update(metric="auc", mode="max", patience=0)
  with pytest.warns(RuntimeWarning, match="validation metric 'auc' is nan"):
    result = fit(objective, train, valid, c, tmp_path)
  losses = {h["step"]: h["loss"] for h in result.history}
  assert result.early_stopping == ("loss", "min")
  assert result.best_step == min(losses, key=losses.get)
  assert result.best_metrics["loss"] == pytest.approx(losses[result.best_step])
  assert int(restore_best(result).step) == result.best_step


def test_fit_stops_early_and_keeps_the_best_checkpoint(tmp_path):
  scripted = iter([0.50, 0.70, 0.60, 0.65, 0.55, 0.90, 0.91])
  base = toy_objective()
  objective = Objective(
      model=base.model,
      loss=base.loss,
      inputs=base.inputs,
      host_metrics=lambda preds, arrays: {"score": next(scripted)},
  )
  train, valid = datasets(64)  # 4 steps per epoch, one evaluation per epoch
  c = config(num_epochs=10, checkpoint_keep=1)
  c.train.early_stopping.update(metric="score", mode="max", patience=3)
  result = fit(objective, train, valid, c, tmp_path)
  assert result.stopped_early and [h["step"] for h in result.history] == [4, 8, 12, 16, 20]
  assert result.best_step == 8 and result.best_metrics["score"] == 0.70
  assert set(result.checkpointer.all_steps()) == {8, 20}  # best + latest
  best = restore_best(result)
  assert int(best.step) == 8
  assert not all(
      np.array_equal(a, b) for a, b in zip(leaves(best.params), leaves(result.state.params))
  )


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
  clean = toy_regression_data(64)
  poisoned = {k: v.copy() for k, v in clean.items()}
  poisoned["x"][7] = 1e6  # the model outputs NaN on this row
  valid = ArrayDataset(toy_regression_data(32, seed=1), BATCH)
  objective = toy_objective(nan_after=1e3)
  fit(objective, ArrayDataset(clean, BATCH), valid, config(num_epochs=1), tmp_path)
  with pytest.raises(NonFiniteLossError, match=r"non-finite.*last good checkpoint \(step 4\)"):
    fit(objective, ArrayDataset(poisoned, BATCH), valid, config(num_epochs=3), tmp_path)
  result = fit(objective, ArrayDataset(clean, BATCH), valid, config(num_epochs=1), tmp_path)
  assert result.steps_run == 0 and int(result.state.step) == 4
  assert all(np.isfinite(x).all() for x in leaves(result.state.params))


def test_checkpoint_from_another_model_is_refused_and_untouched(tmp_path):
  train, valid = datasets(32)
  fit(toy_objective(hidden=16), train, valid, config(num_epochs=1), tmp_path)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(CheckpointError, match=r"different model.*hidden|different model.*Dense_0"):
    fit(toy_objective(hidden=32), train, valid, config(num_epochs=2), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("corrupt", ["*", "d/*"])  # every file / only the array data
def test_corrupted_checkpoint_is_named_in_two_short_lines_without_tracebacks(
    tmp_path, capfd, monkeypatch, corrupt
):
  train, valid = datasets(32)
  fit(toy_objective(), train, valid, config(num_epochs=1), tmp_path)
  step_dir = tmp_path / "checkpoints" / "2"
  for f in (step_dir / "state").rglob(corrupt) if corrupt != "*" else step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  capfd.readouterr()
  # What a user's script sees: library loggers printing to stderr, and errors raised where
  # Python cannot propagate them (asyncio callbacks on tensorstore threads) reported too.
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  handler = logging.StreamHandler(sys.stderr)
  logging.getLogger().addHandler(handler)
  try:
    with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupted") as info:
      fit(toy_objective(), train, valid, config(num_epochs=2), tmp_path)
    time.sleep(0.5)  # array reads still in flight when the restore failed finish meanwhile
  finally:
    logging.getLogger().removeHandler(handler)
  assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable]
  message = str(info.value)
  assert len(message) < 300 and len(message.splitlines()) <= 2, message
  assert str(step_dir) in message and "delete" in message
  # Not chained (the user sees one traceback), but kept for debugging.
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert isinstance(info.value.original, Exception)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "ERROR" not in err, err[:2000]
  assert step_dir.exists()


def test_unwritable_workdir_fails_clearly(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  train, valid = datasets(32)
  with pytest.raises((OSError, CheckpointError)):
    fit(toy_objective(), train, valid, config(num_epochs=1), blocker / "run")


def test_empty_dataset_is_rejected():
  with pytest.raises(ValueError, match="empty"):
    ArrayDataset({"x": np.zeros((0, 3)), "y": np.zeros(0)}, 4)


class ConstantGradient(nn.Module):
  """outputs = w for every row; with the loss sum(w * c) every gradient is exactly c."""

  @nn.compact
  def __call__(self, x, train=False):
    w = self.param("w", nn.initializers.zeros, (4,))
    return jnp.broadcast_to(w, (x.shape[0], 4))


GRADIENT = np.array([3.0, 0.0, -4.0, 0.0], np.float32)  # norm 5


def test_logged_learning_rate_is_the_one_applied_under_gradient_accumulation(tmp_path):
  objective = Objective(
      model=ConstantGradient(),
      loss=lambda out, batch: (jnp.mean(jnp.sum(out * GRADIENT, -1)), {}),
      inputs=lambda batch, train: {"x": batch["x"]},
  )
  c = config(num_steps=24, log_every_steps=1)
  c.optim.update(
      name="sgd",
      momentum=0.0,
      weight_decay=0.0,
      clip_norm=0.0,
      learning_rate=0.1,
      warmup_steps=3,
      schedule="cosine",
      end_factor=0.0,
      grad_accum_steps=3,
  )
  train, _ = datasets(64)
  fit(objective, train, None, c, tmp_path)
  rows = {r["step"]: r for r in read_metrics(tmp_path, "train")}
  assert sorted(rows) == list(range(1, 25))
  # The optax schedule counts the 24 / 3 = 8 optimizer updates (3 of warmup, 5 of decay).
  updates = optax.join_schedules(
      [optax.linear_schedule(0.0, 0.1, 3), optax.cosine_decay_schedule(0.1, 5)], boundaries=[3]
  )
  for micro in range(24):  # micro-step `micro` is logged as step micro + 1
    lr = float(updates(micro // 3))
    row = rows[micro + 1]
    assert row["learning_rate"] == pytest.approx(lr, rel=1e-5, abs=1e-9), micro
    # The update applied at the end of each window is lr * mean gradient (norm 5); 0 before.
    applied = lr * 5.0 if micro % 3 == 2 else 0.0
    assert row["update_norm"] == pytest.approx(applied, rel=1e-4, abs=1e-7), micro


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("optim.learning_rate", float("nan"), "config.optim.learning_rate=nan"),
        ("optim.learning_rate", -1e-3, "config.optim.learning_rate=-0.001"),
        ("train.batch_size", 0, "config.train.batch_size=0"),
        ("train.num_epochs", 0, "nothing would be trained"),
        ("optim.grad_accum_steps", 0, "config.optim.grad_accum_steps=0"),
    ],
)
def test_invalid_settings_fail_before_anything_is_built(tmp_path, field, value, match):
  c = config()
  section, name = field.split(".")
  c[section][name] = value
  train, valid = datasets(32)
  with pytest.raises(ValueError, match=match):
    fit(toy_objective(), train, valid, c, tmp_path)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(num_steps=1, warmup_steps=5), r"learning rate would be 0.*optim.warmup_steps=5"),
        (dict(num_steps=2, warmup_steps=0, grad_accum_steps=4), "optim.grad_accum_steps=4"),
    ],
)
def test_a_run_whose_learning_rate_is_always_zero_is_refused(tmp_path, settings, match):
  c = config(num_steps=settings.pop("num_steps"))
  c.optim.update(settings)
  train, valid = datasets(32)
  with pytest.raises(UntrainedError, match=match):
    fit(toy_objective(), train, valid, c, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
  assert issubclass(UntrainedError, ValueError)
