"""RowPredictor: one registered row encoder + a linear head, for single-table (flat) prediction.

(x_num [batch, Fn], x_cat [batch, Fc], num_missing [batch, Fn]) -> (outputs [batch, n_outputs], aux)
where `n_outputs` is 1 for binary (a logit) and regression, and the class count for multiclass.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.models.tabular.common import dense
from nexus_jax.models.tabular import registry


class RowPredictor(nn.Module):
  encoder: str  # registered encoder name, e.g. "mlp", "ft_transformer", "tabnet", "tabm"
  num_numeric: int
  cat_cardinalities: Sequence[int]
  n_outputs: int = 1
  d_hidden: int = 64  # encoder output width
  # Extra hyperparameters of the encoder, checked by `registry.encoder_kwargs` (unknown keys raise).
  encoder_kwargs: Mapping[str, Any] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      x_num: jax.Array,
      x_cat: jax.Array,
      num_missing: jax.Array | None = None,
      *,
      train: bool = False,
  ) -> tuple[jax.Array, dict[str, Any]]:
    kwargs = registry.encoder_kwargs(
        self.encoder, self.encoder_kwargs, "RowPredictor.encoder_kwargs"
    )
    encoder = registry.get_encoder(self.encoder)(
        num_numeric=self.num_numeric,
        cat_cardinalities=tuple(self.cat_cardinalities),
        d_out=self.d_hidden,
        dtype=self.dtype,
        name="encoder",
        **kwargs,
    )
    h, aux = encoder(x_num, x_cat, num_missing, deterministic=not train)
    h = jax.nn.relu(h)
    out = dense(self.n_outputs, ("embed", None), "head", jnp.float32)(h.astype(jnp.float32))
    return out, aux
