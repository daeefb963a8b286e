"""Continual learning: train tasks in sequence, log the accuracy matrix, EWC / online EWC / replay.

    result = run_sequence(objective, tasks, ContinualConfig(method="ewc", ewc_lambda=100.0))
    result.matrix            # R[i, j]: metric on task j after training task i, [T, T]
    result.average_accuracy  # mean of the last row
    result.backward_transfer # mean over j < T-1 of R[T-1, j] - R[j, j] (Lopez-Paz & Ranzato 2017)

Each task is trained for `steps_per_task` steps with the trainer's own step
(`train/steps.make_train_step`, scanned under one `jax.jit`); the `TrainState` is carried from task
to task (params and optimizer state; nothing is reset). Methods:
  "finetune":   plain sequential training.
  "ewc":        `optax.chain(ewc(lambda), optimizer)`; after each task `consolidate` with the
                diagonal Fisher (`train/fisher.py`) of `fisher_examples` rows of that task.
  "online_ewc": the same with `ewc(lambda, online=True, gamma=gamma)`.
  "replay":     after each task its training rows stream into a `ReservoirBuffer` of
                `replay_capacity`; every later batch gets `replay_batch` stored rows appended.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from nexus_jax.train.data import ArrayDataset, num_examples
from nexus_jax.train.ewc import check_ewc_args, consolidate, ewc
from nexus_jax.train.fisher import check_variant, diagonal_fisher
from nexus_jax.train.replay import ReservoirBuffer
from nexus_jax.train.state import TrainState
from nexus_jax.train.steps import (
    TRANSIENT_COLLECTIONS,
    Objective,
    make_eval_step,
    make_train_step,
    split_outputs,
)

METHODS = ("finetune", "ewc", "online_ewc", "replay")
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: `train` and `eval` are dicts of arrays `[N, ...]` the objective reads."""

  name: str
  train: dict[str, Any]
  eval: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
  method: str = "finetune"  # one of METHODS
  steps_per_task: int = 300  # optimizer steps on each task
  batch_size: int = 32  # current-task rows per step
  optimizer: str = "adam"  # "adam" | "sgd"
  learning_rate: float = 1e-3
  seed: int = 0  # init, batch order, Fisher labels, replay
  ewc_lambda: float = 0.0  # EWC penalty strength (>= 0)
  gamma: float = 1.0  # online EWC's Fisher decay, in [0, 1]
  fisher_variant: str = "sampled"  # "sampled" | "empirical" (train/fisher.py)
  fisher_examples: int = 500  # rows of the finished task the Fisher averages over
  replay_capacity: int = 0  # reservoir size (method "replay": >= 1)
  replay_batch: int = 32  # stored rows appended to each batch (method "replay")
  eval_batch: int = 256  # rows per evaluation batch

  def validate(self) -> "ContinualConfig":
    """ValueError naming the offending field."""
    if self.method not in METHODS:
      raise ValueError(
          f"ContinualConfig.method={self.method!r} is unknown; choose one of {METHODS}."
      )
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f"ContinualConfig.optimizer={self.optimizer!r} is unknown; choose one of {OPTIMIZERS}."
      )
    for name in ("steps_per_task", "batch_size", "eval_batch", "fisher_examples"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"ContinualConfig.{name}={getattr(self, name)} must be >= 1.")
    check_ewc_args(self.ewc_lambda, self.gamma)
    check_variant(self.fisher_variant)
    if self.method == "replay":
      if self.replay_capacity < 1:
        raise ValueError(
            f"ContinualConfig.replay_capacity={self.replay_capacity} must be >= 1 for "
            "method='replay'."
        )
      if self.replay_batch < 1:
        raise ValueError(f"ContinualConfig.replay_batch={self.replay_batch} must be >= 1.")
    return self


@dataclasses.dataclass
class ContinualResult:
  matrix: np.ndarray  # [T, T] R[i, j]; only i >= j is "after learning j" (i < j: before it)
  average_accuracy: float
  backward_transfer: float
  forgetting: float
  train_seconds: float
  state: TrainState
  buffer: ReservoirBuffer | None
  task_names: list[str]
  final_train_loss: list[float]  # mean loss of each task's last 10% of steps


def average_accuracy(matrix: np.ndarray) -> float:
  """Mean of the last row: the metric on every task after training the last one."""
  r = _square(matrix)
  return float(np.mean(r[-1]))


