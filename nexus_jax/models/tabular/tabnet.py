"""TabNet row encoder (Arik & Pfister, "TabNet: Attentive Interpretable Tabular Learning", AAAI 2021).

One row is a vector of D columns grouped into F features (a numeric feature owns its value and its
missing flag; a categorical feature owns its embedding). Each decision step selects features with a
sparse mask computed by the attentive transformer from the previous step's attention features:

    M_i   = sparsemax(P_{i-1} * h_i(a_{i-1}))      [N, F], sums to 1 over F
    P_i   = P_{i-1} * (gamma - M_i)                  prior scales, P_0 = 1 (relaxation gamma)
    [d_i, a_i] = FeatureTransformer_i(M_i * x)       shared GLU blocks + step-specific GLU blocks
    out   = Dense(sum_i relu(d_i))                   [N, d_out]

Every fully-connected layer is followed by ghost batch norm (statistics over virtual batches of
`virtual_batch_size` rows, running averages in the `batch_stats` collection). The sparsity
regulariser (mean entropy of the masks) is sown as `("aux_loss", "tabnet_sparsity")` already
multiplied by `sparsity_coef`. Defaults follow pytorch-tabnet: n_d = n_a = 8, 3 steps, gamma 1.3,
2 shared + 2 independent GLU layers, virtual batch 128, BN momentum 0.02 (0.98 in Flax's convention),
lambda_sparse 1e-3.

Train with `deterministic=False, mutable=["batch_stats", "aux_loss"]`; evaluate with
`deterministic=True` (running statistics, nothing mutated).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.models.tabular.common import dense, prepare_features

Array = jax.Array


@jax.custom_vjp
def _sparsemax(z: Array) -> Array:
  z_sorted = -jnp.sort(-z, axis=-1)  # descending
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  cumsum = jnp.cumsum(z_sorted, axis=-1)
  support = jnp.sum(1.0 + k * z_sorted > cumsum, axis=-1, keepdims=True)  # >= 1
  tau = (jnp.take_along_axis(cumsum, support - 1, axis=-1) - 1.0) / support.astype(z.dtype)
  return jnp.maximum(z - tau, 0.0)


def _sparsemax_fwd(z):
  p = _sparsemax(z)
  return p, p


def _sparsemax_bwd(p, g):
  supp = (p > 0).astype(g.dtype)
  v = jnp.sum(g * supp, -1, keepdims=True) / jnp.sum(supp, -1, keepdims=True)
  return (supp * (g - v),)


_sparsemax.defvjp(_sparsemax_fwd, _sparsemax_bwd)


@jax.custom_vjp
def _entmax15(z: Array) -> Array:
  z = z / 2.0
  z = z - jnp.max(z, axis=-1, keepdims=True)  # shift-invariant; keeps the squares small
  z_sorted = -jnp.sort(-z, axis=-1)
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  mean = jnp.cumsum(z_sorted, -1) / k
  mean_sq = jnp.cumsum(z_sorted**2, -1) / k
  delta = (1.0 - k * (mean_sq - mean**2)) / k
  tau = mean - jnp.sqrt(jnp.maximum(delta, 0.0))
  support = jnp.sum(tau <= z_sorted, axis=-1, keepdims=True)  # >= 1
  tau_star = jnp.take_along_axis(tau, support - 1, axis=-1)
  return jnp.maximum(z - tau_star, 0.0) ** 2


def _entmax15_fwd(z):
  p = _entmax15(z)
  return p, p


def _entmax15_bwd(p, g):
  gppr = jnp.sqrt(p)
  dz = g * gppr
  q = jnp.sum(dz, -1, keepdims=True) / jnp.sum(gppr, -1, keepdims=True)
  return (dz - q * gppr,)


_entmax15.defvjp(_entmax15_fwd, _entmax15_bwd)


def sparsemax(z: Array, axis: int = -1) -> Array:
  """Sparsemax (Martins & Astudillo, 2016): Euclidean projection of z onto the simplex along `axis`.

  Exact sort-based forward in float32 and its closed-form Jacobian as a custom VJP. Same shape as z.
  """
  zf = jnp.moveaxis(z, axis, -1).astype(jnp.float32)
  return jnp.moveaxis(_sparsemax(zf), -1, axis).astype(z.dtype)


def entmax15(z: Array, axis: int = -1) -> Array:
  """1.5-entmax (Peters et al., 2019): p = [(z/2 - tau)_+]^2 with tau such that p sums to 1.

  Exact sort-based forward in float32 and the closed-form custom VJP. Same shape as z.
  """
  zf = jnp.moveaxis(z, axis, -1).astype(jnp.float32)
  return jnp.moveaxis(_entmax15(zf), -1, axis).astype(z.dtype)


def sparsity_loss(masks: Array, row_mask: Array | None = None, eps: float = 1e-15) -> Array:
  """Mean entropy of the feature masks (the TabNet sparsity regulariser, before its coefficient).

  Args:
    masks: [steps, N, F] masks, each row on the simplex.
    row_mask: optional bool [N]; rows that are False are left out of the mean.
    eps: added inside the log.
  Returns:
    scalar: mean over steps and (valid) rows of -sum_f M log(M + eps).
  """
  masks = masks.astype(jnp.float32)
  entropy = -jnp.sum(masks * jnp.log(masks + eps), axis=-1)  # [steps, N]
  if row_mask is None:
    return jnp.mean(entropy)
  w = row_mask.astype(jnp.float32)
  return jnp.sum(entropy * w[None]) / (masks.shape[0] * jnp.maximum(jnp.sum(w), 1.0))


class GhostBatchNorm(nn.Module):
  """Batch norm over virtual batches ("ghost" BN, Hoffer et al. 2017) for x [N, D].

  Training normalises each of ceil(N / virtual_batch_size) near-equal consecutive chunks with its
  own (row-weighted) mean and variance, and moves the running statistics once per call towards the
  count-weighted average of the chunk statistics. Evaluation uses the running statistics.
  `virtual_batch_size=None` means one chunk (plain BN).
  """

  virtual_batch_size: int | None = 128
  momentum: float = 0.98
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool, weights: Array | None = None) -> Array:
    n, d = x.shape
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((d,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((d,), jnp.float32))
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
        (d,),
        self.param_dtype,
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        (d,),
        self.param_dtype,
    )
    xf = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value[None], ra_var.value[None]
    else:
      vbs = self.virtual_batch_size or max(n, 1)
      n_chunks = max(1, -(-n // vbs))
      seg = (np.arange(n) * n_chunks) // max(n, 1)  # [N] chunk id, near-equal consecutive chunks
      onehot = jnp.asarray(seg[:, None] == np.arange(n_chunks)[None], jnp.float32)  # [N, C], static
      w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
      wc = onehot * w[:, None]  # [N, C]
      count = jnp.sum(wc, axis=0)  # [C]
      denom = jnp.maximum(count, 1.0)[:, None]
      mean_c = (wc.T @ xf) / denom  # [C, D]
      var_c = (wc.T @ (xf - onehot @ mean_c) ** 2) / denom
      mean, var = onehot @ mean_c, onehot @ var_c
      if not self.is_initializing():
        total = jnp.sum(count)
        frac = (count / jnp.maximum(total, 1.0))[:, None]
        new_mean = jax.lax.stop_gradient(jnp.sum(frac * mean_c, 0))
        new_var = jax.lax.stop_gradient(jnp.sum(frac * var_c, 0))
        m = self.momentum
        keep = total <= 0  # nothing valid in this batch: leave the statistics alone
        ra_mean.value = jnp.where(keep, ra_mean.value, m * ra_mean.value + (1 - m) * new_mean)
        ra_var.value = jnp.where(keep, ra_var.value, m * ra_var.value + (1 - m) * new_var)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def feature_groups(
    num_numeric: int, cat_cardinalities: Sequence[int], cat_embed_dim: int, missing_indicators: bool
) -> list[int]:
  """Feature index of each input column, in the column order TabNet builds: numeric values,
  numeric missing flags (if used), then each categorical's `cat_embed_dim` embedding columns."""
  groups = list(range(num_numeric))
  if missing_indicators:
    groups += list(range(num_numeric))
  for j in range(len(cat_cardinalities)):
    groups += [num_numeric + j] * cat_embed_dim
  return groups


