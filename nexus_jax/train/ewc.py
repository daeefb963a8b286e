"""Elastic weight consolidation as an optax transform chained BEFORE the optimizer.

    tx = optax.chain(ewc(ewc_lambda=100.0), optax.adam(1e-3))     # EWC (Kirkpatrick et al. 2017)
    tx = optax.chain(ewc(100.0, online=True, gamma=0.9), ...)     # online EWC (Schwarz et al. 2018)
    ...train task t...
    opt_state = consolidate(opt_state, params, diagonal_fisher(...))   # after each finished task

`update` adds `ewc_lambda * F * (theta - theta*)` to the incoming gradients: the gradient of the
penalty `ewc_lambda / 2 * sum_k F_k (theta_k - theta*_k)^2`. Anchor `theta*` and Fisher `F` live
in the optimizer state (`EWCState`), so a `TrainState` built with this `tx`, its train step
(`train/steps.py`) and its checkpoints (`train/checkpoint.py`) are unchanged. Before the first
`consolidate` F is 0 and the transform is the identity.

`consolidate` (optax states are immutable: it returns a new state) folds in a finished task:
  EWC:        one penalty per past task i, `sum_i F_i (theta - theta*_i)`, kept exactly in constant
              memory as `F = sum_i F_i` and the Fisher-weighted anchor `theta* = sum_i F_i theta*_i
              / F` (same gradient; the penalty differs by a constant).
  online EWC: `F = gamma * F_old + F_new`, `theta* = theta` (the latest params); gamma = 1 is
              Huszar's (2018) corrected single penalty, gamma = 0 keeps only the latest task.

Across separate training runs (`train/loop.fit` calls, one per task): `save_ewc_prior(path,
consolidated_state)` writes anchor, Fisher and task count to a `.npz` (flattened by param path,
no pickle) and `ewc(..., prior=load_ewc_prior(path))` starts its state from them instead of
(params, 0) - what `config.optim.ewc_prior` does in `train/optim.build_optimizer`.
"""

from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class EWCState(NamedTuple):
  """Optimizer state of `ewc` (scalars are arrays so the state is one checkpointable pytree)."""

  anchor: Any  # theta*, like params
  fisher: Any  # F, like params, float32
  num_tasks: jax.Array  # int32, tasks consolidated so far
  ewc_lambda: jax.Array  # float32
  gamma: jax.Array  # float32 (online EWC's decay; 1 for EWC)
  online: jax.Array  # bool


def check_ewc_args(ewc_lambda: float, gamma: float) -> None:
  """ValueError naming the field: ewc_lambda >= 0, gamma in [0, 1]."""
  if not float(ewc_lambda) >= 0:  # also rejects NaN
    raise ValueError(f"ewc_lambda={ewc_lambda} must be >= 0 (0 disables the penalty).")
  if not 0.0 <= float(gamma) <= 1.0:
    raise ValueError(f"gamma={gamma} must lie in [0, 1] (online EWC's Fisher decay).")


class EWCPrior(NamedTuple):
  """Consolidated EWC knowledge from earlier runs (`load_ewc_prior`): flat by param path."""

  anchor: dict[str, np.ndarray]  # jax.tree_util.keystr(path) -> theta*
  fisher: dict[str, np.ndarray]  # jax.tree_util.keystr(path) -> F (float32)
  num_tasks: int


def ewc(
    ewc_lambda: float,
    *,
    online: bool = False,
    gamma: float = 1.0,
    prior: EWCPrior | None = None,
) -> optax.GradientTransformation:
  """The EWC gradient transform (module docstring); `update` needs `params`.

  Args:
    ewc_lambda: penalty strength lambda >= 0.
    online: online EWC (decayed Fisher, latest anchor) instead of one penalty per task.
    gamma: online EWC's decay in [0, 1] (ignored, and stored as 1, when `online` is False).
    prior: anchor + Fisher of earlier tasks (`load_ewc_prior`); `init` starts from them (their
      paths, shapes must be the params'), else from anchor = params, F = 0.
  """
  check_ewc_args(ewc_lambda, gamma)
  gamma = float(gamma) if online else 1.0

  def init(params):
    if prior is not None:
      anchor, fisher = _prior_trees(prior, params)
    else:
      anchor = jax.tree.map(_copy, params)  # own buffers: a donated state must not alias
      fisher = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return EWCState(
        anchor=anchor,
        fisher=fisher,
        num_tasks=jnp.asarray(prior.num_tasks if prior is not None else 0, jnp.int32),
        ewc_lambda=jnp.asarray(ewc_lambda, jnp.float32),
        gamma=jnp.asarray(gamma, jnp.float32),
        online=jnp.asarray(bool(online)),
    )

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("ewc: `update` needs `params` (the penalty depends on theta - theta*).")
    new = jax.tree.map(
        lambda u, p, a, f: (u + state.ewc_lambda * f * (p - a).astype(jnp.float32)).astype(u.dtype),
        updates,
        params,
        state.anchor,
        state.fisher,
    )
    return new, state

  return optax.GradientTransformation(init, update)


def _copy(x: Any) -> jax.Array:
  return jnp.array(x, copy=True)


