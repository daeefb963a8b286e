"""FT-Transformer row encoder (Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data",
NeurIPS 2021) and the small transformer pieces the tabular encoders share.

Feature tokens (one per column, CLS first, from `FeatureTokenizer`) go through pre-norm transformer
blocks; the first block has no norm before attention (its input is the raw tokens), as in the paper
and rtdl. Each block: x = x + ResDrop(MHA(LN(x))), x = x + ResDrop(FFN(LN(x))), FFN = Linear ->
ReGLU -> FFNDrop -> Linear (or a routed MoE of such FFNs with `moe_experts > 0`), attention
dropout on the attention probabilities. The row representation
is Linear(ReLU(LN(CLS))), the rtdl head with `d_out` outputs. Unless `return_tokens=True` the last
block only computes the CLS query (rtdl's `last_layer_query_idx=[-1]`): same CLS output, less work.

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


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a key mask.

    __call__(x_q [N, Q, d], x_kv [N, K, d], kv_mask bool [N, K] | None) ->
      (out [N, Q, d], probs f32 [N, heads, Q, K]). Softmax in float32; masked keys get zero weight.
      Every query must see at least one unmasked key (callers keep a CLS/self key unmasked).
    """

    n_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_q: Array, x_kv: Array, kv_mask: Array | None = None,
                 *, deterministic: bool = True) -> tuple[Array, Array]:
        d = x_q.shape[-1]
        if d % self.n_heads:
            raise ValueError(f"attention width {d} is not divisible by n_heads={self.n_heads}.")
        hd = d // self.n_heads

        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral((self.n_heads, hd), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                   kernel_init=logical_init(("embed", "heads", "kv")),
                                   bias_init=logical_init(("heads", "kv"), nn.initializers.zeros))

        q_NQHD = proj("query")(x_q)
        k_NKHD = proj("key")(x_kv)
        v_NKHD = proj("value")(x_kv)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q_NQHD, k_NKHD).astype(jnp.float32) / math.sqrt(hd)
        if kv_mask is not None:
            logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        dropped = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
        out_NQHD = jnp.einsum("nhqk,nkhd->nqhd", dropped.astype(self.dtype), v_NKHD)
        out = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name="out",
                              kernel_init=logical_init(("heads", "kv", "embed")),
                              bias_init=logical_init(("embed",), nn.initializers.zeros))(out_NQHD)
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
            raise ValueError(f"FeedForward.activation={self.activation!r}; use reglu, geglu, relu or gelu.")
        h = nn.Dense(self.d_hidden * (2 if gated else 1), dtype=self.dtype, param_dtype=self.param_dtype, name="wi",
                     kernel_init=logical_init(("embed", "mlp"), nn.initializers.lecun_normal()),
                     bias_init=logical_init(("mlp",), nn.initializers.zeros))(x)
        if gated:
            a, b = jnp.split(h, 2, axis=-1)
            h = a * (jax.nn.relu(b) if self.activation == "reglu" else jax.nn.gelu(b))
        else:
            h = jax.nn.relu(h) if self.activation == "relu" else jax.nn.gelu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="wo",
                        kernel_init=logical_init(("mlp", "embed"), nn.initializers.lecun_normal()),
                        bias_init=logical_init(("embed",), nn.initializers.zeros))(h)


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
    def __call__(self, x: Array, kv_mask: Array | None = None, n_queries: int | None = None,
                 *, deterministic: bool = True) -> tuple[Array, Array]:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                scale_init=logical_init(("embed",), nn.initializers.ones),
                                bias_init=logical_init(("embed",), nn.initializers.zeros))

        h = norm("attention_norm")(x) if self.attention_norm else x
        q = h if n_queries is None else h[:, :n_queries]
        x = x if n_queries is None else x[:, :n_queries]
        a, probs = MultiHeadAttention(self.n_heads, self.attention_dropout, self.dtype, self.param_dtype,
                                      name="attention")(q, h, kv_mask, deterministic=deterministic)
        x = x + nn.Dropout(self.residual_dropout)(a, deterministic=deterministic)
        h = norm("ffn_norm")(x)
        if self.moe_experts:
            token_mask = None if kv_mask is None else kv_mask[:, : x.shape[1]]
            f, _ = MoE(self.moe_experts, self.d_ffn, min(self.moe_top_k, self.moe_experts), self.activation,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="moe")(
                h, token_mask, deterministic=deterministic)
        else:
            f = FeedForward(self.d_ffn, self.activation, self.ffn_dropout, self.dtype, self.param_dtype,
                            name="ffn")(h, deterministic=deterministic)
        x = x + nn.Dropout(self.residual_dropout)(f, deterministic=deterministic)
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
            raise ValueError(f"unknown FT-Transformer preset {preset!r}; known: {sorted(FT_TRANSFORMER_PRESETS)}.")
        return cls(**{**FT_TRANSFORMER_PRESETS[preset], **kwargs})

    @nn.compact
    def __call__(self, x_num: Array | None, x_cat: Array | None, num_missing: Array | None = None,
                 row_mask: Array | None = None, *, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
        if self.n_blocks < 1:
            raise ValueError(f"FTTransformer.n_blocks={self.n_blocks}; need at least 1 block.")
        x_num, x_cat, num_missing, lead = prepare_features(x_num, x_cat, num_missing, self.num_numeric,
                                                          len(self.cat_cardinalities))
        tokens = FeatureTokenizer(self.num_numeric, tuple(self.cat_cardinalities), self.d_token,
                                  numeric_embedding=self.numeric_embedding, cls_token=True, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="tokenizer")(x_num, x_cat, num_missing)
        x = tokens.reshape(-1, *tokens.shape[-2:]).astype(self.dtype)  # [N, 1 + F, d]
        x = nn.with_logical_constraint(x, ("batch", "feature", "embed"))
        d_ffn = int(self.d_token * self.ffn_factor)
        probs = None
        for i in range(self.n_blocks):
            last = i == self.n_blocks - 1
            x, probs = TransformerBlock(
                self.n_heads, d_ffn, self.activation, self.attention_dropout, self.ffn_dropout,
                self.residual_dropout, attention_norm=i > 0, moe_experts=self.moe_experts,
                moe_top_k=self.moe_top_k, dtype=self.dtype, param_dtype=self.param_dtype, name=f"block{i}",
            )(x, None, 1 if last and not self.return_tokens else None, deterministic=deterministic)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm",
                         scale_init=logical_init(("embed",), nn.initializers.ones),
                         bias_init=logical_init(("embed",), nn.initializers.zeros))(x[:, 0])
        out = nn.Dense(self.d_out, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                       kernel_init=logical_init(("embed", "mlp"), nn.initializers.lecun_normal()),
                       bias_init=logical_init(("mlp",), nn.initializers.zeros))(jax.nn.relu(h))
        aux = {"cls_attention": jnp.mean(probs[:, :, 0], axis=1).reshape(*lead, -1)}
        if self.return_tokens:
            aux["tokens"] = x[:, 1:].reshape(*lead, -1, self.d_token)
        return out.reshape(*lead, self.d_out), aux


