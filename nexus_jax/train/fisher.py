"""Diagonal Fisher information from per-example gradients (for EWC, `train/ewc.py`).

    fisher = diagonal_fisher(logits_fn, params, {"x": x, "label": y}, lambda b: b["label"])

`F_k = (1/N) sum_n (d log p(y_n | x_n; theta) / d theta_k)^2`, one gradient per example
(`jax.vmap` of `jax.grad` over the rows of a chunk). Squaring the gradient of a batch mean instead
is the classic bug: it keeps only `(mean_n g_n)^2`, which goes to 0 at a minimum of the training
loss, where the Fisher does not.

Variants (which `y_n` the log-likelihood is taken at):
  "sampled":   y_n ~ p(y | x_n; theta), drawn from the model's own predictive distribution: an
               unbiased estimate of the true Fisher (one draw per example and per position).
  "empirical": y_n = the data's label: the "empirical Fisher" (cheaper to reason about, biased).
For sequence outputs (`logits [B, T, V]`, e.g. a language model) an example's log-likelihood is
the weighted mean over its positions, the scale of the per-token training loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.train.data import num_examples

FISHER_VARIANTS = ("sampled", "empirical")

# (params, batch) -> logits [B, ..., C]
LogitsFn = Callable[[Any, dict[str, Any]], jax.Array]
# batch -> labels [B, ...] int, or (labels [B, ...], weights [B, ...])
TargetsFn = Callable[[dict[str, Any]], Any]


def check_variant(variant: str) -> str:
  if variant not in FISHER_VARIANTS:
    raise ValueError(f"fisher variant={variant!r} is unknown; choose one of {FISHER_VARIANTS}.")
  return variant


def _split_targets(targets: Any) -> tuple[jax.Array, jax.Array]:
  if isinstance(targets, tuple):
    labels, weights = targets
  else:
    labels, weights = targets, jnp.ones(jnp.shape(targets), jnp.float32)
  return labels, weights.astype(jnp.float32)


def per_example_log_likelihood(
    logits_fn: LogitsFn, targets_fn: TargetsFn, variant: str
) -> Callable[[Any, dict[str, Any], jax.Array], jax.Array]:
  """`(params, example, rng) -> log p(y | x)` for ONE example (no batch axis; it is given to
  `logits_fn` as a batch of 1). Sampled labels are drawn outside the differentiated path."""
  check_variant(variant)

  def log_likelihood(params, example, rng):
    batch = jax.tree.map(lambda a: a[None], example)
    logp = jax.nn.log_softmax(logits_fn(params, batch).astype(jnp.float32), axis=-1)
    labels, weights = _split_targets(targets_fn(batch))
    if variant == "sampled":
      labels = jax.random.categorical(rng, jax.lax.stop_gradient(logp), axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(picked * weights) / jnp.maximum(jnp.sum(weights), 1e-9)

  return log_likelihood


def per_example_grads(
    logits_fn: LogitsFn,
    params: Any,
    batch: dict[str, Any],
    targets_fn: TargetsFn,
    variant: str = "sampled",
    rng: jax.Array | None = None,
) -> Any:
  """Per-example gradients of the log-likelihood: a tree like `params` with leaves `[B, *shape]`."""
  log_likelihood = per_example_log_likelihood(logits_fn, targets_fn, variant)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  keys = jax.random.split(rng, num_examples(batch))
  return jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0))(params, batch, keys)


@functools.partial(jax.jit, static_argnames=("logits_fn", "targets_fn", "variant"))
def _chunk_square_sum(params, batch, index, valid, rng, context, *, logits_fn, targets_fn, variant):
  """sum_b valid_b * g_b^2 over the rows of one chunk (example b's key: fold_in(rng, index_b))."""
  fn = logits_fn if context is None else lambda p, b: logits_fn(p, b, context)
  log_likelihood = per_example_log_likelihood(fn, targets_fn, variant)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)
  grads = jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0))(params, batch, keys)
  return jax.tree.map(
      lambda g: jnp.tensordot(valid, jnp.square(g.astype(jnp.float32)), axes=1), grads
  )


def diagonal_fisher(
    logits_fn: LogitsFn,
    params: Any,
    data: dict[str, Any],
    targets_fn: TargetsFn,
    *,
    variant: str = "sampled",
    rng: jax.Array | None = None,
    chunk_size: int = 64,
    max_examples: int = 0,
    context: Any = None,
) -> Any:
  """The diagonal Fisher `(1/N) sum_n g_n^2` over the rows of `data` (float32, like `params`).

  Args:
    logits_fn: `(params, batch) -> logits [B, ..., C]`, deterministic (no dropout).
    params: the parameters the Fisher is taken at.
    data: pytree of arrays `[N, ...]` (numpy or jax).
    targets_fn: `batch -> labels [B, ...]` or `(labels, weights)` (weights 0 skip positions).
    variant: "sampled" or "empirical" (module docstring).
    rng: key of the sampled labels (example n uses `fold_in(rng, n)`); default `PRNGKey(0)`.
    chunk_size: rows whose per-example gradients are held at once (memory: chunk x params).
    max_examples: > 0 uses only the first that many rows.
    context: when not None, passed as `logits_fn`'s third argument (e.g. `batch_stats`), so
      one `logits_fn` serves every call: compilations are cached per (logits_fn, targets_fn,
      variant) and shapes.
  """
  check_variant(variant)
  n = num_examples(data)
  if max_examples:
    n = min(n, int(max_examples))
  if n < 1:
    raise ValueError("diagonal_fisher: `data` has no rows.")
  chunk = max(1, min(int(chunk_size), n))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  for start in range(0, n, chunk):
    index = np.arange(start, start + chunk)
    valid = (index < n).astype(np.float32)
    index = np.minimum(index, n - 1)  # padded rows repeat the last one with weight 0
    batch = jax.tree.map(lambda a: np.asarray(a)[index], data)
    sums = _chunk_square_sum(
        params,
        batch,
        index,
        valid,
        rng,
        context,
        logits_fn=logits_fn,
        targets_fn=targets_fn,
        variant=variant,
    )
    total = jax.tree.map(jnp.add, total, sums)
  return jax.tree.map(lambda t: t / n, total)


__all__ = [
    "FISHER_VARIANTS",
    "check_variant",
    "diagonal_fisher",
    "per_example_grads",
    "per_example_log_likelihood",
]
