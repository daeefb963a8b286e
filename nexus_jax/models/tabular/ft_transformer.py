"""FT-Transformer row encoder (Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data",
NeurIPS 2021) and the small transformer pieces the tabular encoders share.

Feature tokens (one per column, CLS first, from `FeatureTokenizer`) go through pre-norm transformer
blocks; the first block has no norm before attention (its input is the raw tokens), as in the paper
and rtdl. Each block: x = x + ResDrop(MHA(LN(x))), x = x + ResDrop(FFN(LN(x))), FFN = Linear ->
ReGLU -> FFNDrop -> Linear (or a routed MoE of such FFNs with `moe_experts > 0`), attention
dropout on the attention probabilities. The row representation
is Linear(ReLU(LN(CLS))), the rtdl head with `d_out` outputs. Unless `return_tokens=True` the last
block only computes the CLS query (rtdl's `last_layer_query_idx=[-1]`): same CLS output, less work.

CPU speed (benchmarks/tabular_vs_rtdl.py): q/k/v come from one matmul against the stacked kernels,
dropout masks come from an 8-bit integer hash (`HashDropout`) instead of threefry uniforms, and
LayerNorm is written so XLA fuses it, and every projection is a plain 2-D matmul on [tokens, d]
(XLA:CPU then computes the weight gradients without a transposing copy; -11% CPU per step);
params keep the layout and names of separate projections.
bfloat16 compute does not pay on a CPU without bf16 matmul units (AVX2 only): XLA converts to f32.

Presets are rtdl's `get_default_transformer_config(n_blocks)` (8 heads, FFN hidden = 4/3 d_token,
ReGLU, residual dropout 0.0, paper's optimizer AdamW lr 1e-4, wd 1e-5):

    preset   n_blocks  d_token  attention_dropout  ffn_dropout
    small        1        96          0.10             0.00
    medium       2       128          0.15             0.05
    large        3       192          0.20             0.10     <- the paper's "default" FT-Transformer

The class field defaults are the "large"/default configuration.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers.moe import MoE
from nexus_jax.models.tabular.feature_tokenizer import FeatureTokenizer

Array = jax.Array

_SHARED = dict(n_heads=8, ffn_factor=4 / 3, residual_dropout=0.0)
FT_TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(n_blocks=1, d_token=96, attention_dropout=0.10, ffn_dropout=0.00, **_SHARED),
    "medium": dict(n_blocks=2, d_token=128, attention_dropout=0.15, ffn_dropout=0.05, **_SHARED),
    "large": dict(n_blocks=3, d_token=192, attention_dropout=0.20, ffn_dropout=0.10, **_SHARED),
}
FT_TRANSFORMER_PRESETS["default"] = FT_TRANSFORMER_PRESETS["large"]


def logical_init(axes: tuple[str | None, ...], init=None):
  """`init` (default xavier-uniform) boxed with logical axis names for `train/sharding.py`."""
  return nn.with_logical_partitioning(init or nn.initializers.xavier_uniform(), axes)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis [..., d] -> [..., d]: params scale [d], bias [d] (as `nn.LayerNorm`).

  Statistics in float32. Written as ((x - mean) * rsqrt(var + eps)) * scale + bias so XLA fuses it
  into one elementwise pass; `nn.LayerNorm` first multiplies rsqrt by scale, which materialises a
  [..., d] array that the backward pass reads again (~4% of an FT-Transformer training step on a CPU).
  """

  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param(
        "scale", logical_init(("embed",), nn.initializers.ones), (d,), self.param_dtype
    )
    bias = self.param(
        "bias", logical_init(("embed",), nn.initializers.zeros), (d,), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32
    )
    return y.astype(self.dtype)


