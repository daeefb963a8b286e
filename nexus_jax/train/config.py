"""The training sections every experiment config shares (`seed, train, optim, mesh, sharding`)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax.numpy as jnp
import ml_collections

from nexus_jax.train.sharding import DEFAULT_LOGICAL_AXIS_RULES

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """`config.train.compute_dtype` -> jnp dtype (activations / matmuls; params stay float32);
  a clear error names the field."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(
        f"config.train.compute_dtype={name!r}; choose one of {sorted(COMPUTE_DTYPES)}."
    )
  return COMPUTE_DTYPES[name]


def base_config() -> ml_collections.ConfigDict:
  """Defaults for `train/loop.py`; experiment configs start from this and override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds init, dropout and data order: same config + seed = same result

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # rows per step (global, split over data x fsdp devices)
  c.train.num_epochs = 1  # epochs over the training split (ignored when num_steps > 0)
  c.train.num_steps = 0  # total optimizer steps; 0 = num_epochs * steps_per_epoch
  c.train.eval_every_steps = 0  # validation interval in steps; 0 = once per epoch
  c.train.log_every_steps = 50  # train-metric logging interval
  c.train.checkpoint_keep = 2  # latest checkpoints kept (the best one is kept in addition)
  c.train.stop_after_steps = 0  # stop (and checkpoint) after this many steps of this call; 0 = off
  c.train.progress = True  # tqdm progress bar
  c.train.tensorboard = True  # also write TensorBoard event files to workdir/tb
  c.train.compute_dtype = (
      "float32"  # "float32" | "bfloat16" activations/matmuls (params stay float32)
  )
  c.train.early_stopping = ml_collections.ConfigDict()
  c.train.early_stopping.metric = "loss"  # validation metric to select and stop on
  c.train.early_stopping.mode = "min"  # "min" | "max"
  c.train.early_stopping.patience = 0  # evaluations without improvement before stopping; 0 = never
  c.train.early_stopping.min_delta = 0.0  # smallest change that counts as an improvement

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # "adamw" | "adamw8bit" (8-bit moments) | "lion" | "sgd"
  c.optim.learning_rate = 1e-3  # peak learning rate
  c.optim.warmup_steps = 100  # linear warmup steps
  c.optim.schedule = "cosine"  # "constant" | "linear" | "cosine" decay after warmup
  c.optim.end_factor = 0.0  # final lr = end_factor * peak
  c.optim.weight_decay = 1e-4  # decoupled weight decay (not on norms, biases, embeddings)
  c.optim.clip_norm = 1.0  # global-norm clipping; 0 = off
  c.optim.grad_accum_steps = 1  # micro-batches per optimizer update
  c.optim.b1 = 0.9  # first-moment decay (adamw, lion)
  c.optim.b2 = 0.999  # second-moment decay (adamw, lion)
  c.optim.momentum = 0.9  # sgd momentum
  c.optim.adam8bit = ml_collections.ConfigDict()  # only read by name="adamw8bit"
  c.optim.adam8bit.block_size = (
      256  # block length along each param's last axis (largest divisor <=)
  )
  c.optim.adam8bit.min_size = 4096  # params with fewer elements keep float32 moments
  c.optim.adam8bit.exclude = ("router",)  # param-path regexes with float32 moments (+ "embed")

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel devices; -1 = all remaining
  c.mesh.fsdp = 1  # parameter-sharded data parallelism
  c.mesh.tensor = 1  # tensor (model) parallelism
  c.mesh.expert = 1  # expert parallelism for MoE layers

  c.sharding = ml_collections.ConfigDict()
  # logical axis name -> mesh axes; see nexus_jax/train/sharding.py
  c.sharding.logical_axis_rules = [list(rule) for rule in DEFAULT_LOGICAL_AXIS_RULES]

  # Training across processes (nexus_jax/train/distributed.py; README "Many hosts"): every
  # process runs the same command with its own process_id; the mesh spans all their devices.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.num_processes = 1  # processes of the run; 1 = no jax.distributed
  c.distributed.process_id = 0  # this process's rank in [0, num_processes)
  c.distributed.coordinator_address = ""  # "host:port" of process 0, the same on every process
  c.distributed.coordinator_bind_address = ""  # where process 0 listens; "" = jax's [::]:port
  c.distributed.auto = False  # True: jax detects the cluster (SLURM, Open MPI, TPU pod slice)
  c.distributed.heartbeat_timeout_seconds = 60  # a silent process counts as dead after this
  c.distributed.initialization_timeout_seconds = 300  # how long processes wait for each other
  c.distributed.shutdown_timeout_seconds = 60  # how long an exiting process waits for the others
  # A watcher (the process you started; it forks the training process) reports a lost peer
  # even when jax.distributed ends the training process itself (Linux); False = no fork.
  c.distributed.watch = True
  return c


# (dotted field, lowest allowed value, must be an integer, must be strictly above the bound)
_BOUNDS = (
    ("optim.learning_rate", 0.0, False, True),
    ("train.batch_size", 1, True, False),
    ("train.num_steps", 0, True, False),
    ("train.num_epochs", 0, True, False),
    ("train.min_steps", 0, True, False),
    ("train.eval_every_steps", 0, True, False),
    ("train.stop_after_steps", 0, True, False),
    ("optim.warmup_steps", 0, True, False),
    ("optim.grad_accum_steps", 1, True, False),
    ("optim.clip_norm", 0.0, False, False),
    ("optim.weight_decay", 0.0, False, False),
)


def _get(config: Any, path: str) -> Any:
  node = config
  for key in path.split("."):
    if node is None or key not in node:
      return None
    node = node[key]
  return node


def validate_train_config(config: Any) -> None:
  """Checks the training fields of `config` (see `base_config`) before anything is built.

  Checks that optim.learning_rate is a finite number > 0; train.batch_size, optim.grad_accum_steps
  >= 1; train.num_steps, train.num_epochs, train.min_steps, train.eval_every_steps,
  train.stop_after_steps, optim.warmup_steps >= 0 (integers); optim.clip_norm, optim.weight_decay
  finite and >= 0; not both train.num_steps and train.num_epochs 0 (nothing would be trained);
  train.early_stopping.mode "min" | "max". Fields a config does not have are skipped.

  Raises:
    ValueError naming every offending field (`config.optim.learning_rate=nan: ...`), one per line.
  """
  problems = []
  for path, low, integer, strict in _BOUNDS:
    value = _get(config, path)
    if value is None:
      continue
    kind = "an integer" if integer else "a finite number"
    bound = f"> {low}" if strict else f">= {low}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (not integer or float(value).is_integer())
    ok = ok and (value > low if strict else value >= low)
    if not ok:
      problems.append(f"config.{path}={value!r}: must be {kind} {bound}.")
  steps, epochs = _get(config, "train.num_steps"), _get(config, "train.num_epochs")
  if steps == 0 and epochs == 0:
    problems.append(
        "config.train.num_steps=0 and config.train.num_epochs=0: nothing would be trained; set "
        "train.num_epochs >= 1 or train.num_steps >= 1."
    )
  mode = _get(config, "train.early_stopping.mode")
  if mode is not None and mode not in ("min", "max"):
    problems.append(f"config.train.early_stopping.mode={mode!r}: must be 'min' or 'max'.")
  if problems:
    raise ValueError("invalid training config:\n  " + "\n  ".join(problems))
