"""The jitted train and eval step functions, built from an `Objective`.

An `Objective` says how to call a model on a batch and how to score its outputs; the steps add
what every run needs: dropout keys folded from the step, auxiliary losses gathered from the
`aux_loss` collection that layers `sow` into (added to the optimised loss, logged separately),
mutable collections such as `batch_stats`, and grad / param / update norms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nexus_jax.train.state import TrainState

AUX_LOSS_COLLECTION = "aux_loss"
# Collections recreated on every call (sown values), never part of the persistent state.
TRANSIENT_COLLECTIONS = (AUX_LOSS_COLLECTION, "intermediates")

LossFn = Callable[[Any, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]


def _identity(outputs: Any) -> Any:
  return outputs


@dataclasses.dataclass(frozen=True)
class Objective:
  """How the training loop drives a model.

  Attributes:
    model: a Flax Linen module; `model(**inputs(batch, train))` returns `outputs` or
      `(outputs, aux)`.
    loss: `(outputs, batch) -> (loss, metrics)`; `loss` is the weighted mean over real rows
      (`batch["weight"]` is 1 for real rows, 0 for padding), `metrics` a dict of scalars.
    inputs: `(batch, train) -> kwargs` for the model call (train toggles dropout / batch norm).
    predict: `outputs -> [batch, ...]` array collected during evaluation (e.g. probabilities).
    host_metrics: optional `(predictions [N, ...], batch arrays [N, ...]) -> dict` computed on
      the host over a whole evaluation split (e.g. ROC AUC).
    rng_names: names of the PRNG streams the model draws from while training.
  """

  model: nn.Module
  loss: LossFn
  inputs: Callable[[Mapping[str, Any], bool], dict[str, Any]]
  predict: Callable[[Any], Any] = _identity
  host_metrics: Callable[[Any, Mapping[str, Any]], dict[str, float]] | None = None
  rng_names: tuple[str, ...] = ("dropout",)


def split_outputs(out: Any) -> tuple[Any, dict[str, Any]]:
  """Models return `outputs` or `(outputs, aux)`; normalise to the latter."""
  if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
    return out[0], dict(out[1])
  return out, {}


def collect_aux_losses(sown: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Sums the sown values per name: {"layer_0": {"moe_balance": (v,)}, ...} -> {"moe_balance": sum}."""
  totals: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
    names = [getattr(p, "key", None) for p in path if isinstance(getattr(p, "key", None), str)]
    name = names[-1] if names else "aux"
    totals[name] = totals.get(name, 0.0) + jnp.sum(leaf.astype(jnp.float32))
  return totals


def make_train_step(
    objective: Objective, schedule: optax.Schedule, grad_accum_steps: int = 1
) -> Callable[[TrainState, Any], Any]:
  """`(state, batch) -> (state, metrics)`; metrics are device scalars.

  `schedule` counts optimizer updates (as `train/optim.py` builds it); under gradient accumulation
  (`grad_accum_steps` micro-steps per update, `optax.MultiSteps`) micro-step s belongs to update
  s // grad_accum_steps, so the logged "learning_rate" is `schedule(s // grad_accum_steps)`: the
  rate applied at the end of that accumulation window.
  """

  def train_step(state: TrainState, batch: Any):
    step_rng = jax.random.fold_in(state.rng, state.step)
    rngs = {name: jax.random.fold_in(step_rng, i) for i, name in enumerate(objective.rng_names)}
    mutable = [*state.extra.keys(), AUX_LOSS_COLLECTION]

    def loss_fn(params):
      out, updates = state.apply_fn(
          {"params": params, **state.extra},
          **objective.inputs(batch, True),
          rngs=rngs,
          mutable=mutable,
      )
      outputs, _ = split_outputs(out)
      main, metrics = objective.loss(outputs, batch)
      aux_losses = collect_aux_losses(updates.get(AUX_LOSS_COLLECTION, {}))
      total = main + sum(aux_losses.values(), jnp.zeros((), jnp.float32))
      return total.astype(jnp.float32), (main, metrics, aux_losses, updates)

    grads, (main, metrics, aux_losses, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    new_extra = {k: updates[k] for k in state.extra}
    new_state, applied = state.apply_gradients(grads, extra=new_extra)
    out = {
        "loss": main,
        "total_loss": main + sum(aux_losses.values(), 0.0),
        **{f"aux/{k}": v for k, v in aux_losses.items()},
        **metrics,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_state.params),
        "update_norm": optax.tree.norm(applied),
        "learning_rate": schedule(state.step // grad_accum_steps),
    }
    return new_state, out

  return train_step


def make_eval_step(objective: Objective) -> Callable[[TrainState, Any], Any]:
  """`(state, batch) -> (weighted metric sums, predictions)`; sums carry a `weight` total."""

  def eval_step(state: TrainState, batch: Any):
    out = state.apply_fn(state.variables(), **objective.inputs(batch, False))
    outputs, _ = split_outputs(out)
    main, metrics = objective.loss(outputs, batch)
    weight = jnp.sum(batch["weight"])
    sums = {"loss": main * weight, **{k: v * weight for k, v in metrics.items()}, "weight": weight}
    return sums, objective.predict(outputs)

  return eval_step
