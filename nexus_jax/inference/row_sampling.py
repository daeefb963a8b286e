"""Per-row sampling: each row of a batch with its own temperature, top-k, top-p and penalty.

`generate.Sampling` is one static setting for a whole batch (each setting compiles its own loop).
A decode engine serves requests with different settings in one jitted step, so here the settings
are arrays `[B]` (`RowSampling`) and every transform is applied per row, in `process_logits`'s
order (repetition penalty, temperature, top-k, top-p) with the same operations, so row b equals
`process_logits` with row b's `Sampling` (tested). Temperature 0 is greedy: the processed logits
are 0 at the argmax and -inf elsewhere, and its log-probability is 0.

    rows = RowSampling.of([Sampling(temperature=0.0), Sampling(temperature=0.8, top_p=0.9)])
    tokens_B, logprobs_B = sample_rows(keys_B2, logits_BV, rows, seen_BV)

`sample_rows` draws row b with `jax.random.categorical(keys[b], logits[b:b+1])`, the exact draw
`generate` makes for a single prompt with that key, so a seeded request samples the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nexus_jax.inference.generate import Sampling


class RowSampling(NamedTuple):
  """Sampling settings per row; every field `[B]`."""

  temperature: jax.Array  # float32; 0 = greedy
  top_k: jax.Array  # int32; 0 = off
  top_p: jax.Array  # float32 in (0, 1]; 1 = off
  repetition_penalty: jax.Array  # float32 > 0; 1 = off

  @classmethod
  def of(cls, settings: Sequence[Sampling]) -> "RowSampling":
    """Stacks validated `Sampling`s (one per row) into numpy arrays `[B]`."""
    col = lambda name, dtype: np.array([getattr(s, name) for s in settings], dtype)
    return cls(
        col("temperature", np.float32),
        col("top_k", np.int32),
        col("top_p", np.float32),
        col("repetition_penalty", np.float32),
    )


def _top_k(x_BV, k_B):
  """Keeps, per row, the logits >= the row's k-th largest (k = 0 or k >= V: all)."""
  v = x_BV.shape[-1]
  desc = -jnp.sort(-x_BV, axis=-1)
  kth = jnp.take_along_axis(desc, jnp.clip(k_B - 1, 0, v - 1)[:, None], -1)
  use = ((k_B > 0) & (k_B < v))[:, None]
  return jnp.where(use & (x_BV < kth), -jnp.inf, x_BV)


def _top_p(x_BV, p_B):
  """Keeps, per row, the most likely tokens until their mass reaches p (p = 1: all)."""
  order = jnp.argsort(-x_BV, axis=-1)
  sorted_p = jax.nn.softmax(jnp.take_along_axis(x_BV, order, -1), -1)
  before = jnp.cumsum(sorted_p, -1) - sorted_p  # mass of strictly more likely tokens
  keep_sorted = before < p_B[:, None]
  rows = jnp.arange(x_BV.shape[0])[:, None]
  keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
  return jnp.where((p_B < 1.0)[:, None] & ~keep, -jnp.inf, x_BV)


def process_logits_rows(logits_BV, rows: RowSampling, seen_BV=None):
  """Penalised, tempered, top-k/top-p filtered float32 logits `[B, V]` (-inf = excluded)."""
  x = logits_BV.astype(jnp.float32)
  if seen_BV is not None:

    def penalise(x):
      pen = rows.repetition_penalty[:, None]
      return jnp.where(seen_BV & (pen != 1.0), jnp.where(x > 0, x / pen, x * pen), x)

    x = lax.cond(jnp.any(rows.repetition_penalty != 1.0), penalise, lambda x: x, x)
  greedy = (rows.temperature == 0)[:, None]
  one_hot = jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=bool)
  greedy_x = jnp.where(one_hot, 0.0, -jnp.inf)
  x = x / jnp.where(greedy, 1.0, rows.temperature[:, None])
  # The sorts run only when some row asks for them (a greedy batch skips both).
  x = lax.cond(jnp.any((rows.top_k > 0) & ~greedy[:, 0]), _top_k, lambda a, _: a, x, rows.top_k)
  x = lax.cond(jnp.any((rows.top_p < 1.0) & ~greedy[:, 0]), _top_p, lambda a, _: a, x, rows.top_p)
  return jnp.where(greedy, greedy_x, x)


def sample_rows(keys_B2, logits_BV, rows: RowSampling, seen_BV=None):
  """One token per row and its log-probability under the processed distribution.

  keys_B2: one raw PRNG key per row. Returns `(tokens [B] int32, logprobs [B] float32)`.
  """
  greedy = rows.temperature == 0

  def draw(x):
    drawn = jax.vmap(lambda key, r: jax.random.categorical(key, r[None], axis=-1)[0])(keys_B2, x)
    tokens = jnp.where(greedy, jnp.argmax(x, -1), drawn).astype(jnp.int32)
    return tokens, jnp.take_along_axis(jax.nn.log_softmax(x, -1), tokens[:, None], -1)[:, 0]

  def argmax(x):  # an all-greedy batch: no draws, every log-probability 0
    return jnp.argmax(x, -1).astype(jnp.int32), jnp.zeros(x.shape[:1], jnp.float32)

  return lax.cond(jnp.all(greedy), argmax, draw, process_logits_rows(logits_BV, rows, seen_BV))
