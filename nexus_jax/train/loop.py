"""One readable training loop: mesh -> abstract init -> sharded init -> steps -> eval -> checkpoints.

`fit(objective, train_data, valid_data, config, workdir)` trains a Flax model described by an
`Objective` (see `train/steps.py`) and returns a `FitResult`. Rerunning it with the same workdir
resumes from the latest checkpoint and ends with exactly the params of an uninterrupted run
(batches and dropout keys depend only on the seed and the step).

Config fields read (all under `config`):
  seed
  train.batch_size, train.num_epochs, train.num_steps (0: use epochs), train.eval_every_steps
    (0: once per epoch), train.log_every_steps, train.checkpoint_keep, train.stop_after_steps
    (0: off; stop early and checkpoint, as if interrupted), train.progress,
    train.early_stopping.{metric, mode, patience, min_delta}
  optim.*  (see `train/optim.py`)
  mesh.{data, fsdp, tensor, expert}, sharding.logical_axis_rules  (see `train/sharding.py`)

Across processes (`train/distributed.py`, started before `fit`): the mesh spans every process's
devices, each process gathers only its own rows of every batch, evaluation gathers the predictions
on every process, checkpoints are written together (shared workdir), and only process 0 writes
metrics / TensorBoard and shows the progress bar. A lost peer process raises `LostProcessError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nexus_jax.train import distributed
from nexus_jax.train import sharding as sharding_lib
from nexus_jax.train.checkpoint import Checkpointer
from nexus_jax.train.config import validate_train_config
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.metrics import EarlyStopping, MetricWriter
from nexus_jax.train.optim import build_optimizer, learning_rate_schedule
from nexus_jax.train.state import TrainState
from nexus_jax.train.steps import TRANSIENT_COLLECTIONS, Objective, make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf; the last good checkpoint is left in place."""


class UntrainedError(ValueError):
  """The run's learning rate would be 0 on every optimizer update: nothing would be trained."""


@dataclasses.dataclass
class FitResult:
  state: TrainState  # final state (the best checkpoint's params are restored by `restore_best`)
  best_step: int | None
  best_metrics: dict[str, float] | None
  steps_run: int  # steps taken in this call (0 when resuming a finished run)
  train_seconds: float  # wall time of the steps taken in this call
  rows_per_second: float
  # wall time of this call's first train step and first evaluation (blocked): mostly XLA compilation
  compile_seconds: float
  stopped_early: bool
  checkpointer: Checkpointer
  trainer: "Trainer"  # evaluates further splits: `result.trainer.evaluate(state, data)`
  history: list[dict[str, float]]  # validation metrics of this call, with "step"
  # (metric, mode) that selected `best_step`: the configured one, or ("loss", "min") after a
  # fallback because the configured metric could not be computed on the validation rows
  early_stopping: tuple[str, str]


