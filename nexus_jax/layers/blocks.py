"""Transformer blocks and a layer stack (scan over layers, remat, shared weights).

`TransformerBlock`: self-attention, optional cross-attention, then a dense MLP or an MoE, each a
residual sublayer with dropout, in pre-norm (`x + f(norm(x))`) or post-norm
(`norm(x + f(x))`) placement. Returns `(x, aux)`: aux holds the MoE statistics (empty dict for a
dense block). With an adaptive `norm` ("adaptive_rms" / "adaptive_layer", `layers/norms.py`) every
norm takes its scale and shift from the `condition [B, C]` argument (the last of the call).

`TransformerStack(block=TransformerBlock(...), num_layers=L)` repeats a block template:
- `scan_layers=True`: `nn.scan` over layers; params get a leading `[L]` axis (logical name None)
  and so do the `cache` and `aux_loss` collections; compile time is independent of L.
- `share_layers=True`: one set of block weights applied L times (ALBERT-style; the seed's
  `share_layers`), always via `nn.scan` with broadcast params; each layer keeps its own KV cache.
- `remat_policy`: "none" | "full" (recompute everything) | "dots" | "dots_with_no_batch_dims"
  (save matmul outputs, recompute the rest), applied per block with `nn.remat`.
The stack's aux is the per-layer aux stacked on a leading `[L]` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers.attention import Attention
from nexus_jax.layers.feedforward import MLP
from nexus_jax.layers.moe import MoE
from nexus_jax.layers.norms import apply_norm, make_norm

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class TransformerBlock(nn.Module):
  """`x [B, T, E] -> (x [B, T, E], aux)`; hyperparameters map 1:1 onto the sublayers."""

  num_heads: int
  mlp_dim: int  # dense MLP width, or per-expert width when num_experts > 0
  num_kv_heads: int | None = None
  head_dim: int | None = None
  causal: bool = False
  cross_attention: bool = False  # add a cross-attention sublayer over `context`
  norm: str = "rms"  # "rms" | "layer" | "adaptive_rms" | "adaptive_layer" (needs `condition`)
  norm_epsilon: float = 1e-6  # epsilon of every norm (the final one included)
  norm_placement: str = "pre"  # "pre" | "post"
  activation: str = "swiglu"
  dropout_rate: float = 0.0  # on each sublayer's output, before the residual add
  rotary_fraction: float = 1.0
  rope_theta: float = 10000.0
  qk_norm: bool = False
  attention_backend: str = "xla"
  block_sizes: Any = None
  fourier_modes: int | None = None
  num_experts: int = 0  # 0: dense MLP
  moe_top_k: int = 2
  moe_capacity_factor: float | None = None  # None: dropless
  moe_renormalize: bool = True  # top-k router weights renormalised to sum to 1
  moe_top_p: float | None = None  # dynamic experts: until their mass reaches p (<= moe_top_k)
  moe_load_balance_coef: float = 1e-2
  moe_z_loss_coef: float = 1e-3
  moe_router_jitter: float = 0.0
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _residual(self, name, x, fn, deterministic, condition=None):
    """One sublayer in the configured norm placement; fn returns (y, aux)."""
    module = make_norm(
        self.norm,
        epsilon=self.norm_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"{name}_norm",
    )
    norm = lambda h: apply_norm(module, h, condition)
    drop = nn.Dropout(self.dropout_rate, name=f"{name}_dropout")
    if self.norm_placement == "pre":
      y, aux = fn(norm(x))
      return x + drop(y, deterministic=deterministic).astype(x.dtype), aux
    y, aux = fn(x)
    return norm(x + drop(y, deterministic=deterministic).astype(x.dtype)), aux

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
    """x `[B, T, E]`; context `[B, S, E_ctx]` for cross-attention; mask/segment_ids/positions
    as in `Attention` (mask on self-attention keys; a `[B, T]` mask is also the MoE token mask,
    except while decoding); context_mask `[B, S]` on cross-attention keys; condition `[B, C]`
    for adaptive norms."""
    if self.norm_placement not in ("pre", "post"):
      raise ValueError(f"norm_placement must be 'pre' or 'post'; got {self.norm_placement!r}.")
    if self.cross_attention and context is None and not self.decode:
      raise ValueError("TransformerBlock(cross_attention=True) needs `context`.")
    attn_kw = dict(
        num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        qk_norm=self.qk_norm,
        backend=self.attention_backend,
        block_sizes=self.block_sizes,
        fourier_modes=self.fourier_modes,
        decode=self.decode,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    self_attn = Attention(
        causal=self.causal,
        rotary_fraction=self.rotary_fraction,
        rope_theta=self.rope_theta,
        name="self_attention",
        **attn_kw,
    )
    x, _ = self._residual(
        "self_attention",
        x,
        lambda h: (self_attn(h, mask=mask, segment_ids=segment_ids, positions=positions), None),
        deterministic,
        condition,
    )
    if self.cross_attention:
      cross = Attention(cross_attention=True, name="cross_attention", **attn_kw)
      x, _ = self._residual(
          "cross_attention",
          x,
          lambda h: (cross(h, context, mask=context_mask), None),
          deterministic,
          condition,
      )
    if self.num_experts > 0:
      moe = MoE(
          num_experts=self.num_experts,
          mlp_dim=self.mlp_dim,
          top_k=self.moe_top_k,
          activation=self.activation,
          capacity_factor=self.moe_capacity_factor,
          renormalize=self.moe_renormalize,
          top_p=self.moe_top_p,
          load_balance_coef=self.moe_load_balance_coef,
          z_loss_coef=self.moe_z_loss_coef,
          router_jitter=self.moe_router_jitter,
          decode=self.decode,  # dropless while decoding: rows stay independent
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="moe",
      )
      # A [B, T] key-padding mask doubles as the token mask. While decoding, masks index cache
      # slots ([B, cache_len]), not the step's tokens, so every step token is routed.
      token_mask = mask if (mask is not None and mask.ndim == 2 and not self.decode) else None
      x, aux = self._residual(
          "mlp", x, lambda h: moe(h, token_mask, deterministic), deterministic, condition
      )
    else:
      mlp = MLP(
          self.mlp_dim,
          activation=self.activation,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="mlp",
      )
      x, _ = self._residual(
          "mlp", x, lambda h: (mlp(h, deterministic), None), deterministic, condition
      )
      aux = {}
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), aux


def _template_kwargs(module: nn.Module) -> dict[str, Any]:
  return {
      f.name: getattr(module, f.name)
      for f in dataclasses.fields(module)
      if f.init and f.name not in ("parent", "name")
  }


class TransformerStack(nn.Module):
  """`num_layers` copies of the `block` template; `x [B, T, E] -> (x, aux stacked on [L])`."""

  block: TransformerBlock
  num_layers: int
  scan_layers: bool = True
  share_layers: bool = False
  remat_policy: str = "none"
  final_norm: bool = True  # a norm after the last block (what pre-norm stacks need)

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
    """Same arguments as `TransformerBlock`; `condition [B, C]` also feeds the final norm."""
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"Unknown remat_policy {self.remat_policy!r}; choose one of " f"{sorted(REMAT_POLICIES)}."
      )
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1; got {self.num_layers}.")
    kwargs = _template_kwargs(self.block)
    cls = type(self.block)
    scanned = self.scan_layers or self.share_layers
    if self.remat_policy != "none":
      cls = nn.remat(
          cls,
          policy=REMAT_POLICIES[self.remat_policy],
          prevent_cse=not scanned,
          static_argnums=(7,),
      )  # self=0, ..., deterministic=7
    args = (context, segment_ids, positions, mask, context_mask, deterministic, condition)
    if scanned:
      per_layer = {"cache": 0, "aux_loss": 0, "intermediates": 0}
      if self.share_layers:
        scan_kw = dict(
            variable_axes=per_layer,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
        )
      else:
        scan_kw = dict(
            variable_axes={"params": 0, **per_layer},
            split_rngs={"params": True, "dropout": True},
            metadata_params={nn.PARTITION_NAME: None},
        )
      stack = nn.scan(cls, in_axes=(nn.broadcast,) * len(args), length=self.num_layers, **scan_kw)(
          **kwargs, name="layers"
      )
      x, aux = stack(x, *args)
    else:
      auxes = []
      for i in range(self.num_layers):
        x, aux = cls(**kwargs, name=f"layers_{i}")(x, *args)
        auxes.append(aux)
      aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
    if self.final_norm:
      norm = make_norm(
          self.block.norm,
          epsilon=self.block.norm_epsilon,
          dtype=self.block.dtype,
          param_dtype=self.block.param_dtype,
          name="final_norm",
      )
      x = apply_norm(norm, x, condition)
    return x, aux
