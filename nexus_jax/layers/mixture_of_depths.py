"""Mixture-of-Depths (Raposo et al. 2024): routed blocks that process only the top-k tokens.

`MoDBlock(mod_capacity=0.5, **TransformerBlock fields)`: `x [B, T, E] -> (x [B, T, E], aux)`.
- A float32 router (`[E] -> 1`) scores every token; the `k = ceil(mod_capacity * T)` best of each
  row (padding, `mask [B, T]` False, goes last) are gathered in causal order (the top-k indices
  re-sorted) and run through the wrapped `TransformerBlock` at their ORIGINAL positions (RoPE sees
  them; the causal mask keeps their order; skipped tokens are absent from the block's attention).
  `sigmoid(router_logit) * (block_out - block_in)` is scattered back onto the residual stream;
  the other tokens pass through unchanged. k is a Python int, so shapes are static (jit, nn.scan,
  remat); the block's matmul FLOPs scale with the capacity c, its attention scores with c^2.
- Top-k over the sequence is not causal, so a predictor (a linear map of the stop-gradient block
  input, float32) learns top-k membership: its binary cross-entropy, times `mod_predictor_coef`, is
  sown into "aux_loss" as `mod_predictor` (the stop-gradient keeps it from steering the LM).
- Decoding (`decode=True`) routes with the predictor: logit > 0 sends the token through the block.
  The layer keeps `routed [B, L]` bool and its own `cache_index [B]` in the "cache" collection
  (rewound with the attention's by `decoding.set_cache_index`); each step's tokens are marked
  routed or skipped before the block runs, and the block's attention takes `routed` (and the
  caller's `[B, L]` cache mask) as its key mask, so no later token attends to a skipped one, as in
  training. The block runs on every step token (a step is one token or a prompt); skipped tokens
  keep their input. Equal to the full forward whenever the predictor agrees with top-k.
- Sown "intermediates": `mod_router_logits` and `mod_predictor_logits` `[B, T]`.

`MoDGroup`: `mod_every` blocks as one scan unit (every `mod_every`-th routed, combined with MoE's
`moe_every`), the MoD counterpart of `models.transformer.MoEGroup`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers.blocks import TransformerBlock

_MOD_FIELDS = ("mod_capacity", "mod_predictor_coef", "mod_every", "moe_every")


def check_capacity(capacity: float, name: str = "mod_capacity"):
  """Raises ValueError unless `0 < capacity <= 1`."""
  if not 0.0 < capacity <= 1.0:
    raise ValueError(
        f"{name} must be in (0, 1] (the fraction of tokens a routed block processes; 1.0 = every "
        f"token); got {capacity}."
    )


def routed_tokens(capacity: float, length: int) -> int:
  """`k = ceil(capacity * length)` tokens per row (at least 1), robust to float rounding."""
  check_capacity(capacity)
  return max(1, min(length, math.ceil(round(capacity * length, 6))))


def _block_kwargs(module: nn.Module) -> dict:
  return {
      f: getattr(module, f)
      for f in TransformerBlock.__dataclass_fields__
      if f not in ("parent", "name") and f not in _MOD_FIELDS
  }


def _logit(module: nn.Module, x_BTE, name: str):
  """A float32 `[E] -> 1` projection: `[B, T, E] -> [B, T]`."""
  dense = nn.Dense(
      1,
      dtype=jnp.float32,
      param_dtype=module.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
      name=name,
  )
  b, t, e = x_BTE.shape
  return dense(x_BTE.reshape(b * t, e).astype(jnp.float32)).reshape(b, t)


class MoDBlock(TransformerBlock):
  """A `TransformerBlock` applied to the top-k tokens per row; see the module docstring."""

  mod_capacity: float = 0.5  # fraction of each row's tokens the block processes, in (0, 1]
  mod_predictor_coef: float = 0.01  # weight of the predictor's BCE in "aux_loss"

  @nn.compact
  def __call__(
      self,
      x,
      context=None,
      segment_ids=None,
      positions=None,
      mask=None,
      context_mask=None,
      deterministic: bool = True,
      condition=None,
  ):
    """Arguments as `TransformerBlock`; `mask` is a `[B, T]` key-padding mask (decoding: the
    `[B, cache_len]` cache-slot mask) and `segment_ids`/`positions` are `[B, T]`."""
    check_capacity(self.mod_capacity)
    b, t, _ = x.shape
    block = TransformerBlock(**_block_kwargs(self), name="block")
    router_BT = _logit(self, x, "router")
    predictor_BT = _logit(self, jax.lax.stop_gradient(x), "predictor")
    self.sow("intermediates", "mod_router_logits", router_BT)
    self.sow("intermediates", "mod_predictor_logits", predictor_BT)
    args = (context_mask, deterministic, condition)
    if self.decode:
      return self._decode(block, x, router_BT, predictor_BT, context, positions, mask, *args)

    if mask is not None and mask.shape != (b, t):
      raise ValueError(
          f"MoDBlock takes a [batch, length] = {(b, t)} key-padding mask (routing drops tokens, "
          f"so a 4-D mask cannot follow them); got {mask.shape}."
      )
    k = routed_tokens(self.mod_capacity, t)
    score = router_BT if mask is None else jnp.where(mask, router_BT, -jnp.inf)
    idx_BK = jnp.sort(jax.lax.top_k(jax.lax.stop_gradient(score), k)[1], axis=-1)  # causal order
    take = lambda a: jnp.take_along_axis(a, idx_BK.reshape(b, k, *([1] * (a.ndim - 2))), axis=1)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_BKE = take(x)
    y_BKE, aux = block(
        x_BKE,
        context,
        None if segment_ids is None else take(segment_ids),
        take(positions),
        None if mask is None else take(mask),
        *args,
    )
    w_BK1 = jax.nn.sigmoid(take(router_BT))[..., None]
    rows = jnp.arange(b)[:, None]
    x = x.at[rows, idx_BK].add((w_BK1 * (y_BKE - x_BKE).astype(jnp.float32)).astype(x.dtype))

    chosen_BT = jnp.zeros((b, t), jnp.float32).at[rows, idx_BK].set(1.0)
    bce = jax.nn.softplus(predictor_BT) - predictor_BT * chosen_BT  # BCE with logits
    valid = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    bce = jnp.sum(bce * valid) / jnp.maximum(valid.sum(), 1.0)
    if self.mod_predictor_coef:
      self.sow("aux_loss", "mod_predictor", self.mod_predictor_coef * bce)
    return x, aux

  def _decode(self, block, x, router_BT, predictor_BT, context, positions, mask, *args):
    """One decoding call: the predictor routes, the `routed` cache hides skipped keys."""
    b, t, _ = x.shape
    initialised = self.has_variable("cache", "routed")
    routed = self.variable("cache", "routed", jnp.zeros, (b, t), jnp.bool_)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((b,), jnp.int32))
    route_BT = predictor_BT > 0
    key_mask = mask
    if initialised:  # (at init the full-length dummy input just creates the variables)
      start = jnp.broadcast_to(index.value, (b,)).astype(jnp.int32)
      slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      routed.value = routed.value.at[jnp.arange(b)[:, None], slots].set(route_BT, mode="drop")
      index.value = start + t
      key_mask = routed.value if mask is None else routed.value & mask.astype(bool)
    y, aux = block(x, context, None, positions, key_mask, *args)
    w_BT1 = jnp.where(route_BT, jax.nn.sigmoid(router_BT), 0.0)[..., None]
    return x + (w_BT1 * (y - x).astype(jnp.float32)).astype(x.dtype), aux


class MoDGroup(TransformerBlock):
  """`group_size` blocks as one scan unit: block i (from 1) is routed (`MoDBlock`) when
  `mod_every` divides i and has experts when `moe_every` divides i; `group_size =
  lcm(mod_every, moe_every)` (moe_every counts only with experts). Same call and `(x, aux)`
  result as `TransformerBlock` (aux: the last block's, which is routed and, with experts, MoE)."""

  mod_every: int = 2
  mod_capacity: float = 0.5
  mod_predictor_coef: float = 0.01
  moe_every: int = 1

  @property
  def group_size(self) -> int:
    return math.lcm(self.mod_every, self.moe_every if self.num_experts > 0 else 1)

  @nn.compact
  def __call__(
      self,
      x,
      context=None,
      segment_ids=None,
      positions=None,
      mask=None,
      context_mask=None,
      deterministic: bool = True,
      condition=None,
  ):
    if self.mod_every < 1 or self.moe_every < 1:
      raise ValueError(
          f"mod_every ({self.mod_every}) and moe_every ({self.moe_every}) must be >= 1."
      )
    kw = _block_kwargs(self)
    for i in range(1, self.group_size + 1):
      experts = self.num_experts if i % self.moe_every == 0 else 0
      if i % self.mod_every == 0:
        layer = MoDBlock(
            **{**kw, "num_experts": experts},
            mod_capacity=self.mod_capacity,
            mod_predictor_coef=self.mod_predictor_coef,
            name=f"block_{i - 1}",
        )
      else:
        layer = TransformerBlock(**{**kw, "num_experts": experts}, name=f"block_{i - 1}")
      x, aux = layer(
          x, context, segment_ids, positions, mask, context_mask, deterministic, condition
      )
    return x, aux