def _prior_trees(prior: EWCPrior, params: Any) -> tuple[Any, Any]:
  """`(anchor, fisher)` trees like `params` from a flat prior; ValueError naming a bad path."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = [jax.tree_util.keystr(path) for path, _ in flat]
  if set(keys) != set(prior.anchor) or set(keys) != set(prior.fisher):
    missing = sorted(set(keys) - set(prior.anchor))[:3]
    extra = sorted(set(prior.anchor) - set(keys))[:3]
    raise ValueError(
        f"the EWC prior does not fit the params: missing {missing}, unexpected {extra}; it must "
        "come from the same model (config.optim.ewc_prior)."
    )
  anchor, fisher = [], []
  for key, (_, p) in zip(keys, flat):
    a, f = prior.anchor[key], prior.fisher[key]
    if tuple(a.shape) != tuple(jnp.shape(p)) or tuple(f.shape) != tuple(jnp.shape(p)):
      raise ValueError(
          f"the EWC prior's {key} has shape {tuple(a.shape)}, the param {tuple(jnp.shape(p))} "
          "(config.optim.ewc_prior must come from the same model)."
      )
    anchor.append(jnp.asarray(a, jnp.result_type(p)))
    fisher.append(jnp.asarray(f, jnp.float32))
  return treedef.unflatten(anchor), treedef.unflatten(fisher)


def save_ewc_prior(path: str | pathlib.Path, state: EWCState) -> pathlib.Path:
  """Writes `state`'s anchor, Fisher and task count to `path` (.npz, flat by param path)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {"num_tasks": np.asarray(jax.device_get(state.num_tasks), np.int32)}
  for name in ("anchor", "fisher"):
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, name))[0]:
      arrays[f"{name}:{jax.tree_util.keystr(key_path)}"] = np.asarray(jax.device_get(leaf))
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def load_ewc_prior(path: str | pathlib.Path) -> EWCPrior:
  """The `EWCPrior` written by `save_ewc_prior` (ValueError naming `path` if it is not one)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"EWC prior file {path} does not exist (config.optim.ewc_prior).")
  with np.load(path, allow_pickle=False) as z:
    if "num_tasks" not in z.files:
      raise ValueError(f"{path} is not an EWC prior written by save_ewc_prior (no num_tasks).")
    anchor = {k[len("anchor:") :]: z[k] for k in z.files if k.startswith("anchor:")}
    fisher = {k[len("fisher:") :]: z[k] for k in z.files if k.startswith("fisher:")}
    return EWCPrior(anchor, fisher, int(z["num_tasks"]))


def _is_ewc(x: Any) -> bool:
  return isinstance(x, EWCState)


def find_ewc_state(opt_state: Any) -> EWCState:
  """The (single) `EWCState` inside a (chained) optimizer state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_ewc) if _is_ewc(s)]
  if len(found) != 1:
    raise ValueError(
        f"opt_state holds {len(found)} EWCState(s); build the optimizer as "
        "optax.chain(ewc(...), optimizer) with exactly one ewc transform."
    )
  return found[0]


def consolidated(state: EWCState, params: Any, fisher: Any) -> EWCState:
  """`state` after a finished task with params `params` and Fisher `fisher` (module docstring)."""
  params = jax.tree.map(jnp.asarray, params)
  f_new = jax.tree.map(lambda f: jnp.asarray(f, jnp.float32), fisher)

  def online_anchor(a, p, fo, fn):
    return _copy(p.astype(a.dtype))

  def ewc_anchor(a, p, fo, fn):
    total = fo + fn
    mean = (fo * a.astype(jnp.float32) + fn * p.astype(jnp.float32)) / jnp.where(
        total > 0, total, 1
    )
    return jnp.where(total > 0, mean, p.astype(jnp.float32)).astype(a.dtype)

  online = bool(jax.device_get(state.online))
  anchor_fn = online_anchor if online else ewc_anchor
  anchor = jax.tree.map(anchor_fn, state.anchor, params, state.fisher, f_new)
  decay = state.gamma if online else jnp.ones((), jnp.float32)
  new_fisher = jax.tree.map(lambda fo, fn: decay * fo + fn, state.fisher, f_new)
  return state._replace(anchor=anchor, fisher=new_fisher, num_tasks=state.num_tasks + 1)


def consolidate(opt_state: Any, params: Any, fisher: Any) -> Any:
  """A new optimizer state whose `EWCState` has consolidated the task just finished."""
  new = consolidated(find_ewc_state(opt_state), params, fisher)
  return jax.tree.map(lambda s: new if _is_ewc(s) else s, opt_state, is_leaf=_is_ewc)


def ewc_penalty(opt_state: Any, params: Any) -> jax.Array:
  """`ewc_lambda / 2 * sum_k F_k (theta_k - theta*_k)^2` (float32 scalar), for logging."""
  state = find_ewc_state(opt_state)
  terms = jax.tree.map(
      lambda p, a, f: jnp.sum(f * jnp.square((p - a).astype(jnp.float32))),
      params,
      state.anchor,
      state.fisher,
  )
  return 0.5 * state.ewc_lambda * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


__all__ = [
    "EWCPrior",
    "EWCState",
    "check_ewc_args",
    "consolidate",
    "consolidated",
    "ewc",
    "ewc_penalty",
    "find_ewc_state",
    "load_ewc_prior",
    "save_ewc_prior",
]