class Trainer:
  """Holds the mesh, the sharded step functions and the checkpointer for one workdir."""

  def __init__(
      self,
      objective: Objective,
      config: Any,
      workdir: str | pathlib.Path,
      total_steps: int,
      example_batch: Any,
      devices: Any = None,
  ):
    self.objective, self.config = objective, config
    self.workdir = pathlib.Path(workdir)
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    self.rules = sharding_lib.logical_axis_rules(config.sharding.get("logical_axis_rules"))
    self.tx, self.schedule = build_optimizer(config.optim, total_steps)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.multiprocess = distributed.is_multiprocess()
    divisor = sharding_lib.batch_divisor(self.mesh)
    if config.train.batch_size % divisor:
      raise ValueError(
          f"config.train.batch_size={config.train.batch_size} must be a multiple of the "
          f"data x fsdp mesh size {divisor}."
      )
    model, inputs = objective.model, objective.inputs
    rng_names = ("params", *objective.rng_names)

    def init_variables(rng):
      rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(rng_names)}
      variables = model.init(rngs, **inputs(example_batch, False))
      return {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}

    def init_state(rng):
      init_rng, state_rng = jax.random.split(rng)
      variables = nn.unbox(init_variables(init_rng))
      params = variables.pop("params")
      return TrainState.create(
          apply_fn=model.apply, params=params, tx=self.tx, rng=state_rng, extra=variables
      )

    with self.context():
      abstract_vars = jax.eval_shape(init_variables, jax.random.PRNGKey(0))
      var_shardings = sharding_lib.logical_shardings(abstract_vars, self.mesh, self.rules)
      param_shardings = var_shardings.pop("params")
      abstract_params = sharding_lib.strip_boxes(abstract_vars)["params"]
      repl = sharding_lib.replicated(self.mesh)
      self.state_shardings = TrainState(
          step=repl,
          params=param_shardings,
          opt_state=sharding_lib.optimizer_shardings(
              self.tx, abstract_params, param_shardings, self.mesh
          ),
          rng=repl,
          extra=var_shardings,
          apply_fn=model.apply,
          tx=self.tx,
      )
      self._init = jax.jit(init_state, out_shardings=self.state_shardings)
      self._train_step = jax.jit(
          make_train_step(objective, self.schedule, int(config.optim.get("grad_accum_steps", 1))),
          in_shardings=(self.state_shardings, self.batch_sharding),
          out_shardings=(self.state_shardings, repl),
          donate_argnums=(0,),
      )
      # Metric sums and predictions come back replicated: every process gets all of them.
      self._eval_step = jax.jit(
          make_eval_step(objective),
          in_shardings=(self.state_shardings, self.batch_sharding),
          out_shardings=(repl, repl),
      )

  @contextlib.contextmanager
  def context(self):
    """Mesh + logical-axis-rule context needed while tracing (for `nn.with_logical_constraint`)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init(self, seed: int, params: Any = None) -> TrainState:
    """The initial state; `params` (same tree, shapes and dtypes as the model's) replace the
    initialised ones (placed with the param shardings; the optimizer state starts afresh)."""
    with self.context():
      state = self._init(jax.random.PRNGKey(seed))
      if params is None:
        return state
      _check_same_params(params, state.params)
      params = jax.device_put(params, self.state_shardings.params)
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
      return state.replace(params=params, opt_state=opt_state)

  def rows(self, batch_size: int) -> slice | None:
    """This process's rows of a global batch of `batch_size` (None: all, one process)."""
    if not self.multiprocess:
      return None
    return distributed.local_rows(self.batch_sharding, batch_size)

  def batch(self, data: ArrayDataset, step: int) -> Any:
    """The training batch of `step`: all its rows, or this process's rows across processes."""
    if not self.multiprocess:
      return data.train_batch(step)
    return data.train_batch(step, self.rows(data.batch_size))

  def put(self, batch: Any, batch_size: int | None = None) -> Any:
    """A host batch -> sharded global arrays. Across processes `batch` holds this process's
    `rows(batch_size)` (default: train.batch_size) of the global batch."""
    if not self.multiprocess:
      return jax.device_put(batch, self.batch_sharding)
    size = int(batch_size or self.config.train.batch_size)
    return distributed.global_batch(batch, self.batch_sharding, size)

  def train_step(self, state: TrainState, batch: Any, batch_size: int | None = None):
    with self.context():
      return self._train_step(state, self.put(batch, batch_size))

  def evaluate(self, state: TrainState, data: ArrayDataset) -> tuple[dict[str, float], np.ndarray]:
    """Weighted-mean metrics over all rows of `data` plus host metrics; returns (metrics, predictions).

    Across processes every process must call it; each feeds its own rows of every batch and gets
    the metrics and the predictions of all rows.
    """
    sums: dict[str, float] = {}
    preds = []
    rows = self.rows(data.batch_size)
    batches = data.eval_batches() if rows is None else data.eval_batches(rows)
    with self.context():
      for i, batch in enumerate(batches):
        batch_sums, batch_preds = self._eval_step(state, self.put(batch, data.batch_size))
        batch_sums = jax.device_get(batch_sums)
        for k, v in batch_sums.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        real = min(data.batch_size, data.size - i * data.batch_size)  # padding comes last
        preds.append(jax.tree.map(lambda p: np.asarray(p)[:real], jax.device_get(batch_preds)))
    weight = sums.pop("weight")
    metrics = {k: v / weight for k, v in sums.items()}
    predictions = jax.tree.map(lambda *p: np.concatenate(p), *preds)
    if self.objective.host_metrics is not None:
      metrics.update(self.objective.host_metrics(predictions, data.arrays))
    return metrics, predictions


def _check_same_params(given: Any, expected: Any) -> None:
  """ValueError naming the first param path whose presence, shape or dtype differs."""
  flat = lambda t: {
      jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]
  }
  have, want = flat(given), flat(expected)
  for path in sorted(set(have) | set(want)):
    if path not in have or path not in want:
      side = "lack" if path not in have else "have an extra"
      raise ValueError(f"init_params {side} param {path}; they must fit the objective's model")
    a, b = have[path], want[path]
    if tuple(a.shape) != tuple(b.shape) or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
      raise ValueError(
          f"init_params {path} is {jnp.dtype(a.dtype).name}{list(a.shape)}, the model builds "
          f"{jnp.dtype(b.dtype).name}{list(b.shape)}"
      )


