"""MLP-family row encoders: MLP, ResNet-MLP (Gorishniy et al. 2021) and TabM (Gorishniy et al. 2025).

All three embed each feature with `FeatureTokenizer` (no CLS; numeric "linear" or "plr" — the
periodic -> linear -> ReLU embeddings of Gorishniy et al. 2022), flatten the tokens of a row to
[N, F * d_embedding] and apply their backbone. Leading dims [...] of the inputs ([batch] or
[batch, rows]) are flattened to N and restored. `row_mask` is accepted for interface parity and
unused (rows are independent). Inputs: x_num f32[..., Fn] (NaN = missing), x_cat i32[..., Fc] codes,
num_missing bool[..., Fn] | None.

- MLP: (Linear -> ReLU -> Dropout) per width in `d_layers`, then Linear(d_out). (rtdl MLP.)
- ResNetMLP: Linear(d_main); blocks x + Drop2(Linear(Drop1(ReLU(Linear(Norm(x)))))) with hidden width
  d_main * d_hidden_factor; head Linear(ReLU(Norm(x))). rtdl uses BatchNorm; we use LayerNorm so
  rows stay independent and no batch statistics are needed.
- TabM: k implicit members in one MLP. Every linear layer is BatchEnsemble-style,
  y_i = ((x_i * r_i) @ W) * s_i + b_i, with W shared and rank-1 adapters r_i, s_i and bias b_i per
  member; the first layer's r_i start as random signs (+-1), all other adapters start at 1, as in the
  paper. `variant="tabm_mini"` keeps only the first r_i (a per-member input scaling) and shares the
  rest of the MLP. Both end in a separate Linear(d_out) head per member. The encoder output is the
  mean over members; aux["members"] holds every member's output so a caller can train with the
  paper's mean of per-member losses. Paper defaults: k = 32, 3 blocks of 512, dropout 0.1.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.models.tabular.feature_tokenizer import FeatureTokenizer
from nexus_jax.models.tabular.common import dense, layer_norm, logical_init, prepare_features

Array = jax.Array


def _row_features(module: nn.Module, x_num, x_cat, num_missing) -> tuple[Array, tuple[int, ...]]:
  """Tokenize and flatten one row: -> (x f32/dtype [N, F * d_embedding], leading shape)."""
  m = module
  x_num, x_cat, num_missing, lead = prepare_features(
      x_num, x_cat, num_missing, m.num_numeric, len(m.cat_cardinalities)
  )
  tokens = FeatureTokenizer(
      m.num_numeric,
      tuple(m.cat_cardinalities),
      m.d_embedding,
      numeric_embedding=m.numeric_embedding,
      plr_frequencies=m.plr_frequencies,
      plr_sigma=m.plr_sigma,
      cls_token=False,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      name="tokenizer",
  )(x_num, x_cat, num_missing)
  n_tokens = tokens.shape[-2] * tokens.shape[-1]
  return tokens.reshape(-1, n_tokens).astype(m.dtype), lead


class MLP(nn.Module):
  """MLP encoder: (x_num [..., Fn], x_cat [..., Fc], num_missing) -> (out [..., d_out], aux {})."""

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 64
  d_layers: Sequence[int] = (256, 256)
  dropout: float = 0.1
  d_embedding: int = 16
  numeric_embedding: str = "plr"  # "linear" | "plr"
  plr_frequencies: int = 48
  plr_sigma: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  pools_rows: ClassVar[bool] = False

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
    x, lead = _row_features(self, x_num, x_cat, num_missing)
    for i, width in enumerate(self.d_layers):
      axes = ("feature" if i == 0 else "embed", "mlp")
      x = jax.nn.relu(dense(width, axes, f"layer{i}", self.dtype, self.param_dtype)(x))
      x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    out = dense(self.d_out, ("mlp", "embed"), "head", self.dtype, self.param_dtype)(x)
    return out.reshape(*lead, self.d_out), {}


class ResNetMLP(nn.Module):
  """ResNet encoder: (x_num [..., Fn], x_cat [..., Fc], num_missing) -> (out [..., d_out], aux {}).

  Defaults are rtdl's ResNet (2 blocks, d_main 128, hidden factor 2, dropouts 0.25 / 0.0).
  """

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 64
  n_blocks: int = 2
  d_main: int = 128
  d_hidden_factor: float = 2.0
  dropout_first: float = 0.25
  dropout_second: float = 0.0
  d_embedding: int = 16
  numeric_embedding: str = "plr"
  plr_frequencies: int = 48
  plr_sigma: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  pools_rows: ClassVar[bool] = False

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
    x, lead = _row_features(self, x_num, x_cat, num_missing)
    x = dense(self.d_main, ("feature", "embed"), "first", self.dtype, self.param_dtype)(x)
    d_hidden = int(self.d_main * self.d_hidden_factor)
    for i in range(self.n_blocks):
      h = layer_norm(f"block{i}_norm", self.dtype, self.param_dtype)(x)
      h = dense(d_hidden, ("embed", "mlp"), f"block{i}_fc1", self.dtype, self.param_dtype)(h)
      h = nn.Dropout(self.dropout_first)(jax.nn.relu(h), deterministic=deterministic)
      h = dense(self.d_main, ("mlp", "embed"), f"block{i}_fc2", self.dtype, self.param_dtype)(h)
      x = x + nn.Dropout(self.dropout_second)(h, deterministic=deterministic)
    x = jax.nn.relu(layer_norm("head_norm", self.dtype, self.param_dtype)(x))
    out = dense(self.d_out, ("embed", "mlp"), "head", self.dtype, self.param_dtype)(x)
    return out.reshape(*lead, self.d_out), {}


def _random_signs(key, shape, dtype=jnp.float32):
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)


class EnsembleDense(nn.Module):
  """BatchEnsemble linear layer over members: x [N, k, d_in] -> [N, k, features].

  y_i = ((x_i * r_i) @ W) * s_i + b_i; W [d_in, features] shared; r [k, d_in], s [k, features],
  b [k, features] per member (r, s optional; `member_bias=False` shares b). `r_init`: "random_signs"
  or "ones"; s starts at 1, b at 0. Without r, s and member bias this is a plain shared Dense.
  """

  features: int
  scale_in: bool = True
  scale_out: bool = True
  r_init: str = "ones"
  member_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, d_in = x.shape[-2:]
    if self.scale_in:
      init = _random_signs if self.r_init == "random_signs" else nn.initializers.ones
      r = self.param("r", logical_init((None, "mlp"), init), (k, d_in), self.param_dtype)
      x = x * r.astype(self.dtype)
    w = self.param(
        "kernel",
        logical_init(("embed", "mlp"), nn.initializers.lecun_normal()),
        (d_in, self.features),
        self.param_dtype,
    )
    y = jnp.einsum("nki,io->nko", x, w.astype(self.dtype))
    if self.scale_out:
      s = self.param(
          "s",
          logical_init((None, "mlp"), nn.initializers.ones),
          (k, self.features),
          self.param_dtype,
      )
      y = y * s.astype(self.dtype)
    b_shape = (k, self.features) if self.member_bias else (self.features,)
    b_axes = (None, "mlp") if self.member_bias else ("mlp",)
    b = self.param("bias", logical_init(b_axes, nn.initializers.zeros), b_shape, self.param_dtype)
    return y + b.astype(self.dtype)


class MemberDense(nn.Module):
  """Fully separate linear layer per member (TabM's output heads): [N, k, d_in] -> [N, k, features]."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, d_in = x.shape[-2:]
    w = self.param(
        "kernel",
        logical_init((None, "mlp", "embed"), nn.initializers.lecun_normal(batch_axis=(0,))),
        (k, d_in, self.features),
        self.param_dtype,
    )
    b = self.param(
        "bias",
        logical_init((None, "embed"), nn.initializers.zeros),
        (k, self.features),
        self.param_dtype,
    )
    return jnp.einsum("nki,kio->nko", x, w.astype(self.dtype)) + b.astype(self.dtype)


class TabM(nn.Module):
  """TabM encoder: (x_num [..., Fn], x_cat [..., Fc], num_missing) -> (out [..., d_out], aux).

  out is the mean over the k members of aux["members"] [..., k, d_out].
  """

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 64
  k: int = 32
  n_blocks: int = 3
  d_block: int = 512
  dropout: float = 0.1
  variant: str = "tabm"  # "tabm" | "tabm_mini"
  d_embedding: int = 16
  numeric_embedding: str = "linear"  # "linear" | "plr"
  plr_frequencies: int = 48
  plr_sigma: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  pools_rows: ClassVar[bool] = False

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
    if self.variant not in ("tabm", "tabm_mini"):
      raise ValueError(f"TabM.variant={self.variant!r}; use 'tabm' or 'tabm_mini'.")
    x, lead = _row_features(self, x_num, x_cat, num_missing)
    x = jnp.broadcast_to(x[:, None], (x.shape[0], self.k, x.shape[-1]))  # [N, k, D]
    full = self.variant == "tabm"
    for i in range(self.n_blocks):
      first = i == 0
      x = EnsembleDense(
          self.d_block,
          scale_in=full or first,
          scale_out=full,
          r_init="random_signs" if first else "ones",
          member_bias=full,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block{i}",
      )(x)
      x = nn.Dropout(self.dropout)(jax.nn.relu(x), deterministic=deterministic)
    members = MemberDense(self.d_out, self.dtype, self.param_dtype, name="heads")(
        x
    )  # [N, k, d_out]
    out = jnp.mean(members.astype(jnp.float32), axis=1).astype(self.dtype)
    return out.reshape(*lead, self.d_out), {"members": members.reshape(*lead, self.k, self.d_out)}
