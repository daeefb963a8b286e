"""LeanMLP: a cheap row encoder for the many rows of relational contexts (registered as "lean_mlp").

One row -> [x_num, missing flags, categorical embeddings] -> Dense -> ReLU -> ... -> Dense(d_out).

With linear numeric embeddings, "embed every feature, flatten, Dense" (the registry's "mlp") is
mathematically one Dense layer on the raw numbers, but it materialises a `[..., F, d_embedding]`
tensor per row first. Context sets hold ~50 rows per target row, so that tensor dominates memory
traffic on a CPU; LeanMLP feeds the numbers straight into the first Dense layer instead. Missing
numeric values enter as 0 plus a 0/1 flag. Categorical codes (0 missing, 1 unknown, >= 2 real;
codes outside ``[0, card)`` read as unknown) look up one stacked table `[sum(card), d_embedding]`.

Call convention of the registry: `(x_num [..., Fn], x_cat [..., Fc], num_missing=None, row_mask=None,
*, deterministic) -> (out [..., d_out], {})`, leading dims [batch] or [batch, rows].
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.models.tabular.common import dense, logical_init, prepare_features

Array = jax.Array


class LeanMLP(nn.Module):
  """Row encoder: (x_num [..., Fn], x_cat [..., Fc], num_missing) -> (out [..., d_out], {})."""

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 32
  d_layers: Sequence[int] = (32,)
  d_embedding: int = 4  # width of each categorical embedding
  dropout: float = 0.0
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
    cards = tuple(int(c) for c in self.cat_cardinalities)
    x_num, x_cat, num_missing, lead = prepare_features(
        x_num, x_cat, num_missing, self.num_numeric, len(cards)
    )
    parts = [jnp.where(num_missing, 0.0, x_num).astype(self.dtype), num_missing.astype(self.dtype)]
    if cards:
      offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int32)
      table = self.param(
          "cat_embedding",
          # rows: the data's category counts (rarely divisible by a mesh axis): replicated
          logical_init((None, "embed"), nn.initializers.normal(0.1)),
          (int(sum(cards)), self.d_embedding),
          self.param_dtype,
      )
      codes = jnp.where(
          (x_cat >= 0) & (x_cat < np.asarray(cards)), x_cat, np.minimum(1, np.asarray(cards) - 1)
      )
      emb = jnp.take(table, codes + offsets, axis=0)  # [..., Fc, d_embedding]
      parts.append(emb.reshape(*lead, len(cards) * self.d_embedding).astype(self.dtype))
    x = jnp.concatenate(parts, axis=-1)
    for i, width in enumerate(self.d_layers):
      axes = ("feature" if i == 0 else "embed", "mlp")
      x = dense(width, axes, f"layer{i}", self.dtype, self.param_dtype)(x)
      x = nn.Dropout(self.dropout)(jax.nn.relu(x), deterministic=deterministic)
    out = dense(self.d_out, ("mlp", "embed"), "head", self.dtype, self.param_dtype)(x)
    return out, {}