class HashDropout(nn.Module):
  """Inverted dropout whose mask costs about one elementwise pass (`nn.Dropout`'s costs ~8x that on a CPU).

  `nn.Dropout` draws one threefry uniform per element, which on a CPU costs more than the matmul
  it regularises (a 13M-element attention-probability mask: ~420 ms vs ~55 ms here). Here each
  element gets 8 random bits from a murmur3-style integer hash of its index, keyed by 64 bits
  drawn from the "dropout" rng stream (so the mask is a pure function of the rng, as with
  `nn.Dropout`). The kept fraction is `round((1 - rate) * 256) / 256` (rate 0.2 -> 0.1992) and
  kept values are scaled by its inverse, so the expectation is unchanged. Rates within 1/512
  of 0 or 1 fall back to `nn.Dropout` (8 bits cannot express them).
  """

  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = round((1.0 - self.rate) * 256)
    if not 0 < keep < 256:  # rate < 1/512 or > 1 - 1/512: 8 bits cannot express it
      return nn.Dropout(self.rate)(x, deterministic=False)
    seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    size = math.prod(x.shape)
    h = jax.lax.iota(jnp.uint32, -(-size // 4)) * jnp.uint32(0x9E3779B9) + seed[0]
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = ((h ^ (h >> 16)) ^ seed[1]) * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 15)
    bits = jax.lax.bitcast_convert_type(h, jnp.uint8).reshape(-1)[:size].reshape(x.shape)
    return jnp.where(bits < keep, x * jnp.asarray(256.0 / keep, x.dtype), jnp.zeros((), x.dtype))


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
      logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
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
    h = nn.Dense(
        self.d_hidden * (2 if gated else 1),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="wi",
        kernel_init=logical_init(("embed", "mlp"), nn.initializers.lecun_normal()),
        bias_init=logical_init(("mlp",), nn.initializers.zeros),
    )(x)
    if gated:
      a, b = jnp.split(h, 2, axis=-1)
      h = a * (jax.nn.relu(b) if self.activation == "reglu" else jax.nn.gelu(b))
    else:
      h = jax.nn.relu(h) if self.activation == "relu" else jax.nn.gelu(h)
    h = HashDropout(self.dropout)(h, deterministic=deterministic)
    return nn.Dense(
        x.shape[-1],
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="wo",
        kernel_init=logical_init(("mlp", "embed"), nn.initializers.lecun_normal()),
        bias_init=logical_init(("embed",), nn.initializers.zeros),
    )(h)


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
    def norm(name: str) -> LayerNorm:
      return LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

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


class FTTransformer(nn.Module):
  """FT-Transformer: row features -> row representation.

  Inputs: x_num f32[..., Fn], x_cat i32[..., Fc] (codes, 0 missing / 1 unknown / >= 2 real;
  cardinalities count all codes), num_missing bool[..., Fn] | None; leading dims [...] are [batch]
  or [batch, rows]. `row_mask` is accepted for interface parity and unused (rows are independent).

  Returns (out f32[..., d_out], aux) with aux["cls_attention"] f32[..., 1 + F]: the last block's
  CLS attention averaged over heads (index 0 is CLS itself; a per-row feature-importance signal),
  and with `return_tokens=True` aux["tokens"] f32[..., F, d_token]: the final feature tokens.
  """

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 64
  n_blocks: int = 3
  d_token: int = 192
  n_heads: int = 8
  ffn_factor: float = 4 / 3
  activation: str = "reglu"
  attention_dropout: float = 0.2
  ffn_dropout: float = 0.1
  residual_dropout: float = 0.0
  numeric_embedding: str = "linear"  # "linear" | "plr"
  return_tokens: bool = False
  moe_experts: int = 0  # > 0: MoE feed-forward in every block
  moe_top_k: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  pools_rows: ClassVar[bool] = False

  @classmethod
  def from_preset(cls, preset: str, **kwargs: Any) -> "FTTransformer":
    """FTTransformer with a preset's sizes ("small", "medium", "large"/"default"); kwargs override."""
    if preset not in FT_TRANSFORMER_PRESETS:
      raise ValueError(
          f"unknown FT-Transformer preset {preset!r}; known: {sorted(FT_TRANSFORMER_PRESETS)}."
      )
    return cls(**{**FT_TRANSFORMER_PRESETS[preset], **kwargs})

  @nn.compact
  def __call__(
      self,
      x_num: Array | None,
      x_cat: Array | None,
      num_missing: Array | None = None,
      row_mask: Array | None = None,
      *,
      deterministic: bool = True,
  ) -> tuple[Array, dict[str, Array]]:
    if self.n_blocks < 1:
      raise ValueError(f"FTTransformer.n_blocks={self.n_blocks}; need at least 1 block.")
    x_num, x_cat, num_missing, lead = prepare_features(
        x_num, x_cat, num_missing, self.num_numeric, len(self.cat_cardinalities)
    )
    tokens = FeatureTokenizer(
        self.num_numeric,
        tuple(self.cat_cardinalities),
        self.d_token,
        numeric_embedding=self.numeric_embedding,
        cls_token=True,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="tokenizer",
    )(x_num, x_cat, num_missing)
    x = tokens.reshape(-1, *tokens.shape[-2:]).astype(self.dtype)  # [N, 1 + F, d]
    x = nn.with_logical_constraint(x, ("batch", "feature", "embed"))
    d_ffn = int(self.d_token * self.ffn_factor)
    probs = None
    for i in range(self.n_blocks):
      last = i == self.n_blocks - 1
      x, probs = TransformerBlock(
          self.n_heads,
          d_ffn,
          self.activation,
          self.attention_dropout,
          self.ffn_dropout,
          self.residual_dropout,
          attention_norm=i > 0,
          moe_experts=self.moe_experts,
          moe_top_k=self.moe_top_k,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block{i}",
      )(x, None, 1 if last and not self.return_tokens else None, deterministic=deterministic)
    h = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x[:, 0])
    out = nn.Dense(
        self.d_out,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
        kernel_init=logical_init(("embed", "mlp"), nn.initializers.lecun_normal()),
        bias_init=logical_init(("mlp",), nn.initializers.zeros),
    )(jax.nn.relu(h))
    aux = {"cls_attention": jnp.mean(probs[:, :, 0], axis=1).reshape(*lead, -1)}
    if self.return_tokens:
      aux["tokens"] = x[:, 1:].reshape(*lead, -1, self.d_token)
    return out.reshape(*lead, self.d_out), aux


