"""Optax optimizers and learning-rate schedules built from a config.

Config fields (`config.optim`):
  name: "adamw" | "adamw8bit" | "lion" | "sgd" ("adamw8bit": both moments as block-wise uint8
    codes of a dynamic map, `train/adam8bit.py`; `adam8bit.block_size`, `adam8bit.min_size` and
    `adam8bit.exclude` (param-path regexes kept in float32) configure it)
  learning_rate: peak learning rate after warmup.
  warmup_steps: linear warmup from 0 to `learning_rate`.
  schedule: "constant" | "linear" | "cosine" (decay after warmup, down to
    `learning_rate * end_factor` at `total_steps`).
  end_factor: final learning rate as a fraction of the peak.
  weight_decay: decoupled weight decay, applied only where `weight_decay_mask` is True.
  clip_norm: global-norm gradient clipping (0 disables).
  grad_accum_steps: accumulate gradients over this many micro-batches (optax.MultiSteps).
  b1, b2, momentum: optimizer coefficients (momentum for sgd).
  ewc_lambda: elastic weight consolidation strength (>= 0; 0 = off): `train/ewc.ewc` chained
    first (before clipping and the optimizer), anchor and Fisher in the optimizer state.
  ewc_online: online EWC (Schwarz et al. 2018: decayed Fisher, latest anchor) instead of EWC.
  ewc_gamma: online EWC's Fisher decay in [0, 1].
  ewc_prior: "" or a `.npz` from `train/ewc.save_ewc_prior` (anchor + Fisher consolidated after
    earlier tasks) the EWC state starts from; "" = anchor = initial params, Fisher 0 (the penalty
    is then 0 until something is consolidated, e.g. by `train/continual_fit.run_domains`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import traverse_util

from nexus_jax.train.adam8bit import DEFAULT_BLOCK_SIZE, DEFAULT_EXCLUDE, DEFAULT_MIN_SIZE, adamw_8bit
from nexus_jax.train.ewc import ewc, load_ewc_prior

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "sgd")

# Name parts that mark parameters without weight decay: norms, biases and embedding tables
# (matched against the parts of every path component split at "_", trailing digits removed, so
# "cat_embedding_0", "step1_bn0" and "plr_bias" are all recognised).
_NO_DECAY_NAMES = frozenset(
    {
        "bias",
        "scale",
        "embedding",
        "embeddings",
        "embed",
        "norm",
        "layernorm",
        "rmsnorm",
        "ln",
        "bn",
        "cls",
        "missing",
        "pos",
    }
)


def learning_rate_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then constant / linear / cosine decay until `total_steps`."""
  peak = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  end = peak * float(optim_config.get("end_factor", 0.0))
  kind = optim_config.get("schedule", "cosine")
  if kind not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={kind!r} is unknown; choose one of {SCHEDULES}.")
  decay_steps = max(int(total_steps) - warmup, 1)
  if kind == "constant":
    decay = optax.constant_schedule(peak)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  if warmup <= 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup]
  )


def weight_decay_mask(params: Any) -> Any:
  """True for weight matrices (ndim >= 2), False for norms, biases and embeddings.

  Returns a pytree of bools with the structure of `params`.
  """
  flat = (
      traverse_util.flatten_dict(params, keep_empty_nodes=False)
      if isinstance(params, dict)
      else None
  )
  if flat is None:
    return jax.tree.map(lambda p: p.ndim >= 2, params)

  def decays(path: tuple[str, ...], leaf: Any) -> bool:
    parts = {re.sub(r"\d+$", "", part) for name in path for part in str(name).lower().split("_")}
    return not (parts & _NO_DECAY_NAMES) and getattr(leaf, "ndim", 0) >= 2

  return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


def ewc_transform(optim_config: Any) -> optax.GradientTransformation | None:
  """`ewc(...)` from `optim.ewc_lambda / ewc_online / ewc_gamma / ewc_prior`, None when
  ewc_lambda is 0 (or absent); a ValueError names the offending `config.optim` field."""
  lam = optim_config.get("ewc_lambda", 0.0)
  gamma = optim_config.get("ewc_gamma", 1.0)
  if not float(lam) >= 0:  # also rejects NaN
    raise ValueError(f"config.optim.ewc_lambda={lam} must be >= 0 (0 disables EWC).")
  if not 0.0 <= float(gamma) <= 1.0:
    raise ValueError(f"config.optim.ewc_gamma={gamma} must lie in [0, 1] (online EWC's decay).")
  prior_path = optim_config.get("ewc_prior", "") or ""
  if float(lam) == 0:
    if prior_path:
      raise ValueError(
          f"config.optim.ewc_prior={prior_path!r} is set but config.optim.ewc_lambda=0: set "
          "ewc_lambda > 0 to use it, or clear ewc_prior."
      )
    return None
  prior = load_ewc_prior(prior_path) if prior_path else None
  online = bool(optim_config.get("ewc_online", False))
  return ewc(float(lam), online=online, gamma=float(gamma), prior=prior)


def build_optimizer(
    optim_config: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, schedule)`: [EWC ->] clipping -> optimizer with masked weight decay ->
  accumulation."""
  name = optim_config.name
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name={name!r} is unknown; choose one of {OPTIMIZERS}.")
  accum = int(optim_config.get("grad_accum_steps", 1))
  if accum < 1:
    raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {accum}.")
  # The schedule counts optimizer updates, i.e. steps / accumulation.
  schedule = learning_rate_schedule(optim_config, max(total_steps // accum, 1))
  wd = float(optim_config.get("weight_decay", 0.0))
  b1, b2 = float(optim_config.get("b1", 0.9)), float(optim_config.get("b2", 0.999))
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=wd, mask=weight_decay_mask)
  elif name == "adamw8bit":
    q = optim_config.get("adam8bit", None) or {}
    opt = adamw_8bit(
        schedule,
        b1=b1,
        b2=b2,
        weight_decay=wd,
        mask=weight_decay_mask,
        block_size=int(q.get("block_size", DEFAULT_BLOCK_SIZE)),
        min_size=int(q.get("min_size", DEFAULT_MIN_SIZE)),
        exclude=tuple(q.get("exclude", DEFAULT_EXCLUDE)),
    )
  elif name == "lion":
    opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=wd, mask=weight_decay_mask)
  else:
    opt = optax.chain(
        optax.add_decayed_weights(wd, mask=weight_decay_mask),
        optax.sgd(schedule, momentum=float(optim_config.get("momentum", 0.9)) or None),
    )
  clip = float(optim_config.get("clip_norm", 0.0))
  tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
  penalty = ewc_transform(optim_config)
  if penalty is not None:
    tx = optax.chain(penalty, tx)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule
