"""Training loop: resume equals uninterrupted, early stopping + best checkpoint, NaN, bad checkpoints."""

import json
import pathlib

import jax
import numpy as np
import pytest

from nexus_jax.testing import toy_objective, toy_regression_data
from nexus_jax.train.checkpoint import CheckpointError
from nexus_jax.train.config import base_config
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import NonFiniteLossError, fit, restore_best
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


def test_corrupted_checkpoint_is_named_and_left_in_place(tmp_path):
  train, valid = datasets(32)
  fit(toy_objective(), train, valid, config(num_epochs=1), tmp_path)
  step_dir = tmp_path / "checkpoints" / "2"
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupted"):
    fit(toy_objective(), train, valid, config(num_epochs=2), tmp_path)
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