def prepare_features(
    x_num: Array | None, x_cat: Array | None, num_missing: Array | None, n_num: int, n_cat: int
) -> tuple[Array, Array, Array, tuple[int, ...]]:
  """Validate (x_num [..., Fn], x_cat [..., Fc]), fill an absent side with a zero-width array and
  turn NaN numerics into (0, missing=True) so no NaN reaches a matmul (or its gradient).

  Returns (x_num f32[..., Fn], x_cat i32[..., Fc], num_missing bool[..., Fn], leading shape).
  """
  if n_num + n_cat == 0:
    raise ValueError("encoder needs at least one feature: num_numeric=0 and cat_cardinalities=().")
  ref = x_num if x_num is not None and n_num else x_cat
  if ref is None:
    raise ValueError(
        f"encoder got no inputs: x_num and x_cat are None (expected {n_num} numeric, {n_cat} categorical)."
    )
  lead = tuple(ref.shape[:-1])
  x_num = jnp.zeros((*lead, 0), jnp.float32) if x_num is None else x_num
  x_cat = jnp.zeros((*lead, 0), jnp.int32) if x_cat is None else x_cat
  if tuple(x_num.shape) != (*lead, n_num) or tuple(x_cat.shape) != (*lead, n_cat):
    raise ValueError(
        f"encoder expected x_num [..., {n_num}] and x_cat [..., {n_cat}] with the same leading dims; "
        f"got {tuple(x_num.shape)} and {tuple(x_cat.shape)}."
    )
  nan = jnp.isnan(x_num)
  num_missing = nan if num_missing is None else (num_missing.astype(bool) | nan)
  return jnp.where(nan, 0.0, x_num).astype(jnp.float32), x_cat.astype(jnp.int32), num_missing, lead
