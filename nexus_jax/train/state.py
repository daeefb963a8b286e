"""TrainState: everything a training step reads and writes, as one pytree.

Fields:
  step: int32 scalar, number of optimizer steps taken (micro-steps under accumulation).
  params: the model's "params" collection (plain arrays; logical-axis metadata is stripped and
    turned into shardings by `train/sharding.py`).
  opt_state: the optax state.
  rng: PRNG key; the key for step s is `jax.random.fold_in(rng, s)`, so a resumed run draws the
    same randomness as an uninterrupted one.
  extra: other mutable variable collections, e.g. {"batch_stats": ...}.
  apply_fn, tx: static (not pytree leaves).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: dict[str, Any]
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, tx, rng, extra=None) -> "TrainState":
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=rng,
        extra=dict(extra or {}),
        apply_fn=apply_fn,
        tx=tx,
    )

  def apply_gradients(
      self, grads: Any, extra: dict[str, Any] | None = None
  ) -> tuple["TrainState", Any]:
    """One optimizer update; returns the new state and the applied updates (for logging)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    new = self.replace(
        step=self.step + 1,
        params=params,
        opt_state=opt_state,
        extra=self.extra if extra is None else extra,
    )
    return new, updates

  def variables(self) -> dict[str, Any]:
    """The Flax variables dict for `apply`: {"params": ..., **extra}."""
    return {"params": self.params, **self.extra}
