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
and the NeuralFlex-MoE specification (d 2048, 32 heads / 8 kv, 16 experts with 2 active, a
65,536-token vocabulary, 32K context as `max_len=32768`; byte-level runs override `vocab_size`):
  3b    20 layers, mlp 1280 per expert   2,995,537,920 params, 793,528,320 active per token
  7b    32 layers, mlp 2048 per expert   7,047,677,952 params, 1,410,533,376 active
  13b   44 layers, mlp 2816 per expert  12,911,757,312 params, 2,254,030,848 active
"3B" counts every parameter (embedding, untied head with bias, all experts); "active" counts what
one token uses (all but the `num_experts - moe_top_k` unused experts of each MoE layer).
`preset_param_counts(name)` measures both with `jax.eval_shape` (nothing allocated) and
`analytic_param_counts(model)` computes them from the fields; `python -m nexus_jax.models.lm`
prints every preset's counts.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.layers.feedforward import get_activation
from nexus_jax.layers.norms import ADAPTIVE_NORMS
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
    **{
        name: dict(
            num_layers=layers,
            embed_dim=2048,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=mlp,
            num_experts=16,
            moe_top_k=2,
            vocab_size=65_536,
            max_len=32_768,
        )
        for name, layers, mlp in (("3b", 20, 1280), ("7b", 32, 2048), ("13b", 44, 2816))
    },
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
    """The named preset (tiny | small | base | large | 3b | 7b | 13b) with field overrides."""
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


def preset_param_counts(preset: str, **overrides) -> dict[str, int]:
  """`{"total", "active"}` parameters of a preset, from `jax.eval_shape` (nothing allocated)."""
  model = LanguageModel.from_preset(preset, **overrides)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
  return {"total": count_params(shapes), "active": active_params(model, shapes)}


def _norm_params(model: Decoder) -> int:
  e = model.embed_dim
  if model.norm in ADAPTIVE_NORMS:  # scale and shift projections [C, E] + [E] each
    return 2 * (model.condition_dim * e + e)
  return 2 * e if model.norm == "layer" else e


def analytic_param_counts(model: Decoder) -> dict[str, int]:
  """`{"total", "active"}` parameters of a token-input, LM-head `Decoder` from its fields.

  Per block: attention `E*H*D` (query) + `2*E*K*D` (key, value) + `H*D*E` (out) (+ `2*D` with
  qk-norm), two norms, and either a dense MLP (`3*E*F` gated, `2*E*F` otherwise) or an MoE
  (router `E*X` + X experts of that size); blocks are grouped as in `MoEGroup` and stored once
  with `share_layers`. Plus the embedding `V*E`, the learned positions `max_len*E`, the final
  norm and the untied head `E*V` (+ `V` with `head_bias`). Active = total minus the `X - top_k` unused experts of
  each stored MoE block.
  """
  if model.cross_attention or model.head != "lm" or model.vocab_size < 1:
    raise ValueError(
        "analytic_param_counts covers token-input Decoders with head='lm' and no "
        "cross-attention."
    )
  e, h, x, f = model.embed_dim, model.num_heads, model.num_experts, model.mlp_dim
  k, d = model.num_kv_heads or h, model.head_dim or model.embed_dim // model.num_heads
  norm = _norm_params(model)
  attention = 2 * e * h * d + 2 * e * k * d + (2 * d if model.qk_norm else 0)
  ffn = (3 if get_activation(model.activation)[1] else 2) * e * f
  dense_block = attention + 2 * norm + ffn
  moe_block = attention + 2 * norm + e * x + x * ffn
  per_unit = model.moe_every if (x > 0 and model.moe_every > 1) else 1
  unit = (per_unit - 1) * dense_block + moe_block if x > 0 else dense_block
  units = 1 if model.share_layers else model.num_layers // per_unit
  total = units * unit + model.vocab_size * e
  total += model.max_len * e if model.position_embedding == "learned" else 0
  total += norm if model.final_norm else 0
  head_bias = model.vocab_size if model.head_bias else 0
  total += 0 if model.tie_embeddings else e * model.vocab_size + head_bias
  active = total - (units * (x - model.moe_top_k) * ffn if x > 0 else 0)
  return {"total": total, "active": active}


def bits_per_token(nats: float) -> float:
  """Cross-entropy in nats -> bits (per token; per byte for byte-level models)."""
  return nats / math.log(2.0)


def lm_from_config(mc: Any, vocab_size: int = 256, dtype: Any = None) -> "LanguageModel":
  """`LanguageModel` from a `config.model` section (configs/lm.py); `dtype` is the compute dtype
  (`train.compute_dtype`; params stay float32)."""
  return LanguageModel(
      vocab_size=int(vocab_size),
      dtype=dtype,
      num_layers=mc.num_layers,
      embed_dim=mc.embed_dim,
      num_heads=mc.num_heads,
      num_kv_heads=mc.num_kv_heads,
      mlp_dim=mc.mlp_dim,
      num_experts=mc.num_experts,
      moe_top_k=mc.moe_top_k,
      moe_load_balance_coef=mc.moe_load_balance_coef,
      moe_capacity_factor=float(mc.get("moe_capacity_factor", 0.0)) or None,
      dropout_rate=mc.dropout_rate,
      attention_backend=mc.attention_backend,
      position_embedding=mc.get("position_embedding", "rope"),
      max_len=int(mc.get("max_len", 0)),
      use_final_norm=mc.get("use_final_norm", None),
      norm_epsilon=float(mc.get("norm_epsilon", 1e-6)),
      rope_theta=float(mc.get("rope_theta", 10000.0)),
      tie_embeddings=bool(mc.get("tie_embeddings", False)),
      head_bias=bool(mc.get("head_bias", True)),
      moe_renormalize=bool(mc.get("moe_renormalize", True)),
      moe_top_p=float(mc.get("moe_top_p", 0.0)) or None,
      ponder_steps=int(mc.get("ponder_steps", 0)),
      ponder_prior=float(mc.get("ponder_prior", 0.5)),
      ponder_beta=float(mc.get("ponder_beta", 0.01)),
      mod_capacity=float(mc.get("mod_capacity", 1.0)),
      mod_every=int(mc.get("mod_every", 2)),
  )


def main() -> None:
  """Prints one JSON object: the layout and parameter counts of every preset (from eval_shape)."""
  import json

  out = {}
  for name, preset in PRESETS.items():
    model = LanguageModel.from_preset(name)
    out[name] = {
        **preset,
        "vocab_size": model.vocab_size,
        "max_len": model.max_len,
        **preset_param_counts(name),
    }
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
