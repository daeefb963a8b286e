"""Decoder-only Mixture-of-Experts language model (NeuralFlex style) with size presets.

`LanguageModel` is a `transformer.Decoder` with language-model defaults: token input, LM head,
grouped-query attention, full RoPE, RMSNorm (pre-norm), SwiGLU experts with top-2 routing and the
load-balancing + router z-losses sown for the training loop. `tokens [B, T] -> (logits [B, T, V],
aux)`; everything in `models/decoding.py` and `inference/` works on it unchanged.

    model = LanguageModel.from_preset("small", vocab_size=256)
    dense = dense_equivalent(model)   # same active parameters per token, no experts

Presets (per-expert `mlp_dim`; with `moe_top_k=2` a token sees 2 experts):
  tiny  2 layers,  d 64,  4 heads / 2 kv,  4 experts
  small 4 layers,  d 128, 4 heads / 2 kv,  8 experts
  base  8 layers,  d 512, 8 heads / 2 kv,  8 experts
  large 16 layers, d 1024, 16 heads / 4 kv, 16 experts
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from nexus_jax.models.transformer import Decoder

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128, num_experts=4
    ),
    "small": dict(
        num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, mlp_dim=256, num_experts=8
    ),
    "base": dict(
        num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=2, mlp_dim=1024, num_experts=8
    ),
    "large": dict(
        num_layers=16, embed_dim=1024, num_heads=16, num_kv_heads=4, mlp_dim=2048, num_experts=16
    ),
}


class LanguageModel(Decoder):
  """`tokens [B, T]` int -> `(logits [B, T, vocab_size], aux)`; see the module docstring."""

  vocab_size: int = 256
  head: str = "lm"
  num_kv_heads: int | None = 2
  num_experts: int = 8
  moe_top_k: int = 2
  norm: str = "rms"
  activation: str = "swiglu"
  rotary_fraction: float = 1.0

  def validate(self):
    super().validate()
    if self.head != "lm" or self.vocab_size < 1 or self.cross_attention:
      raise ValueError(
          "LanguageModel: needs head='lm', vocab_size >= 1 and no cross-attention; "
          "use transformer.Decoder for other set-ups."
      )

  @classmethod
  def from_preset(cls, preset: str, **overrides) -> "LanguageModel":
    """The named preset (tiny | small | base | large) with field overrides."""
    if preset not in PRESETS:
      raise ValueError(f"unknown LanguageModel preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[preset], **overrides})


def dense_equivalent(model: Decoder) -> Decoder:
  """The same model without experts and with `mlp_dim * top_k`: equal active params per token
  (up to the router's `embed * num_experts` weights per MoE layer)."""
  if model.num_experts == 0:
    return model
  if model.moe_every != 1:
    raise ValueError("dense_equivalent needs moe_every=1 (every layer MoE).")
  return model.clone(num_experts=0, mlp_dim=model.mlp_dim * model.moe_top_k)


def count_params(params: Any) -> int:
  """Total number of parameters."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def active_params(model: Decoder, params: Any) -> int:
  """Parameters used per token: all but the (num_experts - top_k) unused experts' weights."""
  params = nn.unbox(params)
  total = count_params(params)
  if model.num_experts == 0:
    return total
  expert = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path if isinstance(getattr(p, "key", None), str)]
    if "moe" in keys and keys[-1] in ("wi", "wi_gate", "wi_up", "wo"):
      expert += int(np.prod(leaf.shape))
  unused = 1 - model.moe_top_k / model.num_experts
  return int(total - round(expert * unused))


def bits_per_token(nats: float) -> float:
  """Cross-entropy in nats -> bits (per token; per byte for byte-level models)."""
  return nats / math.log(2.0)


def lm_from_config(mc: Any) -> "LanguageModel":
  """`LanguageModel` (byte vocabulary) from a `config.model` section (configs/lm.py)."""
  return LanguageModel(
      vocab_size=256,
      num_layers=mc.num_layers,
      embed_dim=mc.embed_dim,
      num_heads=mc.num_heads,
      num_kv_heads=mc.num_kv_heads,
      mlp_dim=mc.mlp_dim,
      num_experts=mc.num_experts,
      moe_top_k=mc.moe_top_k,
      moe_load_balance_coef=mc.moe_load_balance_coef,
      dropout_rate=mc.dropout_rate,
      attention_backend=mc.attention_backend,
  )
