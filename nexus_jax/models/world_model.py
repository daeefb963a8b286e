"""JEPA world model (Assran et al. 2023; LeCun 2022) with VICReg regularisation (Bardes et al. 2022).

A context encoder reads a sequence whose masked positions (15% by default, in contiguous spans,
`span_mask`) are replaced by a learned mask embedding; a predictor maps its latents (with the
masked positions flagged, plus optional actions) to predictions of the *target encoder's*
latents at the masked positions. The
target encoder has the context encoder's architecture; its weights are an exponential moving
average of the context encoder's (`init_target`, `ema_update`) and it gets no gradient.

Loss (`jepa_loss`), with z = predictions and t = targets at the masked positions and c = the
context latents (each `[N, E]`), and e = the VICReg *embeddings*: `expander(c)` `[N, D]` when
`expander_dims` is set (the VICReg paper's expander MLP; the default), else c, taken at the masked
positions (`vicreg_on="masked"`, the default) or at all positions (`"all"`):

    inv_coef * mean((z - t)^2)                   invariance: predict the target latents
  + var_coef * mean_j relu(gamma - std_j(e))     variance hinge on the embeddings
  + cov_coef * sum_{i != j} cov_ij(e)^2 / D      covariance (decorrelation) on the embeddings

As in VICReg, the representations (encoder output, what downstream probes read) and the embeddings
(expander output, where the variance / covariance terms act) are different tensors: the expander
lets every embedding dimension keep unit spread without forcing each representation dimension to
carry unit variance of observation noise. `expander_dims=()` applies the terms to c directly.

`vicreg_terms` is the two-branch VICReg loss of the official implementation (unbiased variance,
eps 1e-4). In the JEPA loss the variance and covariance terms act on (the expansion of) the context
encoder's latents, which is what keeps them from collapsing, and not on the predictions: the best
prediction of a partly unpredictable target (its conditional mean) has a smaller spread than
the target, and a variance hinge on it would fight the invariance term. The targets' own
variance/covariance (no gradient) and the predictions' spread are logged in aux.

Inputs are token ids `[B, L]` (`vocab_size` set) or feature vectors `[B, L, F]`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers.blocks import TransformerBlock
from nexus_jax.layers.norms import RMSNorm

Dtype = Any


def span_mask(key, batch: int, length: int, mask_ratio: float = 0.15, span_length: int = 4):
  """Boolean `[batch, length]` mask with `k * span_length` True positions in k spans.

  The sequence is cut into `length // span_length` slots; k = round(mask_ratio * length /
  span_length) (at least 1, at most all slots but one) random slots per row are masked, and each
  row is rolled by a random offset in [0, span_length) so spans are not grid-aligned (a span may
  wrap around the end). Deterministic given `key`.
  """
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
  if span_length < 1 or length < 2 * span_length:
    raise ValueError(
        f"need span_length >= 1 and length >= 2 * span_length; got span_length "
        f"{span_length}, length {length}."
    )
  slots = length // span_length
  k = min(max(1, round(mask_ratio * length / span_length)), slots - 1)
  k_slots, k_shift = jax.random.split(key)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_slots, (batch, slots)), axis=1), axis=1)
  mask = jnp.repeat(rank < k, span_length, axis=1)
  mask = jnp.pad(mask, ((0, 0), (0, length - slots * span_length)))
  shift = jax.random.randint(k_shift, (batch,), 0, span_length)
  return jax.vmap(jnp.roll)(mask, shift)


def _weighted_moments(z_NE, w_N):
  """Weighted mean-centred rows and the unbiased covariance `[E, E]` (weights 0/1)."""
  n = jnp.sum(w_N)
  mean = jnp.sum(z_NE * w_N[:, None], 0) / jnp.maximum(n, 1.0)
  centred = (z_NE - mean) * w_N[:, None]
  return centred.T @ centred / jnp.maximum(n - 1.0, 1.0)


def variance_covariance(z_NE, weights_N=None, gamma: float = 1.0, eps: float = 1e-4):
  """VICReg regularisers of one branch: `(mean_j relu(gamma - sqrt(var_j + eps)),
  sum_{i != j} cov_ij^2 / E)`; rows with weight 0 are ignored."""
  z_NE = z_NE.astype(jnp.float32)
  w_N = jnp.ones(z_NE.shape[0]) if weights_N is None else weights_N.astype(jnp.float32)
  cov = _weighted_moments(z_NE, w_N)
  std = jnp.sqrt(jnp.diagonal(cov) + eps)
  off_diagonal = cov - jnp.diag(jnp.diagonal(cov))
  return jnp.mean(nn.relu(gamma - std)), jnp.sum(off_diagonal**2) / z_NE.shape[1]


def invariance(z_a, z_b, weights=None):
  """Mean squared difference of rows `[N, E]`, averaged over dims and the rows with weight 1."""
  w = jnp.ones(z_a.shape[0]) if weights is None else weights.astype(jnp.float32)
  sq = jnp.mean(jnp.square(z_a.astype(jnp.float32) - z_b.astype(jnp.float32)), -1)
  return jnp.sum(sq * w) / jnp.maximum(jnp.sum(w), 1.0)


def vicreg_terms(z_a, z_b, weights=None, gamma: float = 1.0, eps: float = 1e-4):
  """The three VICReg terms of two branches `[N, E]` (rows weighted by 0/1 `weights [N]`):
  invariance (mean squared difference), variance (hinge, averaged over branches), covariance
  (summed over branches). Returns a dict of float32 scalars."""
  if z_a.ndim != 2 or z_a.shape != z_b.shape:
    raise ValueError(f"VICReg branches must both be [rows, dims]; got {z_a.shape}, {z_b.shape}.")
  var_a, cov_a = variance_covariance(z_a, weights, gamma, eps)
  var_b, cov_b = variance_covariance(z_b, weights, gamma, eps)
  return {
      "invariance": invariance(z_a, z_b, weights),
      "variance": (var_a + var_b) / 2,
      "covariance": cov_a + cov_b,
  }


def init_target(params):
  """Target-encoder weights: a copy of the context encoder's (`params["encoder"]`)."""
  return jax.tree.map(jnp.array, params["encoder"])


