"""Attention over tokens, as in FT-Transformer: multi-head attention with a key mask, the position-wise
feed-forward and the pre-norm transformer block built from them. Used by the FT-Transformer (feature
tokens), the set encoder (history rows) and NexusFormer's cross-table block (table tokens).

- `MultiHeadAttention(n_heads)`: (x_q [N, Q, d], x_kv [N, K, d], kv_mask bool [N, K]) ->
  (out [N, Q, d], probs f32[N, heads, Q, K]); masked keys get the logit `common.MASK_VALUE`.
- `FeedForward(d_hidden, activation)`: [..., d] -> [..., d]; ReGLU / GEGLU / ReLU / GELU.
- `TransformerBlock(n_heads, d_ffn)`: x = x + ResDrop(MHA(LN(x))), x = x + ResDrop(FFN(LN(x)));
  (x [N, T, d], kv_mask [N, T]) -> (x [N, Q, d], probs f32[N, heads, Q, T]).

CPU speed (benchmarks/tabular_vs_rtdl.py): q/k/v come from one matmul against the stacked kernels,
dropout masks come from an 8-bit integer hash (`common.HashDropout`) instead of threefry uniforms,
LayerNorm is written so XLA fuses it, and every projection is a plain 2-D matmul on [tokens, d]
(XLA:CPU then computes the weight gradients without a transposing copy; -11% CPU per step);
params keep the layout and names of separate projections.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers.moe import MoE
from nexus_jax.models.tabular.common import (
    MASK_VALUE,
    HashDropout,
    dense,
    layer_norm,
    logical_init,
)

Array = jax.Array


class HeadProjection(nn.Module):
  """Parameters of one attention projection, created at their full rank so logical names fit.

  `nn.DenseGeneral` creates a flattened kernel and reshapes it, which breaks the logical sharding
  constraint under a mesh; this holder creates kernel `kernel_shape` (xavier-uniform over
  `fan_axes`) and bias `kernel_shape[bias_from:]` directly. __call__() -> (kernel, bias).
  """

  kernel_shape: tuple[int, ...]
  kernel_names: tuple[str, ...]
  fan_axes: tuple[tuple[int, ...], tuple[int, ...]]  # (in axes, out axes) of the kernel
  bias_from: int  # the bias has the kernel's trailing dims from this axis on
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    fan_in, fan_out = self.fan_axes
    init = nn.initializers.xavier_uniform(in_axis=fan_in, out_axis=fan_out)
    kernel = self.param(
        "kernel", logical_init(self.kernel_names, init), self.kernel_shape, self.param_dtype
    )
    bias = self.param(
        "bias",
        logical_init(self.kernel_names[self.bias_from :], nn.initializers.zeros),
        self.kernel_shape[self.bias_from :],
        self.param_dtype,
    )
    return kernel, bias


class MultiHeadAttention(nn.Module):
  """Multi-head attention with a key mask.

  __call__(x_q [N, Q, d], x_kv [N, K, d], kv_mask bool [N, K] | None) ->
    (out [N, Q, d], probs f32 [N, heads, Q, K]). Softmax in float32; masked keys get zero weight.
    Every query must see at least one unmasked key (callers keep a CLS/self key unmasked).

  Params: query/key/value {kernel [d, heads, head_dim], bias [heads, head_dim]} and out {kernel
  [heads, head_dim, d], bias [d]}. The projections run as ONE matmul against the stacked kernels
  (q, k and v when `x_q is x_kv`, i.e. self-attention; k and v otherwise), which on a CPU is
  markedly faster than three small ones.
  """

  n_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x_q: Array, x_kv: Array, kv_mask: Array | None = None, *, deterministic: bool = True
  ) -> tuple[Array, Array]:
    d = x_q.shape[-1]
    if d % self.n_heads:
      raise ValueError(f"attention width {d} is not divisible by n_heads={self.n_heads}.")
    h, hd = self.n_heads, d // self.n_heads

    def proj(name: str) -> tuple[Array, Array]:
      return HeadProjection(
          (d, h, hd), ("embed", "heads", "kv"), ((0,), (1, 2)), 1, self.param_dtype, name=name
      )()

    (wq, bq), (wk, bk), (wv, bv) = proj("query"), proj("key"), proj("value")
    wq = wq / math.sqrt(hd)  # fold the logit scale into q (the stored params are unscaled)
    bq = bq / math.sqrt(hd)
    if x_q is x_kv:
      w_DCHK, b_CHK = jnp.stack([wq, wk, wv], axis=1), jnp.stack([bq, bk, bv])
      n_, t_ = x_q.shape[:2]
      qkv = x_q.reshape(n_ * t_, d).astype(self.dtype) @ w_DCHK.reshape(d, 3 * d).astype(self.dtype)
      qkv = qkv.reshape(n_, t_, 3, h, hd) + b_CHK.astype(self.dtype)
      q_NQHK, k_NKHK, v_NKHK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q_NQHK = jnp.einsum(
          "nqd,dhk->nqhk", x_q.astype(self.dtype), wq.astype(self.dtype)
      ) + bq.astype(self.dtype)
      w_DCHK, b_CHK = jnp.stack([wk, wv], axis=1), jnp.stack([bk, bv])
      n_, t_ = x_kv.shape[:2]
      kv = x_kv.reshape(n_ * t_, d).astype(self.dtype) @ w_DCHK.reshape(d, 2 * d).astype(self.dtype)
      kv = kv.reshape(n_, t_, 2, h, hd) + b_CHK.astype(self.dtype)
      k_NKHK, v_NKHK = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("nqhk,nthk->nhqt", q_NQHK, k_NKHK).astype(jnp.float32)
    if kv_mask is not None:
      logits = jnp.where(kv_mask[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    dropped = HashDropout(self.dropout)(probs, deterministic=deterministic)
    out_NQHK = jnp.einsum("nhqt,nthk->nqhk", dropped.astype(self.dtype), v_NKHK)
    wo, bo = HeadProjection(
        (h, hd, d), ("heads", "kv", "embed"), ((0, 1), (2,)), 2, self.param_dtype, name="out"
    )()
    nq = out_NQHK.shape[:2]
    out = (out_NQHK.reshape(-1, d) @ wo.reshape(d, d).astype(self.dtype)).reshape(
        *nq, d
    ) + bo.astype(self.dtype)
    return out, probs


class FeedForward(nn.Module):
  """Position-wise FFN [..., d] -> [..., d]: Linear(d -> h or 2h) -> act -> dropout -> Linear(h -> d).

  activation: "reglu" (a * relu(b), the paper's), "geglu", "relu" or "gelu".
  """

  d_hidden: int
  activation: str = "reglu"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    gated = self.activation in ("reglu", "geglu")
    if self.activation not in ("reglu", "geglu", "relu", "gelu"):
      raise ValueError(
          f"FeedForward.activation={self.activation!r}; use reglu, geglu, relu or gelu."
      )
    h = dense(
        self.d_hidden * (2 if gated else 1), ("embed", "mlp"), "wi", self.dtype, self.param_dtype
    )(x)
    if gated:
      a, b = jnp.split(h, 2, axis=-1)
      h = a * (jax.nn.relu(b) if self.activation == "reglu" else jax.nn.gelu(b))
    else:
      h = jax.nn.relu(h) if self.activation == "relu" else jax.nn.gelu(h)
    h = HashDropout(self.dropout)(h, deterministic=deterministic)
    return dense(x.shape[-1], ("mlp", "embed"), "wo", self.dtype, self.param_dtype)(h)


class TransformerBlock(nn.Module):
  """Pre-norm block over tokens x [N, T, d] with key mask [N, T] -> [N, Q, d].

  `attention_norm=False` skips the LayerNorm before attention (FT-Transformer's first block).
  `n_queries` keeps only the first n_queries tokens as queries (and outputs), e.g. 1 for CLS only.
  `moe_experts > 0` replaces the dense FFN by `nexus_jax.layers.moe.MoE` (top-`moe_top_k`
  dropless routing, same activation and hidden width per expert; no hidden dropout); its load
  balance and router z-losses are sown into "aux_loss"; masked tokens are left out of routing.
  Returns (x_out [N, Q, d], attention probs f32 [N, heads, Q, T]).
  """

  n_heads: int
  d_ffn: int
  activation: str = "reglu"
  attention_dropout: float = 0.0
  ffn_dropout: float = 0.0
  residual_dropout: float = 0.0
  attention_norm: bool = True
  moe_experts: int = 0
  moe_top_k: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Array,
      kv_mask: Array | None = None,
      n_queries: int | None = None,
      *,
      deterministic: bool = True,
  ) -> tuple[Array, Array]:
    norm = lambda name: layer_norm(name, self.dtype, self.param_dtype)  # noqa: E731
    h = norm("attention_norm")(x) if self.attention_norm else x
    q = h if n_queries is None else h[:, :n_queries]
    x = x if n_queries is None else x[:, :n_queries]
    a, probs = MultiHeadAttention(
        self.n_heads, self.attention_dropout, self.dtype, self.param_dtype, name="attention"
    )(q, h, kv_mask, deterministic=deterministic)
    x = x + HashDropout(self.residual_dropout)(a, deterministic=deterministic)
    h = norm("ffn_norm")(x)
    if self.moe_experts:
      token_mask = None if kv_mask is None else kv_mask[:, : x.shape[1]]
      f, _ = MoE(
          self.moe_experts,
          self.d_ffn,
          min(self.moe_top_k, self.moe_experts),
          self.activation,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="moe",
      )(h, token_mask, deterministic=deterministic)
    else:
      f = FeedForward(
          self.d_ffn, self.activation, self.ffn_dropout, self.dtype, self.param_dtype, name="ffn"
      )(h.reshape(-1, h.shape[-1]), deterministic=deterministic).reshape(h.shape)
    x = x + HashDropout(self.residual_dropout)(f, deterministic=deterministic)
    return x, probs
