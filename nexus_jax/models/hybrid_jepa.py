"""JEPA auxiliary objective for a `HybridLM`: predict a target encoder's latents `horizon` bytes ahead.

`HybridJEPA(lm=HybridLM(...), weight=1.0)(tokens)` returns the LM's `(logits [B, T, V], aux)`
and, in training (`deterministic=False`), sows into the `aux_loss` collection (which the training
loop adds to the objective and logs as `aux/jepa`)

    weight * (inv_coef * mean ||P(h_t) - t_{t+k}||^2 / E                 invariance
              + var_coef * mean_j relu(gamma - std_j(h))                   variance hinge
              + cov_coef * sum_{i != j} cov_ij(h)^2 / E)                   covariance

with h `[B, T, E]` the online model's final hidden states, P a SwiGLU predictor, k = `horizon`
and t the target encoder's hidden states (per-position layer-normalised, no gradient). The
target encoder is the same `HybridLM` whose weights are an exponential moving average of the
online weights (`models/world_model.py`'s `ema_update`), kept in the `jepa_target` collection:
created at init as a copy, updated on every training call where that collection is mutable
(as in `train/steps.py`, which makes every persistent collection mutable). The VICReg terms are
`world_model.invariance` / `variance_covariance`. aux gains `jepa_invariance`, `jepa_variance`,
`jepa_covariance` (float32 scalars) in training.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers.feedforward import MLP
from nexus_jax.models import world_model
from nexus_jax.models.hybrid import HybridLM


class HybridJEPA(nn.Module):
  """`tokens [B, T]` -> `(logits [B, T, V], aux)`; the JEPA loss is sown (module docstring)."""

  lm: HybridLM
  weight: float = 1.0
  horizon: int = 4  # predict the target latent this many positions ahead
  ema_decay: float = 0.99
  predictor_mult: int = 2  # predictor hidden width = predictor_mult * d_model
  inv_coef: float = 25.0
  var_coef: float = 25.0
  cov_coef: float = 1.0
  gamma: float = 1.0

  def _check(self, length: int):
    if self.weight <= 0:
      raise ValueError(
          f"HybridJEPA.weight must be > 0 (use the plain HybridLM for 0); got " f"{self.weight}."
      )
    if not 1 <= self.horizon < length:
      raise ValueError(
          f"HybridJEPA.horizon must be in [1, sequence length {length}); got " f"{self.horizon}."
      )
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"HybridJEPA.ema_decay must be in [0, 1); got {self.ema_decay}.")

  @nn.compact
  def __call__(self, inputs, mask=None, deterministic: bool = True):
    self._check(inputs.shape[1])
    logits, aux = self.lm(inputs, mask=mask, deterministic=deterministic)
    online = self.lm.variables["params"]
    target = self.variable("jepa_target", "params", lambda: jax.tree.map(jnp.copy, online))
    predictor = MLP(self.predictor_mult * self.lm.d_model, activation="swiglu", name="predictor")
    h = aux["hidden"].astype(jnp.float32)
    predictions = predictor(h[:, : -self.horizon])
    if deterministic or self.is_initializing():
      return logits, aux

    target_lm = self.lm.clone(parent=None, decode=False)
    _, target_aux = target_lm.apply({"params": target.value}, inputs, mask=mask)
    t = jax.lax.stop_gradient(target_aux["hidden"].astype(jnp.float32))[:, self.horizon :]
    t = (t - t.mean(-1, keepdims=True)) * jax.lax.rsqrt(t.var(-1, keepdims=True) + 1e-6)
    e = h.shape[-1]
    weights = None
    if mask is not None:  # both the source and the predicted position must be real tokens
      m = mask.astype(bool)
      weights = (m[:, : -self.horizon] & m[:, self.horizon :]).reshape(-1)
    inv = world_model.invariance(predictions.reshape(-1, e), t.reshape(-1, e), weights)
    var, cov = world_model.variance_covariance(
        h.reshape(-1, e), None if mask is None else mask.reshape(-1), self.gamma
    )
    loss = self.inv_coef * inv + self.var_coef * var + self.cov_coef * cov
    self.sow("aux_loss", "jepa", self.weight * loss)
    if self.is_mutable_collection("jepa_target"):
      target.value = world_model.ema_update(
          target.value, jax.lax.stop_gradient(online), self.ema_decay
      )
    return logits, {**aux, "jepa_invariance": inv, "jepa_variance": var, "jepa_covariance": cov}