def _check_finite(metrics: dict[str, float], step: int, checkpointer: Checkpointer) -> None:
  bad = {k: v for k, v in metrics.items() if k in ("loss", "total_loss") and not math.isfinite(v)}
  if bad:
    last = checkpointer.latest_step()
    where = (
        f"the last good checkpoint (step {last}) in {checkpointer.directory} is left in place"
        if last is not None
        else "no checkpoint had been written yet"
    )
    raise NonFiniteLossError(
        f"training loss became non-finite ({bad}) at or before step {step}; stopping. {where}. "
        "Lower optim.learning_rate, enable optim.clip_norm, or check the inputs for NaN/inf."
    )


def _check_trains(optim_config: Any, total_steps: int, steps_note: str) -> None:
  """UntrainedError unless some optimizer update of the run has a learning rate > 0."""
  accum = int(optim_config.get("grad_accum_steps", 1))
  updates = total_steps // accum
  if updates < 1:
    raise UntrainedError(
        f"config.optim.grad_accum_steps={accum} is more than the {total_steps} steps of this run "
        f"({steps_note}): no optimizer update would be applied, so nothing would be trained. "
        "Lower optim.grad_accum_steps or train for more steps."
    )
  lr = np.asarray(learning_rate_schedule(optim_config, updates)(np.arange(updates)))
  if not np.any(lr > 0):
    raise UntrainedError(
        f"the learning rate would be 0 on all {updates} optimizer update(s) of this run "
        f"(config.optim.warmup_steps={int(optim_config.warmup_steps)}, {steps_note}, "
        f"optim.grad_accum_steps={accum}): nothing would be trained. Lower optim.warmup_steps "
        "(at most ~10% of the steps) or raise train.num_steps / train.num_epochs."
    )


