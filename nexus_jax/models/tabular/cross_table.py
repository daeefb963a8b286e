"""Cross-table building blocks of NexusFormer: attention pooling of history rows and the recycled
cross-table transformer block.

- `ContextPooling`: rows [B, M, d] of one history context -> one token [B, d] (masked attention with a
  target-conditioned query, recency features of the rows' ages, set statistics, learned empty token).
- `cross_table_block`: the shared pre-norm `TransformerBlock` of `token_attention.py` (the
  FT-Transformer's attention and ReGLU FFN) configured for table tokens [B, T, d] with a key mask.
- `CrossTableRefiner`: R shared-weight applications of one such block with recycling and
  per-example convergence stopping at inference.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.models.tabular.common import MASK_VALUE, dense, layer_norm, logical_init
from nexus_jax.models.tabular.set_encoder import recency_features
from nexus_jax.models.tabular.token_attention import TransformerBlock

Array = jax.Array


class ContextPooling(nn.Module):
  """Masked attention pooling of one history context.

  __call__(rows [B, M, d], mask bool [B, M], ages f32[B, M] (>= 0), query [B, d]) ->
    (pooled [B, d], weights f32[B, M]); weights are the head-averaged attention (0 on masked rows);
    a context without valid rows yields the learned `empty` token and zero weights.
  """

  d_model: int
  n_heads: int = 2
  n_age_frequencies: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows: Array, mask: Array, ages: Array, query: Array) -> tuple[Array, Array]:
    b, m, d = rows.shape
    if d % self.n_heads:
      raise ValueError(
          f"ContextPooling: d_model={d} is not divisible by pool_heads={self.n_heads}."
      )
    hd, dt, pdt = d // self.n_heads, self.dtype, self.param_dtype
    mask = mask.astype(bool)
    ages = jnp.where(mask, jnp.maximum(ages.astype(jnp.float32), 0.0), 0.0)
    recency = recency_features(ages, self.n_age_frequencies).astype(dt)  # [B, M, 1 + 2K]
    # Keys = values = rows + recency, split into heads: no per-row projection (rows are many).
    keys = jnp.where(mask[..., None], rows.astype(dt), 0) + dense(
        d, ("feature", "embed"), "recency", dt, pdt
    )(recency)
    k = keys.reshape(b, m, self.n_heads, hd)
    q = dense(d, ("embed", "mlp"), "query", dt, pdt)(query.astype(dt)).reshape(b, self.n_heads, hd)
    logits = jnp.einsum("bhd,bmhd->bhm", q, k).astype(jnp.float32) / np.sqrt(hd)
    logits = jnp.where(mask[:, None, :], logits, MASK_VALUE)
    probs = jnp.where(mask[:, None, :], jax.nn.softmax(logits, axis=-1), 0.0)  # [B, H, M]
    pooled = jnp.einsum("bhm,bmhd->bhd", probs.astype(dt), k).reshape(b, d)
    # Set statistics: share of slots filled, mean / min / max of log1p(age) over valid rows.
    n = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)
    t = jnp.log1p(ages)
    mean_t = jnp.sum(t, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
    min_t = jnp.min(jnp.where(mask, t, jnp.inf), axis=1, keepdims=True)
    max_t = jnp.max(jnp.where(mask, t, -jnp.inf), axis=1, keepdims=True)
    stats = jnp.concatenate(
        [n / m, mean_t, jnp.where(n > 0, min_t, 0.0), jnp.where(n > 0, max_t, 0.0)], -1
    )
    pooled = dense(d, ("embed", "mlp"), "out", dt, pdt)(pooled) + dense(
        d, ("feature", "mlp"), "stats", dt, pdt
    )(stats.astype(dt))
    empty = self.param("empty", logical_init(("embed",), nn.initializers.normal(0.02)), (d,), pdt)
    pooled = jnp.where(n > 0, pooled, empty.astype(dt))
    return pooled, jnp.mean(probs, axis=1)


def cross_table_block(
    n_heads: int,
    d_ffn: int,
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> TransformerBlock:
  """The cross-table block: `TransformerBlock` with pre-norm attention, ReGLU FFN of width `d_ffn`,
  `attention_dropout` on the attention probabilities and `dropout` on the FFN hidden units and both
  residual branches.

  block(x [B, T, d], kv_mask bool [B, T], deterministic=...) -> (x [B, T, d], probs f32[B, H, T, T]).
  Masked keys get zero attention weight; every query needs one unmasked key (the target token).
  Params: attention_norm, attention/{query, key, value, out}, ffn_norm, ffn/{wi, wo}.
  """
  return TransformerBlock(
      n_heads,
      d_ffn,
      "reglu",
      attention_dropout=attention_dropout,
      ffn_dropout=dropout,
      residual_dropout=dropout,
      attention_norm=True,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
  )


class CrossTableRefiner(nn.Module):
  """R shared-weight iterations of one `cross_table_block` over tokens x0 [B, T, d] with key mask [B, T].

  __call__(x0, token_mask, deterministic) -> (x [B, T, d], probs f32[B, heads, T, T], iterations
  i32[B], change f32[B]). Training (or init) runs exactly `iterations` steps. At inference with
  `convergence_tol > 0` it runs up to `max_iterations` (default `iterations`) and freezes each
  example once the relative change of its tokens, ||x_r - x_{r-1}|| / ||x_{r-1}||, is below the
  tolerance; the loop ends when every example of the batch is frozen.
  """

  d_model: int
  n_heads: int = 4
  d_ffn: int = 64
  attention_dropout: float = 0.0
  dropout: float = 0.0
  iterations: int = 2
  max_iterations: int = 0
  convergence_tol: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.block = cross_table_block(
        self.n_heads,
        self.d_ffn,
        self.attention_dropout,
        self.dropout,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    self.recycle_norm = layer_norm("recycle_norm", self.dtype, self.param_dtype)
    self.recycle = dense(
        self.d_model,
        ("embed", "mlp"),
        "recycle",
        self.dtype,
        self.param_dtype,
        init=nn.initializers.zeros,
    )

  def step(
      self, x0: Array, x: Array, token_mask: Array, deterministic: bool
  ) -> tuple[Array, Array]:
    return self.block(
        x0 + self.recycle(self.recycle_norm(x)), token_mask, deterministic=deterministic
    )

  @staticmethod
  def relative_change(new: Array, old: Array) -> Array:
    """||new - old|| / ||old|| per example, f32[B]."""
    diff = jnp.sum(jnp.square((new - old).astype(jnp.float32)), axis=(1, 2))
    return jnp.sqrt(
        diff / jnp.maximum(jnp.sum(jnp.square(old.astype(jnp.float32)), axis=(1, 2)), 1e-12)
    )

  def __call__(self, x0: Array, token_mask: Array, *, deterministic: bool = True):
    if self.iterations < 1:
      raise ValueError(f"refine_iterations={self.iterations}; need at least 1.")
    b = x0.shape[0]
    x, probs = self.step(x0, jnp.zeros_like(x0), token_mask, deterministic)
    change = jnp.full((b,), jnp.inf, jnp.float32)
    adaptive = deterministic and self.convergence_tol > 0 and not self.is_initializing()
    if not adaptive:
      for _ in range(self.iterations - 1):
        y, probs = self.step(x0, x, token_mask, deterministic)
        change, x = self.relative_change(y, x), y
      return x, probs, jnp.full((b,), self.iterations, jnp.int32), change
    limit = max(self.max_iterations or self.iterations, 1)

    def cond_fn(mdl, carry):
      it, _, _, done, _, _ = carry
      return (it < limit) & ~jnp.all(done)

    def body_fn(mdl, carry):
      it, x, probs, done, iters, change = carry
      y, p = mdl.step(x0, x, token_mask, True)
      c = mdl.relative_change(y, x)
      keep = done[:, None, None]
      return (
          it + 1,
          jnp.where(keep, x, y),
          jnp.where(keep[..., None], probs, p),
          done | (c < self.convergence_tol),
          jnp.where(done, iters, it + 1),
          jnp.where(done, change, c),
      )

    carry = (
        jnp.ones((), jnp.int32),
        x,
        probs,
        jnp.zeros((b,), bool),
        jnp.ones((b,), jnp.int32),
        change,
    )
    _, x, probs, _, iters, change = nn.while_loop(cond_fn, body_fn, self, carry)
    return x, probs, iters, change
