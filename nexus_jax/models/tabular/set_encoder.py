"""Set encoder over the rows of one-to-many contexts (the "standard" encoder).

`SetEncoder` takes row representations rows [batch, M, d_in] with a row mask [batch, M] and optional
ages [batch, M] (time from the row to the target row, >= 0, any fixed unit), adds a recency
encoding of log1p(age), prepends a learned CLS token and runs pre-norm transformer blocks with
masked attention. Without ages it has no positional information, so the pooled output is invariant
to the order of the rows. The CLS token never is masked: a context with no valid rows yields a
finite, learned "empty context" representation. Masked rows never influence valid ones (masked
keys get zero attention weight and their inputs are zeroed first, so even NaN padding is harmless);
their own per-row outputs are set to 0.

`StandardEncoder` is the registry's "standard" table encoder: it tokenizes each row's raw features
(`FeatureTokenizer`, no CLS), flattens the tokens, projects them to `d_model` and applies `SetEncoder`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.models.tabular.feature_tokenizer import FeatureTokenizer
from nexus_jax.models.tabular.common import dense, layer_norm, logical_init, prepare_features
from nexus_jax.models.tabular.token_attention import TransformerBlock

Array = jax.Array


def recency_features(ages: Array, n_frequencies: int) -> Array:
  """Fixed recency features of ages [...] -> [..., 1 + 2 * n_frequencies].

  t = log1p(max(age, 0)); features [t, sin(w_j t), cos(w_j t)] with w_j geometric in [1/4, 8].
  """
  t = jnp.log1p(jnp.maximum(ages.astype(jnp.float32), 0.0))[..., None]
  w = jnp.asarray(np.geomspace(0.25, 8.0, n_frequencies), jnp.float32)
  return jnp.concatenate([t, jnp.sin(t * w), jnp.cos(t * w)], axis=-1)


class SetEncoder(nn.Module):
  """Masked transformer over a set/sequence of rows.

  __call__(rows [B, M, d_in], row_mask bool [B, M], ages [B, M] | None, deterministic) ->
    (pooled [B, d_out], aux) with aux["rows"] [B, M, d_out] (0 on masked rows),
    aux["attention"] f32 [B, M] (last block's CLS attention over the rows, averaged over heads;
    0 on masked rows) and aux["empty"] bool [B] (no valid row).
  """

  d_model: int = 64
  d_out: int = 64
  n_blocks: int = 2
  n_heads: int = 4
  ffn_factor: float = 4 / 3
  activation: str = "reglu"
  attention_dropout: float = 0.1
  ffn_dropout: float = 0.05
  residual_dropout: float = 0.0
  use_ages: bool = True
  n_age_frequencies: int = 8
  moe_experts: int = 0  # > 0: MoE feed-forward in every block (masked rows are not routed)
  moe_top_k: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, rows: Array, row_mask: Array, ages: Array | None = None, *, deterministic: bool = True
  ) -> tuple[Array, dict[str, Array]]:
    chex.assert_rank(rows, 3)
    b, m, _ = rows.shape
    chex.assert_shape(row_mask, (b, m))
    row_mask = row_mask.astype(bool)
    rows = jnp.where(row_mask[..., None], rows, 0).astype(self.dtype)
    x = dense(self.d_model, ("mlp", "embed"), "in_proj", self.dtype, self.param_dtype)(rows)
    if self.use_ages:  # params exist whether or not this call has ages, so one init serves both
      n_rec = 1 + 2 * self.n_age_frequencies
      w_rec = self.param(
          "recency_kernel",
          logical_init(("feature", "embed"), nn.initializers.lecun_normal()),
          (n_rec, self.d_model),
          self.param_dtype,
      )
      b_rec = self.param(
          "recency_bias",
          logical_init(("embed",), nn.initializers.zeros),
          (self.d_model,),
          self.param_dtype,
      )
      if ages is not None:
        chex.assert_shape(ages, (b, m))
        feats = recency_features(jnp.where(row_mask, ages, 0.0), self.n_age_frequencies).astype(
            self.dtype
        )
        x = x + feats @ w_rec.astype(self.dtype) + b_rec.astype(self.dtype)
    cls = self.param(
        "cls",
        logical_init(("embed",), nn.initializers.normal(0.02)),
        (self.d_model,),
        self.param_dtype,
    )
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.d_model)), x], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    kv_mask = jnp.concatenate([jnp.ones((b, 1), bool), row_mask], axis=1)  # [B, 1 + M]
    probs = None
    for i in range(self.n_blocks):
      x, probs = TransformerBlock(
          self.n_heads,
          int(self.d_model * self.ffn_factor),
          self.activation,
          self.attention_dropout,
          self.ffn_dropout,
          self.residual_dropout,
          attention_norm=True,
          moe_experts=self.moe_experts,
          moe_top_k=self.moe_top_k,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block{i}",
      )(x, kv_mask, deterministic=deterministic)
    x = layer_norm("final_norm", self.dtype, self.param_dtype)(x)
    y = dense(self.d_out, ("embed", "mlp"), "out_proj", self.dtype, self.param_dtype)(x)
    aux = {
        "rows": jnp.where(row_mask[..., None], y[:, 1:], 0),
        "attention": jnp.mean(probs[:, :, 0, 1:], axis=1) if self.n_blocks else jnp.zeros((b, m)),
        "empty": ~jnp.any(row_mask, axis=1),
    }
    return y[:, 0], aux


class StandardEncoder(nn.Module):
  """The "standard" table encoder: rows of a one-to-many context -> one pooled representation.

  Inputs: x_num f32[B, M, Fn], x_cat i32[B, M, Fc], num_missing bool[B, M, Fn] | None,
  row_mask bool[B, M] | None (None = all valid), ages [B, M] | None. Inputs with one leading dim
  ([B, F]: a one-to-one table) are treated as M = 1 valid row.
  Returns (pooled [B, d_out], aux) with SetEncoder's aux (rows [B, M, d_out], attention, empty).
  """

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 64
  d_token: int = 16
  d_model: int = 64
  n_blocks: int = 2
  n_heads: int = 4
  ffn_factor: float = 4 / 3
  attention_dropout: float = 0.1
  ffn_dropout: float = 0.05
  residual_dropout: float = 0.0
  numeric_embedding: str = "linear"  # "linear" | "plr"
  use_ages: bool = True
  moe_experts: int = 0
  moe_top_k: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  pools_rows: ClassVar[bool] = True

  @nn.compact
  def __call__(
      self,
      x_num: Array | None,
      x_cat: Array | None,
      num_missing: Array | None = None,
      row_mask: Array | None = None,
      ages: Array | None = None,
      *,
      deterministic: bool = True,
  ) -> tuple[Array, dict[str, Array]]:
    x_num, x_cat, num_missing, lead = prepare_features(
        x_num, x_cat, num_missing, self.num_numeric, len(self.cat_cardinalities)
    )
    if len(lead) == 1:  # one row per example
      x_num, x_cat = x_num[:, None], x_cat[:, None]
      num_missing = num_missing[:, None]
      row_mask = None if row_mask is None else row_mask[:, None]
      ages = None if ages is None else ages[:, None]
    elif len(lead) != 2:
      raise ValueError(
          f"StandardEncoder expects inputs [batch, rows, F] or [batch, F]; got leading dims {lead}."
      )
    b, m = x_num.shape[:2]
    row_mask = jnp.ones((b, m), bool) if row_mask is None else row_mask.astype(bool)
    tokens = FeatureTokenizer(
        self.num_numeric,
        tuple(self.cat_cardinalities),
        self.d_token,
        numeric_embedding=self.numeric_embedding,
        cls_token=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="tokenizer",
    )(x_num, x_cat, num_missing)
    rows = jax.nn.relu(
        dense(self.d_model, ("feature", "mlp"), "row_proj", self.dtype, self.param_dtype)(
            tokens.reshape(b, m, -1).astype(self.dtype)
        )
    )
    return SetEncoder(
        self.d_model,
        self.d_out,
        self.n_blocks,
        self.n_heads,
        self.ffn_factor,
        "reglu",
        self.attention_dropout,
        self.ffn_dropout,
        self.residual_dropout,
        self.use_ages,
        moe_experts=self.moe_experts,
        moe_top_k=self.moe_top_k,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="set_encoder",
    )(rows, row_mask, ages, deterministic=deterministic)