def prepare_features(x_num: Array | None, x_cat: Array | None, num_missing: Array | None, n_num: int,
                    n_cat: int) -> tuple[Array, Array, Array, tuple[int, ...]]:
    """Validate (x_num [..., Fn], x_cat [..., Fc]), fill an absent side with a zero-width array and
    turn NaN numerics into (0, missing=True) so no NaN reaches a matmul (or its gradient).

    Returns (x_num f32[..., Fn], x_cat i32[..., Fc], num_missing bool[..., Fn], leading shape).
    """
    if n_num + n_cat == 0:
        raise ValueError("encoder needs at least one feature: num_numeric=0 and cat_cardinalities=().")
    ref = x_num if x_num is not None and n_num else x_cat
    if ref is None:
        raise ValueError(f"encoder got no inputs: x_num and x_cat are None (expected {n_num} numeric, {n_cat} categorical).")
    lead = tuple(ref.shape[:-1])
    x_num = jnp.zeros((*lead, 0), jnp.float32) if x_num is None else x_num
    x_cat = jnp.zeros((*lead, 0), jnp.int32) if x_cat is None else x_cat
    if tuple(x_num.shape) != (*lead, n_num) or tuple(x_cat.shape) != (*lead, n_cat):
        raise ValueError(f"encoder expected x_num [..., {n_num}] and x_cat [..., {n_cat}] with the same leading dims; "
                         f"got {tuple(x_num.shape)} and {tuple(x_cat.shape)}.")
    nan = jnp.isnan(x_num)
    num_missing = nan if num_missing is None else (num_missing.astype(bool) | nan)
    return jnp.where(nan, 0.0, x_num).astype(jnp.float32), x_cat.astype(jnp.int32), num_missing, lead
