"""Nexus hybrid language model: token embedding -> `num_blocks` x `HybridBlock` -> RMSNorm -> head.

`HybridLM.from_preset("tiny")` maps `tokens [B, T]` int -> `(logits [B, T, vocab_size] float32,
aux)`. Each block is 8 layers (attention : SSM = 1 : 7, Jamba's layout; see
`layers/hybrid_block.py` for the rule), blocks are scanned (`nn.scan`, params `[num_blocks, ...]`,
compile time independent of depth). aux: `hidden [B, T, E]` (final-norm hidden states) and
`layers` (the blocks' per-layer scalars stacked on `[num_blocks]`). Byte level by default
(`vocab_size=256`).

Presets (d_model / heads / blocks; SwiGLU width 4 d_model, 8 layers per block, dense FFN):
  tiny 128 / 4 / 2    small 256 / 4 / 4    base 512 / 8 / 6    large 1024 / 16 / 12
  xl 2048 / 32 / 24
`python -m nexus_jax.models.hybrid` prints their parameter counts (from `jax.eval_shape`, no
allocation); README.md has the table.

Decoding (`init_cache`, `decode_step`, `step_model`): the `cache` collection holds every
attention layer's KV cache and every SSM layer's conv + SSM state (and `memory` the Titans
state when `use_memory`); `generate` samples with `inference.generate` from prompts of equal
length (left padding would run through the SSM state).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.layers.blocks import REMAT_POLICIES
from nexus_jax.layers.hybrid_block import HybridBlock, layer_kinds
from nexus_jax.layers.norms import RMSNorm

Dtype = Any

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=128, num_heads=4, num_blocks=2),
    "small": dict(d_model=256, num_heads=4, num_blocks=4),
    "base": dict(d_model=512, num_heads=8, num_blocks=6),
    "large": dict(d_model=1024, num_heads=16, num_blocks=12),
    "xl": dict(d_model=2048, num_heads=32, num_blocks=24),
}
BLOCK_FIELDS = (
    "layers_per_block",
    "attention_index",
    "num_kv_heads",
    "rotary_fraction",
    "attention_backend",
    "ssm_state_dim",
    "ssm_expand",
    "ssm_conv_width",
    "ssm_scan_method",
    "ssm_chunk_size",
    "moe_every",
    "num_experts",
    "moe_top_k",
    "moe_capacity_factor",
    "moe_renormalize",
    "moe_top_p",
    "moe_load_balance_coef",
    "use_memory",
    "memory_heads",
    "memory_chunk_size",
    "dropout_rate",
)


class HybridLM(nn.Module):
  """`tokens [B, T]` -> `(logits [B, T, V], aux)`; see the module docstring."""

  vocab_size: int = 256
  d_model: int = 128
  num_heads: int = 4
  num_blocks: int = 2
  mlp_dim: int | None = None  # None: 4 * d_model
  layers_per_block: int = 8
  attention_index: int | None = None  # None: layers_per_block // 2
  num_kv_heads: int | None = None
  rotary_fraction: float = 1.0
  attention_backend: str = "xla"
  ssm_state_dim: int = 16
  ssm_expand: int = 2
  ssm_conv_width: int = 4
  ssm_scan_method: str = "chunked"
  ssm_chunk_size: int = 64
  moe_every: int = 0  # 0: dense FFN everywhere (Jamba: 2)
  num_experts: int = 8
  moe_top_k: int = 2
  moe_capacity_factor: float | None = None
  moe_renormalize: bool = True  # top-k router weights sum to 1 (a lone expert keeps its prob.)
  moe_top_p: float | None = None  # dynamic experts: until their mass reaches p (<= moe_top_k)
  moe_load_balance_coef: float = 1e-2
  use_memory: bool = False
  memory_heads: int = 4
  memory_chunk_size: int = 16
  dropout_rate: float = 0.0
  scan_blocks: bool = True
  remat_policy: str = "none"
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_preset(cls, preset: str, **overrides) -> "HybridLM":
    """The named preset (tiny | small | base | large | xl) with field overrides."""
    if preset not in PRESETS:
      raise ValueError(f"unknown HybridLM preset {preset!r}; choose one of {list(PRESETS)}.")
    return cls(**{**PRESETS[preset], **overrides})

  def validate(self):
    checks = [
        (self.vocab_size >= 1, f"vocab_size must be >= 1; got {self.vocab_size}."),
        (self.num_blocks >= 1, f"num_blocks must be >= 1; got {self.num_blocks}."),
        (
            self.d_model >= 1 and self.d_model % self.num_heads == 0,
            f"d_model ({self.d_model}) must be a positive multiple of num_heads ({self.num_heads}).",
        ),
        (
            self.remat_policy in REMAT_POLICIES,
            f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}.",
        ),
        (
            0.0 <= self.dropout_rate < 1.0,
            f"dropout_rate must be in [0, 1); got {self.dropout_rate}.",
        ),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"HybridLM: {message}")
    layer_kinds(self.layers_per_block, self.attention_index, self.moe_every)

  def block(self) -> HybridBlock:
    kw = {f: getattr(self, f) for f in BLOCK_FIELDS}
    kw["num_layers"] = kw.pop("layers_per_block")
    return HybridBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim or 4 * self.d_model,
        decode=self.decode,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        **kw,
    )

  @nn.compact
  def __call__(self, inputs, mask=None, positions=None, deterministic: bool = True):
    """inputs `[B, T]` int; mask `[B, T]` (right padding) or `[B, cache_len]` while decoding;
    positions `[B, T]` RoPE positions of the attention layers."""
    self.validate()
    if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(
          f"HybridLM input must be int [batch, length]; got " f"{inputs.dtype}{list(inputs.shape)}."
      )
    dtype = self.dtype or jnp.float32
    x = nn.Embed(
        self.vocab_size,
        self.d_model,
        dtype=dtype,
        param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")
        ),
        name="embed",
    )(inputs)
    template = self.block()
    cls = HybridBlock
    if self.remat_policy != "none":
      cls = nn.remat(
          cls,
          policy=REMAT_POLICIES[self.remat_policy],
          prevent_cse=not self.scan_blocks,
          static_argnums=(4,),
      )  # self, x, pos, mask, det
    kwargs = {
        f: getattr(template, f)
        for f in template.__dataclass_fields__
        if f not in ("parent", "name")
    }
    if self.scan_blocks:
      per_block = {"params": 0, "cache": 0, "memory": 0, "aux_loss": 0, "intermediates": 0}
      stack = nn.scan(
          cls,
          variable_axes=per_block,
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=self.num_blocks,
          metadata_params={nn.PARTITION_NAME: None},
      )(**kwargs, name="blocks")
      x, layers = stack(x, positions, mask, deterministic)
    else:
      auxes = []
      for i in range(self.num_blocks):
        x, a = cls(**kwargs, name=f"blocks_{i}")(x, positions, mask, deterministic)
        auxes.append(a)
      layers = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
    x = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
    logits = nn.Dense(
        self.vocab_size,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "vocab")
        ),
    )(x)
    return logits.astype(jnp.float32), {"hidden": x, "layers": layers}


def count_params(tree: Any) -> int:
  """Number of parameters of a params tree (arrays, boxed arrays or `ShapeDtypeStruct`s)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


