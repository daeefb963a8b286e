"""RowPredictor: one registered row encoder + a linear head, for single-table (flat) prediction.

(x_num [batch, Fn], x_cat [batch, Fc], num_missing [batch, Fn]) -> (outputs [batch, n_outputs], aux)
where `n_outputs` is 1 for binary (a logit) and regression, and the class count for multiclass.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.models.tabular.registry import get_encoder


class RowPredictor(nn.Module):
  encoder: str  # registered encoder name, e.g. "mlp", "ft_transformer", "tabnet", "tabm"
  num_numeric: int
  cat_cardinalities: Sequence[int]
  n_outputs: int = 1
  d_hidden: int = 64  # encoder output width
  encoder_kwargs: Mapping[str, Any] | None = None  # extra hyperparameters of the encoder
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
    cls = get_encoder(self.encoder)
    encoder = cls(
        num_numeric=self.num_numeric,
        cat_cardinalities=tuple(self.cat_cardinalities),
        d_out=self.d_hidden,
        dtype=self.dtype,
        **dict(self.encoder_kwargs or {}),
        name="encoder",
    )
    h, aux = encoder(x_num, x_cat, num_missing, deterministic=not train)
    h = jax.nn.relu(h)
    out = nn.Dense(
        self.n_outputs,
        dtype=jnp.float32,
        name="head",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )(h.astype(jnp.float32))
    return out, aux
