"""Hugging Face `config.json` (Llama / Mistral / Mixtral) <-> our `LanguageModel` fields.

    model = read_hf_config("path/to/Mixtral-8x7B")      # a LanguageModel, nothing loaded
    config = hf_config_of(model, "bfloat16")             # the config.json export writes

What maps (HF -> ours): vocab_size, hidden_size -> embed_dim, num_hidden_layers -> num_layers,
num_attention_heads -> num_heads, num_key_value_heads -> num_kv_heads, head_dim, intermediate_size
-> mlp_dim (per expert), rms_norm_eps -> norm_epsilon, rope_theta (or v5's
`rope_parameters.rope_theta`) -> rope_theta, max_position_embeddings -> max_len; Mixtral's
num_local_experts -> num_experts, num_experts_per_tok -> moe_top_k, router_aux_loss_coef ->
moe_load_balance_coef, router_jitter_noise -> moe_router_jitter. Always: RMSNorm pre-norm with a
final norm, SwiGLU, full RoPE, an untied head without bias (`head_bias=False`; a tied HF model
gets the embedding as its head kernel), dropless top-k routing renormalised as Mixtral does, no
router z-loss (Mixtral has none), layers scanned.

Refused, with the key named: another `model_type` (Qwen2-MoE's shared expert and q/k/v biases,
for one, have no counterpart here), `hidden_act` other than silu, `attention_bias` / `mlp_bias`,
scaled RoPE (`rope_scaling` / a `rope_type` other than default). Mistral's `sliding_window`
shorter than max_position_embeddings becomes `max_len = sliding_window`: every sequence fits in
one window, where sliding-window attention is full causal attention, so the model stays exact.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp

from nexus_jax.models.lm import LanguageModel
from nexus_jax.models.transformer import Decoder

SUPPORTED = ("llama", "mistral", "mixtral")
UNSUPPORTED = {
    "qwen2_moe": "a shared expert with a sigmoid gate and q/k/v biases",
    "qwen3_moe": "qk-norm over heads with per-layer sparse/dense steps and no renormalisation",
    "qwen2": "q/k/v projection biases",
    "gemma": "a (1 + weight) RMSNorm, GeGLU and a scaled embedding",
    "phi3": "fused qkv / gate_up projections",
}
CONFIG_FILE = "config.json"
# Fields that change what the model computes; a `model` given to load_pretrained must agree.
FUNCTION_FIELDS = (
    "vocab_size",
    "embed_dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "num_experts",
    "moe_top_k",
    "norm_epsilon",
    "rope_theta",
    "moe_renormalize",
)


def load_config_json(source: str | os.PathLike | Mapping) -> dict:
  """`config.json` of a checkpoint folder (or the dict itself)."""
  if isinstance(source, Mapping):
    return dict(source)
  path = pathlib.Path(source)
  file = path / CONFIG_FILE if path.is_dir() else path
  if not file.is_file():
    raise ValueError(f"{path}: no {CONFIG_FILE}; a Hugging Face checkpoint folder has one")
  try:
    return json.loads(file.read_text())
  except ValueError as err:
    raise ValueError(f"{file}: not JSON ({err})") from None


def _rope_theta(cfg: dict) -> float:
  params = cfg.get("rope_parameters") or {}
  scaling = cfg.get("rope_scaling")
  kind = params.get("rope_type", "default")
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind != "default":
    raise ValueError(
        f"config.json rope_scaling / rope_parameters.rope_type={kind!r}: scaled RoPE (llama3, "
        "yarn, linear, dynamic) is not implemented here; only the default RoPE loads."
    )
  return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _required(cfg: dict, key: str) -> Any:
  if cfg.get(key) is None:
    raise ValueError(f"config.json has no {key!r} (model_type {cfg.get('model_type')!r})")
  return cfg[key]


def model_and_notes(
    source: str | os.PathLike | Mapping, param_dtype: Any = jnp.float32
) -> tuple[LanguageModel, list[str]]:
  """`(model, notes)`: the model `read_hf_config` returns plus one line per adaptation made."""
  cfg = load_config_json(source)
  kind = cfg.get("model_type")
  if kind not in SUPPORTED:
    lacks = (
        f" (it has {UNSUPPORTED[kind]}, which LanguageModel lacks)" if kind in UNSUPPORTED else ""
    )
    raise ValueError(
        f"config.json model_type={kind!r} is not supported{lacks}; supported: {SUPPORTED}."
    )
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"config.json hidden_act={act!r}: only silu (SwiGLU) is supported.")
  for key in ("attention_bias", "mlp_bias"):
    if cfg.get(key):
      raise ValueError(f"config.json {key}=true: our projections have no biases.")
  notes = []
  hidden, heads = int(_required(cfg, "hidden_size")), int(_required(cfg, "num_attention_heads"))
  head_dim = cfg.get("head_dim")
  if head_dim is not None and hidden % heads == 0 and int(head_dim) == hidden // heads:
    head_dim = None
  max_len = int(cfg.get("max_position_embeddings") or 0)
  window = cfg.get("sliding_window") if kind != "llama" else None
  if window is not None and (not max_len or int(window) < max_len):
    max_len = int(window)
    notes.append(
        f"sliding_window={window}: max_len set to {window} (within one window sliding-window "
        "attention is full causal attention; longer sequences are refused)"
    )
  if cfg.get("tie_word_embeddings", False):
    notes.append("tie_word_embeddings=true: the head kernel is the input embedding transposed")
  fields: dict[str, Any] = dict(
      vocab_size=int(_required(cfg, "vocab_size")),
      num_layers=int(_required(cfg, "num_hidden_layers")),
      embed_dim=hidden,
      num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=None if head_dim is None else int(head_dim),
      mlp_dim=int(_required(cfg, "intermediate_size")),
      norm="rms",
      norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
      norm_placement="pre",
      use_final_norm=True,
      activation="swiglu",
      position_embedding="rope",
      rotary_fraction=1.0,
      rope_theta=_rope_theta(cfg),
      max_len=max_len,
      tie_embeddings=False,
      head_bias=False,
      num_experts=0,
      scan_layers=True,
      param_dtype=param_dtype,
  )
  if kind == "mixtral":
    fields.update(
        num_experts=int(_required(cfg, "num_local_experts")),
        moe_top_k=int(_required(cfg, "num_experts_per_tok")),
        moe_renormalize=True,
        moe_capacity_factor=None,
        moe_load_balance_coef=float(cfg.get("router_aux_loss_coef", 0.02)),
        moe_z_loss_coef=0.0,
        moe_router_jitter=float(cfg.get("router_jitter_noise") or 0.0),
    )
  return LanguageModel(**fields), notes


def read_hf_config(
    source: str | os.PathLike | Mapping, param_dtype: Any = jnp.float32
) -> LanguageModel:
  """The `LanguageModel` a Llama / Mistral / Mixtral `config.json` describes (module docstring);
  `source` is the checkpoint folder, the file, or the parsed dict. Raises ValueError naming the
  key of anything unsupported."""
  return model_and_notes(source, param_dtype)[0]


def check_convertible(model: Decoder) -> None:
  """Raises ValueError naming every field of `model` that HF Llama / Mixtral cannot express."""
  wants = [
      ("head", "lm"),
      ("cross_attention", False),
      ("norm", "rms"),
      ("norm_placement", "pre"),
      ("activation", "swiglu"),
      ("position_embedding", "rope"),
      ("rotary_fraction", 1.0),
      ("qk_norm", False),
      ("tie_embeddings", False),
      ("head_bias", False),
      ("share_layers", False),
      ("moe_every", 1),
  ]
  bad = [f"{f}={getattr(model, f)!r} (needs {v!r})" for f, v in wants if getattr(model, f) != v]
  if not model.final_norm:
    bad.append("use_final_norm=False (needs a final norm)")
  if model.vocab_size < 1:
    bad.append("vocab_size=0 (needs token input)")
  if model.num_experts > 0 and not model.moe_renormalize:
    bad.append("moe_renormalize=False (Mixtral renormalises the top-k weights)")
  if bad:
    raise ValueError(
        f"{type(model).__name__} cannot be expressed as HF Llama / Mixtral: {'; '.join(bad)}."
    )


def check_same_function(model: Decoder, reference: Decoder) -> None:
  """Raises ValueError naming each `FUNCTION_FIELDS` field where `model` and the config's
  `reference` differ (head_dim compared resolved)."""
  resolve = lambda m, f: (
      (m.head_dim or m.embed_dim // m.num_heads)
      if f == "head_dim"
      else (m.num_kv_heads or m.num_heads)
      if f == "num_kv_heads"
      else getattr(m, f)
  )
  bad = [
      f"model.{f}={resolve(model, f)!r} but config.json gives {resolve(reference, f)!r}"
      for f in FUNCTION_FIELDS
      if resolve(model, f) != resolve(reference, f)
  ]
  if bad:
    raise ValueError("the given model does not match the checkpoint: " + "; ".join(bad))


def hf_config_of(model: Decoder, dtype: str = "float32") -> dict:
  """The `config.json` of `model` as HF `LlamaForCausalLM` (dense) or `MixtralForCausalLM`."""
  check_convertible(model)
  head_dim = model.head_dim or model.embed_dim // model.num_heads
  theta = float(model.rope_theta)
  moe = model.num_experts > 0
  cfg = {
      "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
      "model_type": "mixtral" if moe else "llama",
      "vocab_size": int(model.vocab_size),
      "hidden_size": int(model.embed_dim),
      "intermediate_size": int(model.mlp_dim),
      "num_hidden_layers": int(model.num_layers),
      "num_attention_heads": int(model.num_heads),
      "num_key_value_heads": int(model.num_kv_heads or model.num_heads),
      "head_dim": int(head_dim),
      "hidden_act": "silu",
      # RoPE has no table: with max_len 0 (unbounded) any length is valid; HF needs a number.
      "max_position_embeddings": int(model.max_len or 32768),
      "rms_norm_eps": float(model.norm_epsilon),
      "rope_theta": theta,  # transformers v4
      "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # v5
      "tie_word_embeddings": False,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "torch_dtype": jnp.dtype(dtype).name,
      "use_cache": True,
  }
  if moe:
    cfg.pop("attention_bias")
    cfg.update(
        num_local_experts=int(model.num_experts),
        num_experts_per_tok=int(model.moe_top_k),
        router_aux_loss_coef=float(model.moe_load_balance_coef),
        router_jitter_noise=float(model.moe_router_jitter),
        output_router_logits=False,
        sliding_window=None,
    )
  else:
    cfg["mlp_bias"] = False
  return cfg