def ema_update(target, online, decay: float):
  """`decay * target + (1 - decay) * online`, leaf by leaf (online = `params["encoder"]`)."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o.astype(t.dtype), target, online)


class SequenceEncoder(nn.Module):
  """`inputs [B, L]` ids or `[B, L, F]` features, `mask [B, L]` -> `(latents [B, L, E], aux)`.

  Masked positions are replaced by a learned mask embedding before the first block, so the
  latents never depend on the masked inputs. Bidirectional unless `causal`.
  """

  embed_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  vocab_size: int | None = None  # None: feature-vector input
  causal: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, mask=None, deterministic: bool = True):
    init = nn.initializers.normal(0.02)
    if self.vocab_size is not None:
      if inputs.ndim != 2:
        raise ValueError(f"token inputs must be [batch, length]; got {inputs.shape}.")
      x = nn.Embed(
          self.vocab_size,
          self.embed_dim,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="embed",
          embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
      )(inputs)
    else:
      if inputs.ndim != 3:
        raise ValueError(
            f"feature inputs must be [batch, length, features]; got {inputs.shape} "
            "(set vocab_size for token ids)."
        )
      x = nn.Dense(
          self.embed_dim,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="embed",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ("feature", "embed")
          ),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      )(inputs)
    if mask is not None:
      if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [batch, length] = {x.shape[:2]}; got {mask.shape}.")
      token = self.param(
          "mask_token",
          nn.with_logical_partitioning(init, ("embed",)),
          (self.embed_dim,),
          self.param_dtype,
      )
      x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    for i in range(self.num_layers):
      x, _ = TransformerBlock(
          self.num_heads,
          self.mlp_dim,
          causal=self.causal,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block_{i}",
      )(x, deterministic=deterministic)
    return RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x), {}


class Predictor(nn.Module):
  """`latents [B, L, E], mask [B, L]`, optional `actions [B, L, A]` -> predictions `[B, L, E]`.

  `num_layers=0` gives a per-position head, so all inference from context must happen in the
  encoder (which then learns contextual representations); more layers let the predictor
  aggregate context itself."""

  dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents, mask, actions=None, deterministic: bool = True):
    dense = lambda features, names, name: nn.Dense(
        features,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
    )
    h = dense(self.dim, (None, "embed"), "in")(latents)
    # The context encoder has already read the sequence with mask tokens at the masked
    # positions, so its latents there are kept; a learned embedding flags them as queries.
    token = self.param(
        "mask_token",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
        (self.dim,),
        self.param_dtype,
    )
    h = h + mask[..., None].astype(h.dtype) * token.astype(h.dtype)
    if actions is not None:
      h = h + dense(self.dim, ("feature", "embed"), "actions")(actions)
    for i in range(self.num_layers):
      h, _ = TransformerBlock(
          self.num_heads,
          self.mlp_dim,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block_{i}",
      )(h, deterministic=deterministic)
    h = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(h)
    return dense(latents.shape[-1], ("embed", None), "out")(h)


class Expander(nn.Module):
  """VICReg expander: `[..., E]` -> `[..., dims[-1]]`, (Dense -> LayerNorm -> ReLU) per hidden width,
  then a plain Dense (Bardes et al. 2022 use BatchNorm; LayerNorm keeps it free of batch state)."""

  dims: tuple[int, ...]
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, d in enumerate(self.dims):
      x = nn.Dense(
          d,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"dense_{i}",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ("embed", "mlp")
          ),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      )(x)
      if i < len(self.dims) - 1:
        x = nn.relu(
            nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
        )
    return x


class JEPAWorldModel(nn.Module):
  """Context encoder + predictor (+ VICReg expander). `model(inputs, mask, actions=None)` ->
  `(predictions [B, L, E], {"context": latents [B, L, E]})`; `model.apply(..., method="encode")`
  runs the encoder alone (also with target-encoder weights: `{"params": {"encoder": target}}`);
  `method="expand"` maps latents `[..., E]` to VICReg embeddings `[..., expander_dims[-1]]`
  (identity when `expander_dims` is empty).
  """

  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  vocab_size: int | None = None
  causal: bool = False
  predictor_dim: int = 64
  predictor_layers: int = 1
  predictor_heads: int = 4
  predictor_mlp_dim: int = 128
  expander_dims: tuple[int, ...] = (512, 512)  # VICReg expander widths; () = terms on the latents
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = SequenceEncoder(
        self.embed_dim,
        self.num_layers,
        self.num_heads,
        self.mlp_dim,
        self.vocab_size,
        self.causal,
        self.dtype,
        self.param_dtype,
    )
    self.predictor = Predictor(
        self.predictor_dim,
        self.predictor_layers,
        self.predictor_heads,
        self.predictor_mlp_dim,
        self.dtype,
        self.param_dtype,
    )
    if self.expander_dims:
      self.expander = Expander(tuple(self.expander_dims), self.dtype, self.param_dtype)

  def encode(self, inputs, mask=None, deterministic: bool = True):
    return self.encoder(inputs, mask, deterministic)

  def expand(self, latents):
    return self.expander(latents) if self.expander_dims else latents

  def __call__(self, inputs, mask, actions=None, deterministic: bool = True):
    latents, _ = self.encoder(inputs, mask, deterministic)
    return (
        self.predictor(latents, mask, actions, deterministic),
        {"context": latents, "embeddings": self.expand(latents)},
    )


def jepa_loss(
    model: JEPAWorldModel,
    params,
    target_params,
    inputs,
    mask,
    actions=None,
    *,
    inv_coef: float = 25.0,
    var_coef: float = 25.0,
    cov_coef: float = 1.0,
    gamma: float = 1.0,
    normalize_targets: bool = True,
    vicreg_on: str = "masked",
):
  """JEPA + VICReg loss (module docstring). Returns `(loss, aux)`: the terms, logged statistics,
  the `context` latents `[B, L, E]` and the VICReg `embeddings` `[B, L, D]`. Gradients flow to `params` only (targets are under
  `stop_gradient`). `vicreg_on`: which positions' embeddings feed the variance / covariance terms.
  "masked" (default): the latents the encoder infers from context alone. "all": every position; then
  the visible positions (85% of them) are pushed to keep the spread up with whatever varies most,
  i.e. observation noise, and a linear probe on them lost to a random encoder in every setting of
  benchmarks/jepa_probe.py (its docstring has the numbers)."""
  if vicreg_on not in ("all", "masked"):
    raise ValueError(f"vicreg_on must be 'all' or 'masked', got {vicreg_on!r}.")
  targets, _ = model.apply({"params": {"encoder": target_params}}, inputs, method="encode")
  targets = jax.lax.stop_gradient(targets.astype(jnp.float32))
  if normalize_targets:  # per-position layer norm without affine params, as in I-JEPA
    mean = jnp.mean(targets, -1, keepdims=True)
    targets = (targets - mean) * jax.lax.rsqrt(jnp.var(targets, -1, keepdims=True) + 1e-6)
  predictions, aux = model.apply({"params": params}, inputs, mask, actions)
  e = predictions.shape[-1]
  w = mask.reshape(-1).astype(jnp.float32)
  flat_predictions, flat_targets = predictions.reshape(-1, e), targets.reshape(-1, e)
  inv = invariance(flat_predictions, flat_targets, w)
  context = aux["context"].reshape(-1, e).astype(jnp.float32)
  embeddings = aux["embeddings"].reshape(context.shape[0], -1).astype(jnp.float32)
  vicreg_rows = w if vicreg_on == "masked" else jnp.ones_like(w)
  var, cov = variance_covariance(embeddings, vicreg_rows, gamma)
  target_var, target_cov = variance_covariance(flat_targets, w, gamma)
  loss = inv_coef * inv + var_coef * var + cov_coef * cov
  std = jnp.sqrt(jnp.diagonal(_weighted_moments(context, jnp.ones(context.shape[0]))))
  embedding_std = jnp.sqrt(
      jnp.diagonal(_weighted_moments(embeddings, vicreg_rows))
  )  # rows the hinge sees
  prediction_std = jnp.sqrt(
      jnp.diagonal(
          _weighted_moments(jax.lax.stop_gradient(flat_predictions.astype(jnp.float32)), w)
      )
  )
  return loss, {
      "invariance": inv,
      "variance": var,
      "covariance": cov,
      "target_variance": target_var,
      "target_covariance": target_cov,
      "context_std_mean": jnp.mean(std),
      "context_std_min": jnp.min(std),
      "embedding_std_mean": jnp.mean(embedding_std),
      "embedding_std_min": jnp.min(embedding_std),
      "prediction_std_mean": jnp.mean(prediction_std),
      "context": aux["context"],
      "embeddings": aux["embeddings"],
  }
