"""What the byte-LM benchmarks share: their optimizer and the shape of their training step.

tx = lm_optimizer(steps)                       # clip 1.0 + AdamW, warmup-cosine, b2 0.98
step = jax.jit(make_train_step(loss_fn, tx))   # loss_fn(params, *batch) -> (loss, metric)
params, opt, metric = step(params, tx.init(params), tokens)
"""

from __future__ import annotations

import jax
import optax


def lm_optimizer(steps: int, lr: float = 3e-3, warmup: int = 30) -> optax.GradientTransformation:
  """Global-norm clipping at 1.0, then AdamW (b2 0.98) on a warmup-cosine schedule peaking at `lr`
  after `min(warmup, steps // 4)` steps."""
  schedule = optax.warmup_cosine_decay_schedule(0, lr, min(warmup, steps // 4), steps)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98))


def make_train_step(loss_fn, tx: optax.GradientTransformation):
  """`loss_fn(params, *batch) -> (loss, metric)` -> `step(params, opt, *batch) -> (params, opt,
  metric)`, one optimizer update on the gradient of `loss` (jit it at the call site)."""

  def step(params, opt, *batch):
    (_, metric), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, metric

  return step