def fit(
    objective: Objective,
    train_data: ArrayDataset,
    valid_data: ArrayDataset | None,
    config: Any,
    workdir: str | pathlib.Path,
    devices: Any = None,
    init_params: Any = None,
) -> FitResult:
  """Trains (or resumes) in `workdir`; evaluates on `valid_data` and early-stops on its metric.

  `devices` (default: all) are the devices the mesh is built from. `init_params` (e.g. a saved
  or imported model's params) start a new run instead of the seeded init; a run that resumes
  from its checkpoint ignores them. The config is validated
  (`validate_train_config`) before anything is built or compiled.

  Raises:
    ValueError naming the config field for invalid settings or a run of zero steps;
    UntrainedError when the learning rate would be 0 on every optimizer update (e.g.
      optim.warmup_steps >= train.num_steps); NonFiniteLossError; CheckpointError.
  """
  validate_train_config(config)
  workdir = pathlib.Path(workdir)
  tc = config.train
  steps_per_epoch = train_data.steps_per_epoch
  if tc.get("num_steps", 0):
    total_steps, steps_note = int(tc.num_steps), f"train.num_steps={int(tc.num_steps)}"
  else:
    total_steps = int(tc.num_epochs) * steps_per_epoch
    steps_note = (
        f"train.num_steps=0, train.num_epochs={int(tc.num_epochs)} x {steps_per_epoch} steps "
        "per epoch"
    )
  if total_steps < 1:
    raise ValueError(f"this run has 0 training steps ({steps_note}): nothing would be trained.")
  _check_trains(config.optim, total_steps, steps_note)
  eval_every = int(tc.get("eval_every_steps", 0)) or steps_per_epoch
  log_every = max(int(tc.get("log_every_steps", 50)), 1)
  es_cfg = tc.early_stopping
  early = EarlyStopping(
      metric=es_cfg.metric,
      mode=es_cfg.mode,
      patience=int(es_cfg.patience),
      min_delta=float(es_cfg.get("min_delta", 0.0)),
  )
  trainer = Trainer(objective, config, workdir, total_steps, train_data.train_batch(0), devices)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=int(tc.get("checkpoint_keep", 2)))
  distributed.training_in(workdir, checkpointer.directory)  # for a watcher's resume note
  latest = checkpointer.latest_step()
  state = trainer.init(int(config.seed), None if latest is not None else init_params)
  stopped_early = False
  if latest is not None:
    state, meta = checkpointer.restore(latest, state)
    early.load_state_dict(meta.get("early_stopping", {}))
    stopped_early = bool(meta.get("stopped_early", False))
  start = int(jax.device_get(state.step))
  stop_at = (
      min(total_steps, start + int(tc.get("stop_after_steps", 0)))
      if tc.get("stop_after_steps", 0)
      else total_steps
  )

  primary = distributed.is_primary()  # process 0 writes metrics and shows progress
  writer = MetricWriter(workdir, tensorboard=bool(tc.get("tensorboard", True)), active=primary)
  history: list[dict[str, float]] = []
  bar = tqdm(
      total=total_steps,
      initial=start,
      disable=not (tc.get("progress", True) and primary),
      dynamic_ncols=True,
      desc="train",
  )
  step, pending, t_start, t_log, steps_run = start, [], time.perf_counter(), time.perf_counter(), 0
  compile_seconds, evaluated = 0.0, False
  last_saved = latest

  def save(metrics=None):
    nonlocal last_saved
    # The step early stopping chose is the one the checkpointer preserves (one source of truth).
    checkpointer.save(
        state,
        {"early_stopping": early.state_dict(), "stopped_early": stopped_early},
        metrics,
        best_step=early.best_step,
    )
    last_saved = step

  try:
    while step < stop_at and not stopped_early:
      t_step = time.perf_counter()
      batch = trainer.batch(train_data, step)
      state, metrics = trainer.train_step(state, batch, train_data.batch_size)
      if steps_run == 0:
        jax.block_until_ready(metrics)
        compile_seconds += time.perf_counter() - t_step
      pending.append(metrics)
      step += 1
      steps_run += 1
      do_eval = valid_data is not None and (step % eval_every == 0 or step == total_steps)
      if step % log_every == 0 or do_eval or step == stop_at:
        host = jax.device_get(pending)
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        # Any NaN in the window poisons the mean: checked before anything is saved.
        _check_finite(mean, step, checkpointer)
        now = time.perf_counter()
        mean["rows_per_second"] = len(pending) * train_data.batch_size / max(now - t_log, 1e-9)
        writer.write(step, "train", mean)
        bar.set_postfix(loss=f"{mean['loss']:.4f}", rows_s=f"{mean['rows_per_second']:.0f}")
        bar.update(len(pending))
        pending, t_log = [], now
      if do_eval:
        t_eval = time.perf_counter()
        valid_metrics, _ = trainer.evaluate(state, valid_data)
        if not evaluated:
          compile_seconds, evaluated = compile_seconds + time.perf_counter() - t_eval, True
        writer.write(step, "valid", valid_metrics)
        history.append({"step": step, **valid_metrics})
        stopped_early = early.update(step, valid_metrics)
        save(valid_metrics)
    if last_saved != step:
      save()
  except KeyboardInterrupt:
    # Across processes a save needs every process at the same step: resume from the last one.
    if last_saved != step and not trainer.multiprocess:
      save()
    raise
  except Exception as err:
    # (read from disk now: a save may have completed as the peer died)
    distributed.raise_if_peer_lost(err, distributed.resume_note(workdir, checkpointer.directory))
    raise
  finally:
    bar.close()
    writer.close()
  seconds = time.perf_counter() - t_start
  best_metrics = None
  if early.best_step is not None:
    best_metrics = checkpointer.read_meta(early.best_step).get("metrics")
  return FitResult(
      state=state,
      best_step=early.best_step,
      best_metrics=best_metrics,
      steps_run=steps_run,
      train_seconds=seconds,
      rows_per_second=steps_run * train_data.batch_size / max(seconds, 1e-9),
      compile_seconds=compile_seconds,
      stopped_early=stopped_early,
      checkpointer=checkpointer,
      trainer=trainer,
      history=history,
      early_stopping=(early.metric, early.mode),
  )


def restore_best(result: FitResult) -> TrainState:
  """The state of the best validation checkpoint (or the final state when there was no validation)."""
  if result.best_step is None or result.best_step == int(jax.device_get(result.state.step)):
    return result.state
  state, _ = result.checkpointer.restore(result.best_step, result.state)
  return state


__all__ = [
    "Objective",
    "Trainer",
    "FitResult",
    "fit",
    "restore_best",
    "NonFiniteLossError",
    "UntrainedError",
]
