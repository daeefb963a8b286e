"""FT-Transformer row encoder (Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data",
NeurIPS 2021); its attention, FFN and block live in `token_attention.py`.

Feature tokens (one per column, CLS first, from `FeatureTokenizer`) go through pre-norm transformer
blocks; the first block has no norm before attention (its input is the raw tokens), as in the paper
and rtdl. Each block: x = x + ResDrop(MHA(LN(x))), x = x + ResDrop(FFN(LN(x))), FFN = Linear ->
ReGLU -> FFNDrop -> Linear (or a routed MoE of such FFNs with `moe_experts > 0`), attention
dropout on the attention probabilities. The row representation
is Linear(ReLU(LN(CLS))), the rtdl head with `d_out` outputs. Unless `return_tokens=True` the last
block only computes the CLS query (rtdl's `last_layer_query_idx=[-1]`): same CLS output, less work.

CPU speed: see `token_attention.py` (fused q/k/v matmul, hash dropout, fused LayerNorm).
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

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.models.tabular.common import dense, layer_norm, prepare_features
from nexus_jax.models.tabular.feature_tokenizer import FeatureTokenizer
from nexus_jax.models.tabular.token_attention import TransformerBlock

Array = jax.Array

_SHARED = dict(n_heads=8, ffn_factor=4 / 3, residual_dropout=0.0)
FT_TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(n_blocks=1, d_token=96, attention_dropout=0.10, ffn_dropout=0.00, **_SHARED),
    "medium": dict(n_blocks=2, d_token=128, attention_dropout=0.15, ffn_dropout=0.05, **_SHARED),
    "large": dict(n_blocks=3, d_token=192, attention_dropout=0.20, ffn_dropout=0.10, **_SHARED),
}
FT_TRANSFORMER_PRESETS["default"] = FT_TRANSFORMER_PRESETS["large"]


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
    h = layer_norm("final_norm", self.dtype, self.param_dtype)(x[:, 0])
    out = dense(self.d_out, ("embed", "mlp"), "head", self.dtype, self.param_dtype)(jax.nn.relu(h))
    aux = {"cls_attention": jnp.mean(probs[:, :, 0], axis=1).reshape(*lead, -1)}
    if self.return_tokens:
      aux["tokens"] = x[:, 1:].reshape(*lead, -1, self.d_token)
    return out.reshape(*lead, self.d_out), aux