class TabNet(nn.Module):
  """TabNet encoder: row features -> row representation.

  Inputs: x_num f32[..., Fn] (NaN allowed where missing), x_cat i32[..., Fc] (codes as in
  `nexus_jax.data.preprocess`: 0 missing, 1 unknown, >= 2 real; cardinality = number of codes),
  num_missing bool[..., Fn] | None, row_mask bool[...] | None (False rows, e.g. padding, are left
  out of the batch statistics and of the sparsity loss). Leading dims [...] are [batch] or
  [batch, rows]; they are flattened to N rows.

  `deterministic=False` is training: batch statistics are used and the running averages updated
  (pass `mutable=["batch_stats", "aux_loss"]`); `deterministic=True` uses the running averages.

  Returns (out f32[..., d_out], aux) with aux["masks"] [steps, ..., F] (each sums to 1 over F),
  aux["importance"] [..., F] (mask weighted by each step's decision magnitude, normalised; all 0
  for a row whose decisions are all 0), aux["sparsity_entropy"] scalar.
  """

  num_numeric: int
  cat_cardinalities: Sequence[int] = ()
  d_out: int = 64
  n_d: int = 8
  n_a: int = 8
  n_steps: int = 3
  gamma: float = 1.3
  n_shared: int = 2
  n_independent: int = 2
  cat_embed_dim: int = 1
  missing_indicators: bool = True
  mask_type: str = "sparsemax"  # "sparsemax" | "entmax15"
  virtual_batch_size: int | None = 128
  momentum: float = 0.98
  sparsity_coef: float = 1e-3
  epsilon: float = 1e-15
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  pools_rows: ClassVar[bool] = False

  def _gbn(self, name: str, train: bool, vbs: int | None = -1) -> GhostBatchNorm:
    return GhostBatchNorm(
        virtual_batch_size=self.virtual_batch_size if vbs == -1 else vbs,
        momentum=self.momentum,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )

  def _feature_transformer(
      self, x: Array, shared: Sequence[nn.Dense], step: int, train: bool, w: Array | None
  ) -> Array:
    """Shared then step-specific GLU layers, [N, D_in] -> [N, n_d + n_a]; residual * sqrt(0.5)."""
    width = self.n_d + self.n_a
    fcs = list(shared) + [
        dense(
            2 * width,
            ("embed", "mlp"),
            f"step{step}_fc{i}",
            self.dtype,
            self.param_dtype,
            use_bias=False,
        )
        for i in range(self.n_independent)
    ]
    h = x
    for i, fc in enumerate(fcs):
      g = self._gbn(f"step{step}_bn{i}", train)(fc(h), use_running_average=not train, weights=w)
      g = g[:, :width] * jax.nn.sigmoid(g[:, width:])
      h = g if i == 0 else (h + g) * math.sqrt(0.5)
    return h

  def _columns(self, x_num: Array, x_cat: Array, num_missing: Array, n: int) -> Array:
    """Columns [N, D] in `feature_groups` order from cleaned inputs (see `prepare_features`)."""
    cols = []
    if self.num_numeric:
      cols.append(x_num.reshape(n, self.num_numeric))
      if self.missing_indicators:
        cols.append(num_missing.reshape(n, self.num_numeric).astype(jnp.float32))
    for j, card in enumerate(self.cat_cardinalities):
      table = self.param(
          f"cat_embedding_{j}",
          # rows: the column's category count (rarely divisible by a mesh axis): replicated
          nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
          (card, self.cat_embed_dim),
          self.param_dtype,
      )
      codes = x_cat.reshape(n, -1)[:, j]
      codes = jnp.where(
          (codes >= 0) & (codes < card), codes, min(1, card - 1)
      )  # out of range -> unknown
      cols.append(jnp.take(table, codes, axis=0).astype(jnp.float32))
    return jnp.concatenate(cols, axis=-1)

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
    n_cat = len(self.cat_cardinalities)
    if self.mask_type not in ("sparsemax", "entmax15"):
      raise ValueError(f"TabNet.mask_type={self.mask_type!r}; use 'sparsemax' or 'entmax15'.")
    if self.n_steps < 1 or self.n_shared + self.n_independent < 1:
      raise ValueError(
          f"TabNet needs n_steps >= 1 and n_shared + n_independent >= 1; got n_steps="
          f"{self.n_steps}, n_shared={self.n_shared}, n_independent={self.n_independent}."
      )
    x_num, x_cat, num_missing, lead = prepare_features(
        x_num, x_cat, num_missing, self.num_numeric, n_cat
    )
    n = math.prod(lead)
    train = not deterministic
    w = None if row_mask is None else row_mask.reshape(n).astype(jnp.float32)
    n_feat = self.num_numeric + n_cat
    groups = jnp.asarray(
        feature_groups(
            self.num_numeric, self.cat_cardinalities, self.cat_embed_dim, self.missing_indicators
        )
    )

    x = self._columns(x_num, x_cat, num_missing, n)  # [N, D]
    x = self._gbn("input_bn", train, vbs=None)(x, use_running_average=not train, weights=w)
    width = self.n_d + self.n_a
    shared = [
        dense(
            2 * width,
            ("embed", "mlp"),
            f"shared_fc{i}",
            self.dtype,
            self.param_dtype,
            use_bias=False,
        )
        for i in range(self.n_shared)
    ]
    a = self._feature_transformer(x, shared, 0, train, w)[:, self.n_d :]
    prior = jnp.ones((n, n_feat), jnp.float32)
    select = sparsemax if self.mask_type == "sparsemax" else entmax15
    decision = jnp.zeros((n, self.n_d), jnp.float32)
    importance = jnp.zeros((n, n_feat), jnp.float32)
    masks = []
    for step in range(1, self.n_steps + 1):
      logits = dense(
          n_feat,
          ("mlp", "feature"),
          f"step{step}_attentive_fc",
          self.dtype,
          self.param_dtype,
          use_bias=False,
      )(a)
      logits = self._gbn(f"step{step}_attentive_bn", train)(
          logits, use_running_average=not train, weights=w
      )
      mask = select(logits.astype(jnp.float32) * prior)  # [N, F]
      prior = prior * (self.gamma - mask)
      out = self._feature_transformer(x * mask[:, groups].astype(x.dtype), shared, step, train, w)
      d = jax.nn.relu(out[:, : self.n_d].astype(jnp.float32))
      decision = decision + d
      importance = importance + mask * jnp.sum(d, axis=-1, keepdims=True)
      a = out[:, self.n_d :]
      masks.append(mask)
    masks_all = jnp.stack(masks)  # [steps, N, F]
    entropy = sparsity_loss(
        masks_all, None if row_mask is None else row_mask.reshape(n), self.epsilon
    )
    self.sow("aux_loss", "tabnet_sparsity", self.sparsity_coef * entropy)
    out = dense(self.d_out, ("mlp", "embed"), "out", self.dtype, self.param_dtype)(
        decision.astype(self.dtype)
    )
    importance = importance / jnp.maximum(jnp.sum(importance, -1, keepdims=True), 1e-12)
    aux = {
        "masks": masks_all.reshape(self.n_steps, *lead, n_feat),
        "importance": importance.reshape(*lead, n_feat),
        "sparsity_entropy": entropy,
    }
    return out.reshape(*lead, self.d_out), aux