def backward_transfer(matrix: np.ndarray) -> float:
  """BWT = mean over j < T-1 of R[T-1, j] - R[j, j] (negative: forgetting); NaN for T = 1."""
  r = _square(matrix)
  t = r.shape[0]
  if t < 2:
    return float("nan")
  return float(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(matrix: np.ndarray) -> float:
  """Mean over j < T-1 of max_{l < T-1} R[l, j] - R[T-1, j] (Chaudhry et al. 2018); NaN for T=1."""
  r = _square(matrix)
  t = r.shape[0]
  if t < 2:
    return float("nan")
  return float(np.mean([np.max(r[j : t - 1, j]) - r[t - 1, j] for j in range(t - 1)]))


def _square(matrix: np.ndarray) -> np.ndarray:
  r = np.asarray(matrix, np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
    raise ValueError(f"the accuracy matrix must be square [T, T] with T >= 1, got {r.shape}.")
  return r


def init_state(objective: Objective, tx: optax.GradientTransformation, batch: Any, seed: int):
  """A `TrainState` for `objective.model` (as `train/loop.Trainer` builds it, unsharded)."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  names = ("params", *objective.rng_names)
  rngs = {name: jax.random.fold_in(init_rng, i) for i, name in enumerate(names)}
  variables = objective.model.init(rngs, **objective.inputs(batch, False))
  variables = nn.unbox({k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS})
  params = variables.pop("params")
  return TrainState.create(
      apply_fn=objective.model.apply, params=params, tx=tx, rng=state_rng, extra=variables
  )


@functools.lru_cache(maxsize=16)
def logits_fn_of(objective: Objective) -> Callable[[Any, Any, Any], jax.Array]:
  """`(params, batch, extra) -> outputs` of the model in eval mode (`diagonal_fisher` with
  `context=extra`); one function per objective, so its compilations are reused."""

  def logits_fn(params, batch, extra):
    out = objective.model.apply({"params": params, **extra}, **objective.inputs(batch, False))
    return split_outputs(out)[0]

  return logits_fn


@functools.lru_cache(maxsize=64)
def _tx(method: str, optimizer: str, learning_rate: float, ewc_lambda: float, gamma: float):
  opt = optax.adam(learning_rate) if optimizer == "adam" else optax.sgd(learning_rate)
  if method in ("ewc", "online_ewc"):
    return optax.chain(ewc(ewc_lambda, online=method == "online_ewc", gamma=gamma), opt)
  return opt


def build_tx(config: ContinualConfig) -> optax.GradientTransformation:
  """`optax.chain(ewc(...), optimizer)` for the EWC methods, else the optimizer (one object per
  setting, so runs that differ only in seed reuse their compiled steps)."""
  return _tx(config.method, config.optimizer, config.learning_rate, config.ewc_lambda, config.gamma)


@functools.lru_cache(maxsize=64)
def _compiled_steps(objective: Objective, learning_rate: float):
  step = make_train_step(objective, optax.constant_schedule(learning_rate))
  train_steps = jax.jit(lambda s, batches: jax.lax.scan(step, s, batches), donate_argnums=(0,))
  return train_steps, jax.jit(make_eval_step(objective))


def evaluate(eval_step, state: TrainState, data: dict[str, Any], batch: int, metric: str) -> float:
  """Weighted mean of `metric` over every row of `data`."""
  total, weight = 0.0, 0.0
  for b in ArrayDataset(data, batch).eval_batches():
    sums, _ = eval_step(state, b)
    total += float(sums[metric])
    weight += float(sums["weight"])
  return total / weight


def run_sequence(
    objective: Objective,
    tasks: Sequence[Task],
    config: ContinualConfig,
    *,
    targets_fn: Callable[[Any], Any] = lambda batch: batch["label"],
    metric: str = "accuracy",
) -> ContinualResult:
  """Trains `tasks` in order with `config.method`; returns the metric matrix and summaries.

  `targets_fn(batch)` gives the labels (or `(labels, weights)`) the Fisher is taken at; `metric`
  is a key of `objective.loss`'s metrics (for a loss-like metric such as bits, BWT > 0 is
  forgetting).
  """
  config.validate()
  if not tasks:
    raise ValueError("run_sequence: `tasks` is empty.")
  tx = build_tx(config)
  first = ArrayDataset(tasks[0].train, config.batch_size, config.seed).train_batch(0)
  state = init_state(objective, tx, first, config.seed)
  train_steps, eval_step = _compiled_steps(objective, config.learning_rate)
  buffer = (
      ReservoirBuffer(config.replay_capacity, config.seed) if config.method == "replay" else None
  )
  mix_rng = np.random.default_rng([config.seed, 1])
  n = len(tasks)
  matrix = np.zeros((n, n))
  losses, seconds = [], 0.0
  for i, task in enumerate(tasks):
    data = ArrayDataset(task.train, config.batch_size, seed=config.seed * 1000 + i)
    batches = [data.train_batch(s) for s in range(config.steps_per_task)]
    if buffer is not None:
      batches = [buffer.mix(b, config.replay_batch, mix_rng) for b in batches]
    stacked = jax.tree.map(lambda *a: np.stack(a), *batches)
    t0 = time.perf_counter()
    state, metrics = train_steps(state, stacked)
    task_loss = np.asarray(jax.device_get(metrics["loss"]))
    seconds += time.perf_counter() - t0
    losses.append(float(np.mean(task_loss[-max(1, len(task_loss) // 10) :])))
    if config.method in ("ewc", "online_ewc"):
      fisher_rows = np.random.default_rng([config.seed, 2, i]).permutation(num_examples(task.train))
      fisher_data = jax.tree.map(
          lambda a: np.asarray(a)[fisher_rows[: config.fisher_examples]], task.train
      )
      fisher = diagonal_fisher(
          logits_fn_of(objective),
          state.params,
          fisher_data,
          targets_fn,
          variant=config.fisher_variant,
          rng=jax.random.PRNGKey(config.seed * 1000 + i),
          context=state.extra,
      )
      state = state.replace(opt_state=consolidate(state.opt_state, state.params, fisher))
    if buffer is not None:
      buffer.add(task.train)
    for j, other in enumerate(tasks):
      matrix[i, j] = evaluate(eval_step, state, other.eval, config.eval_batch, metric)
  return ContinualResult(
      matrix=matrix,
      average_accuracy=average_accuracy(matrix),
      backward_transfer=backward_transfer(matrix),
      forgetting=forgetting(matrix),
      train_seconds=seconds,
      state=state,
      buffer=buffer,
      task_names=[t.name for t in tasks],
      final_train_loss=losses,
  )


__all__ = [
    "METHODS",
    "ContinualConfig",
    "ContinualResult",
    "Task",
    "average_accuracy",
    "backward_transfer",
    "build_tx",
    "forgetting",
    "init_state",
    "logits_fn_of",
    "run_sequence",
]