def param_count(model: HybridLM) -> int:
  """Parameters of `model`, from `jax.eval_shape` of its init (nothing is allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)
  return count_params(shapes["params"])


# ----- incremental decoding -----


def init_cache(model: HybridLM, batch_size: int, cache_len: int) -> Any:
  """Zero decoding state (`cache` collection) for `batch_size` sequences of <= `cache_len`."""
  if batch_size < 1 or cache_len < 1:
    raise ValueError(f"batch_size ({batch_size}) and cache_len ({cache_len}) must be >= 1.")
  tokens = jnp.zeros((batch_size, cache_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.clone(decode=True).init(jax.random.PRNGKey(0), tokens))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def decode_step(model: HybridLM, params, state, tokens, *, positions=None, cache_mask=None):
  """Feeds `tokens [B, T]` after what `state` has seen; returns `(logits [B, T, V], state)`.

  state: `{"cache": ...}` from `init_cache` (plus `"memory"` once a `use_memory` model has run).
  """
  mutable = ["cache", "memory"] if model.use_memory else ["cache"]
  (logits, _), new = model.clone(decode=True).apply(
      {"params": params, **state}, tokens, mask=cache_mask, positions=positions, mutable=mutable
  )
  return logits, dict(new)


def _reorder(state, index_B):
  """Gathers batch rows (axis 1: axis 0 is the block) of every state array but cache_index."""

  def take(path, x):
    if getattr(path[-1], "key", None) == "cache_index":
      return x
    return jnp.take(x, index_B, axis=1)

  return jax.tree_util.tree_map_with_path(take, state)


def _no_rewind(state, index):
  raise ValueError(
      "a HybridLM cannot rewind its decoding state: the SSM state is recurrent. "
      "Speculative decoding needs an attention-only model."
  )


@functools.lru_cache(maxsize=16)
def step_model(model: HybridLM, cache_len: int):
  """An `inference.generate.StepModel` for `generate` / `beam_search` (equal-length prompts)."""
  from nexus_jax.inference.generate import StepModel

  def init(params, batch, source=None):
    if source is not None:
      raise ValueError("HybridLM is decoder-only; it takes no `source`.")
    return {"cache": init_cache(model, batch, cache_len)}

  def apply(params, state, tokens, positions, cache_mask, first):
    del first
    return decode_step(model, params, state, tokens, positions=positions, cache_mask=cache_mask)

  return StepModel(
      vocab_size=model.vocab_size,
      cache_len=cache_len,
      init=init,
      apply=apply,
      reorder=_reorder,
      rewind=_no_rewind,
  )


def generate(model: HybridLM, params, prompts, *, max_new_tokens: int, **kwargs):
  """`inference.generate.generate` for a HybridLM; prompts must share one length."""
  from nexus_jax.inference import generate as gen

  lengths = {len(p) for p in (prompts.tolist() if hasattr(prompts, "tolist") else prompts)}
  if len(lengths) != 1:
    raise ValueError(
        f"HybridLM.generate needs prompts of one length (got lengths "
        f"{sorted(lengths)}): left padding would run through the SSM state."
    )
  sm = step_model(model, int(kwargs.pop("cache_len", None) or lengths.pop() + max_new_tokens))
  return gen.generate(sm, params, prompts, max_new_tokens=max_new_tokens, **kwargs)


def main() -> None:
  """Prints one JSON object: parameter count and layout of every preset (byte vocabulary)."""
  import json

  out = {}
  for name, preset in PRESETS.items():
    model = HybridLM.from_preset(name)
    kinds = layer_kinds(model.layers_per_block, model.attention_index, model.moe_every)
    out[name] = {
        **preset,
        "layers": model.num_blocks * len(kinds),
        "attention_layers": model.num_blocks * sum(m == "attention" for m, _ in kinds),
        "params": param_count(model),
    }
  print(json.dumps({"vocab_size": 256, "presets": out}, indent=2))


if __name__ == "__main__":
  main()
