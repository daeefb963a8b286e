"""Hybrid attention / selective-SSM block (Jamba, Lieber et al. 2024), optional MoE and Titans memory.

`HybridBlock(num_heads=4, mlp_dim=512)(x)` maps `x [B, T, E] -> (x [B, T, E], aux)`. A block is
`num_layers` residual layers (default 8); each layer is

    x = x + mixer(rms_norm(x))            mixer: causal self-attention or `SelectiveSSM`
    x = x + memory(rms_norm(x))           only in the attention layer, when use_memory
    x = x + ffn(rms_norm(x))              SwiGLU `MLP`, or `MoE` on the MoE layers

Layout rule (Jamba's `attn_layer_period=8, attn_layer_offset=4`, `expert_layer_period=2,
expert_layer_offset=1`): layer j of a block (0-based) uses attention iff
`j == attention_index` (default `num_layers // 2`) and the SSM otherwise, so the default is
attention : SSM = 1 : 7; it uses an MoE feed-forward iff `moe_every > 0` and
`j % moe_every == moe_every - 1`. A model stacks identical blocks (`models/hybrid.py`, which
scans over them), so in a stack layer i is attention iff `i % num_layers == attention_index`.
`layer_kinds(...)` returns the per-layer (mixer, ffn) pattern.

Optional Titans neural memory (`use_memory=True`): a `NeuralMemory` residual sublayer after the
attention mixer (memory as a layer); its state lives in the `memory` collection (pass
`mutable=["memory"]` to keep what it learned at test time).

Incremental decoding (`decode=True`): the attention layer keeps its KV cache and every SSM layer
its conv + SSM state in the `cache` collection. Initialise with a `[B, cache_len, E]` input,
then call with `mutable=["cache"]` (plus "memory" with use_memory) on a prompt and then one token
at a time; this equals the full forward pass (with memory: when `memory_chunk_size == 1`, or
when the calls split the sequence at memory-chunk boundaries).

Params carry logical axis names (`embed, mlp, heads, kv, expert`). aux: per layer
`layer_{j}` -> float32 scalars: `ssm_delta_mean` (mean SSM step size), MoE `max_load_ratio` /
`dropped_fraction`, memory `memory_loss_before` / `memory_loss_after` / `memory_grad_norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nexus_jax.layers.attention import Attention
from nexus_jax.layers.feedforward import MLP
from nexus_jax.layers.memory import NeuralMemory
from nexus_jax.layers.moe import MoE
from nexus_jax.layers.norms import RMSNorm
from nexus_jax.layers.ssm import SelectiveSSM

Dtype = Any


def layer_kinds(
    num_layers: int = 8, attention_index: int | None = None, moe_every: int = 0
) -> list[tuple[str, str]]:
  """`[(mixer, ffn)]` per layer of one block: mixer "attention" | "ssm", ffn "mlp" | "moe"."""
  if num_layers < 1:
    raise ValueError(f"HybridBlock.num_layers must be >= 1; got {num_layers}.")
  a = num_layers // 2 if attention_index is None else attention_index
  if not 0 <= a < num_layers:
    raise ValueError(
        f"HybridBlock.attention_index must be in [0, num_layers={num_layers}); "
        f"got {attention_index}."
    )
  if moe_every < 0:
    raise ValueError(f"HybridBlock.moe_every must be >= 0 (0: no MoE); got {moe_every}.")
  return [
      (
          "attention" if j == a else "ssm",
          "moe" if moe_every and j % moe_every == moe_every - 1 else "mlp",
      )
      for j in range(num_layers)
  ]


class HybridBlock(nn.Module):
  """`num_layers` pre-RMSNorm residual layers, attention at `attention_index`, SSM elsewhere."""

  num_heads: int
  mlp_dim: int  # SwiGLU width (per expert on MoE layers)
  num_layers: int = 8  # layers per block (Jamba: 8)
  attention_index: int | None = None  # None: num_layers // 2 (Jamba: 4 of 8)
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rotary_fraction: float = 1.0
  rope_theta: float = 10000.0
  attention_backend: str = "xla"
  activation: str = "swiglu"
  dropout_rate: float = 0.0  # on each sublayer's output
  ssm_state_dim: int = 16
  ssm_expand: int = 2
  ssm_conv_width: int = 4
  ssm_scan_method: str = "chunked"
  ssm_chunk_size: int = 64
  moe_every: int = 0  # 0: dense; e: layers j with j % e == e - 1 are MoE (Jamba: 2)
  num_experts: int = 8
  moe_top_k: int = 2
  moe_capacity_factor: float | None = None  # None: dropless
  moe_renormalize: bool = True  # top-k router weights sum to 1 (a lone expert keeps its prob.)
  moe_top_p: float | None = None  # dynamic experts: until their mass reaches p (<= moe_top_k)
  moe_load_balance_coef: float = 1e-2
  moe_z_loss_coef: float = 1e-3
  use_memory: bool = False  # Titans memory sublayer in the attention layer
  memory_heads: int = 4
  memory_chunk_size: int = 16
  memory_depth: int = 2
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _sublayer(self, name, x, fn, deterministic):
    """`x + dropout(fn(rms_norm(x)))`; fn returns (y, aux)."""
    h = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_norm")(x)
    y, aux = fn(h)
    y = nn.Dropout(self.dropout_rate, name=f"{name}_dropout")(y, deterministic=deterministic)
    return x + y.astype(x.dtype), aux

  def _layer(self, j, mixer, ffn, x, positions, mask, deterministic):
    pre = f"layer_{j}"
    aux = {}
    if mixer == "attention":
      attn = Attention(
          num_heads=self.num_heads,
          num_kv_heads=self.num_kv_heads,
          head_dim=self.head_dim,
          causal=True,
          rotary_fraction=self.rotary_fraction,
          rope_theta=self.rope_theta,
          backend=self.attention_backend,
          decode=self.decode,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"{pre}_attention",
      )
      x, _ = self._sublayer(
          f"{pre}_attention",
          x,
          lambda h: (attn(h, mask=mask, positions=positions), None),
          deterministic,
      )
      if self.use_memory:
        memory = NeuralMemory(
            num_heads=self.memory_heads,
            chunk_size=self.memory_chunk_size,
            depth=self.memory_depth,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"{pre}_memory",
        )
        x, m = self._sublayer(f"{pre}_memory", x, memory, deterministic)
        aux.update(
            memory_loss_before=jnp.mean(m["loss_before"]),
            memory_loss_after=jnp.mean(m["loss_after"]),
            memory_grad_norm=jnp.mean(m["grad_norm"]),
        )
    else:
      ssm = SelectiveSSM(
          state_dim=self.ssm_state_dim,
          expand=self.ssm_expand,
          conv_width=self.ssm_conv_width,
          scan_method=self.ssm_scan_method,
          chunk_size=self.ssm_chunk_size,
          decode=self.decode,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"{pre}_ssm",
      )
      x, s = self._sublayer(f"{pre}_ssm", x, ssm, deterministic)
      aux["ssm_delta_mean"] = jnp.mean(s["delta"])
    if ffn == "moe":
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
          decode=self.decode,  # dropless while decoding: rows stay independent
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"{pre}_moe",
      )
      # A [B, T] padding mask is the token mask; while decoding masks index cache slots.
      token_mask = mask if (mask is not None and mask.ndim == 2 and not self.decode) else None
      x, m = self._sublayer(
          f"{pre}_moe", x, lambda h: moe(h, token_mask, deterministic), deterministic
      )
      aux.update(moe_max_load_ratio=m["max_load_ratio"], moe_dropped_fraction=m["dropped_fraction"])
    else:
      mlp = MLP(
          self.mlp_dim,
          activation=self.activation,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"{pre}_mlp",
      )
      x, _ = self._sublayer(f"{pre}_mlp", x, lambda h: (mlp(h, deterministic), None), deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), aux

  @nn.compact
  def __call__(self, x, positions=None, mask=None, deterministic: bool = True):
    """x `[B, T, E]`; positions `[B, T]` (RoPE; default 0.. or the cache index onwards); mask
    `[B, T]` key padding (attention and MoE only; the SSM reads every position, so pad on the
    right), or `[B, cache_len]` cache-slot mask while decoding. Returns `(x, aux)`."""
    if x.ndim != 3:
      raise ValueError(f"HybridBlock input must be [batch, length, embed]; got {x.shape}.")
    kinds = layer_kinds(self.num_layers, self.attention_index, self.moe_every)
    aux = {}
    for j, (mixer, ffn) in enumerate(kinds):
      x, layer_aux = self._layer(j, mixer, ffn, x, positions, mask, deterministic)
      aux[f"layer_{j}"] = {k: v.astype(jnp.float32) for k, v in layer_aux.items()}
    return x, aux
