"""Encoder, Decoder and EncoderDecoder transformers built from `layers.blocks`, with task heads.

Input is either token ids `[B, T]` int (when `vocab_size > 0`: an embedding `[vocab, embed]`, whose
transpose can be the tied LM output) or feature vectors `[B, T, F]` float (when `vocab_size == 0`:
a linear projection; for time series and sensor data).

Positions (`position_embedding`): "rope" (default) rotates `rotary_fraction` of each head's dims
inside attention, with no position table; "learned" adds a learned absolute table
`[max_len, embed]` to the input embedding and turns RoPE off. `max_len` (0: unbounded, RoPE only)
bounds the sequence length: longer inputs, concrete `positions` outside `[0, max_len)` and
decoding caches longer than `max_len` are errors (under jit a traced out-of-range position reads
NaN from the learned table). While decoding with a KV cache, learned positions default to the
cache index onwards (a `cache_index` of the model's own, rewound by `decoding.set_cache_index`).

Norms (`norm`): "rms" | "layer", or "adaptive_rms" | "adaptive_layer": every norm (each
sublayer's and the final one) is an `AdaptiveNorm` whose scale and shift are linear in a
conditioning vector, passed to every call as `condition [B, condition_dim]` (a class, a style,
a diffusion time embedding; adaLN-Zero: the projections start at 0, so at init the output does
not depend on it). `use_final_norm` (None: only for pre-norm stacks, whose last block ends in a
residual add) puts a norm after the last block or leaves it out.

Heads (`head`):
- "lm": per-token logits `[B, T, vocab_size]` (tied to the input embedding with `tie_embeddings`);
- "classification" / "regression": pooled over valid tokens (`pooling` mean | first | last), then
  a linear map to `[B, num_outputs]` (logits / values);
- "token_regression": per-token values `[B, T, num_outputs]` (forecasting, seq2seq on features);
- "none": the final hidden states `[B, T, E]` (what `EncoderDecoder` uses for its encoder).
Seq2seq is `EncoderDecoder` with an "lm" or "token_regression" head on the decoder.

Every option of the core blocks is a field: norm type/placement, activation (gated or not),
attention backend, GQA, qk-norm, MoE every `moe_every`-th layer, Mixture-of-Depths routing of
every `mod_every`-th layer (`mod_capacity < 1`, `layers/mixture_of_depths.py`), remat, shared
layers and `nn.scan` over layers. Calls return `(outputs, aux)`; `aux["moe"]` holds the stacked
router statistics when the model has experts. `decode=True` turns on the KV caches (see
`models/decoding.py` for `init_cache` and one-step decoding). `models/saving.py` saves and
reloads any of the three with its fields.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.layers.blocks import REMAT_POLICIES, TransformerBlock, TransformerStack
from nexus_jax.layers.mixture_of_depths import MoDGroup
from nexus_jax.layers.moe import MoE
from nexus_jax.layers.norms import ADAPTIVE_NORMS, NORMS

Dtype = Any
HEADS = ("lm", "classification", "regression", "token_regression", "none")
POOLINGS = ("mean", "first", "last")
NORM_KINDS = NORMS + ADAPTIVE_NORMS
POSITION_EMBEDDINGS = ("rope", "learned")


class MoEGroup(TransformerBlock):
  """`moe_every` blocks as one scan unit: `moe_every - 1` dense blocks, then one MoE block.

  Same call signature and `(x, aux)` result as `TransformerBlock`, so `TransformerStack` can scan
  it; aux is the MoE block's.
  """

  moe_every: int = 1

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
    kw = {
        f: getattr(self, f)
        for f in self.__dataclass_fields__
        if f not in ("parent", "name", "moe_every")
    }
    for i in range(self.moe_every):
      experts = self.num_experts if i == self.moe_every - 1 else 0
      x, aux = TransformerBlock(**{**kw, "num_experts": experts}, name=f"block_{i}")(
          x, context, segment_ids, positions, mask, context_mask, deterministic, condition
      )
    return x, aux


def _drop_cache_mask_from_moe(next_fun, args, kwargs, context):
  """Workaround (see report): while decoding, `TransformerBlock` hands the `[B, cache_len]`
  cache-slot mask to the MoE as if it were a `[B, T]` token mask; drop it when shapes differ."""
  if isinstance(context.module, MoE) and context.method_name == "__call__":
    x, mask = args[0], (args[1] if len(args) > 1 else kwargs.get("mask"))
    if mask is not None and mask.shape != x.shape[:2]:
      args, kwargs = (x, None, *args[2:]), {k: v for k, v in kwargs.items() if k != "mask"}
  return next_fun(*args, **kwargs)


class _Transformer(nn.Module):
  """Shared fields and pieces of the three models (not used directly)."""

  num_layers: int = 2
  embed_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: MHA; 1: MQA; other divisors of num_heads: GQA
  head_dim: int | None = None  # None: embed_dim // num_heads
  mlp_dim: int = 512  # dense MLP width, or per-expert width in MoE layers
  vocab_size: int = 0  # > 0: token-id input [B, T]; 0: feature-vector input [B, T, F]
  head: str = "lm"  # lm | classification | regression | token_regression
  num_outputs: int = 0  # classes / regression targets (non-lm heads)
  pooling: str = "mean"  # mean | first | last (classification / regression heads)
  tie_embeddings: bool = False  # lm head = input embedding transposed
  zero_init_head: bool = False  # untied head kernel starts at 0 (outputs = bias = 0 at init)
  head_bias: bool = True  # untied head has a bias (pretrained Llama / Mistral / Mixtral: none)
  norm: str = "rms"  # rms | layer | adaptive_rms | adaptive_layer (scale/shift from `condition`)
  condition_dim: int = 0  # width C of `condition [B, C]` (adaptive norms only)
  norm_epsilon: float = 1e-6  # epsilon of every norm (Llama / Mistral / Mixtral: 1e-5)
  norm_placement: str = "pre"  # pre | post
  use_final_norm: bool | None = None  # norm after the last block; None: pre-norm stacks only
  activation: str = "swiglu"  # gelu | relu | swish | swiglu | geglu | reglu
  dropout_rate: float = 0.0
  position_embedding: str = "rope"  # rope | learned (absolute table [max_len, embed], no RoPE)
  max_len: int = 0  # longest sequence (learned table rows); 0: unbounded (rope only)
  rotary_fraction: float = 1.0  # fraction of head dims rotated by RoPE
  rope_theta: float = 10000.0
  qk_norm: bool = False
  attention_backend: str = "xla"  # xla | chunked | pallas | fourier (encoder only)
  num_experts: int = 0  # 0: dense
  moe_every: int = 1  # every moe_every-th layer is MoE (num_layers must be a multiple)
  moe_top_k: int = 2
  moe_capacity_factor: float | None = None  # None: dropless
  moe_renormalize: bool = True  # top-k router weights sum to 1 (Mixtral: yes, Qwen-MoE: no)
  moe_top_p: float | None = None  # dynamic experts (top-p routing, at most moe_top_k); dropless
  moe_load_balance_coef: float = 1e-2
  moe_z_loss_coef: float = 1e-3
  moe_router_jitter: float = 0.0
  mod_capacity: float = 1.0  # Mixture-of-Depths: fraction of tokens a routed block sees; 1.0 = off
  mod_every: int = 2  # every mod_every-th block is routed (num_layers: a multiple of the group)
  mod_predictor_coef: float = 0.01  # weight of the decode-time router predictor's BCE aux loss
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  scan_layers: bool = True
  share_layers: bool = False
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @property
  def token_input(self) -> bool:
    return self.vocab_size > 0

  @property
  def output_dim(self) -> int:
    return self.vocab_size if self.head == "lm" else self.num_outputs

  @property
  def adaptive_norm(self) -> bool:
    return self.norm in ADAPTIVE_NORMS

  @property
  def mod_group_size(self) -> int:
    """Blocks per Mixture-of-Depths scan unit (`MoDGroup.group_size`)."""
    return math.lcm(max(self.mod_every, 1), self.moe_every if self.num_experts > 0 else 1)

  @property
  def final_norm(self) -> bool:
    """Whether a norm follows the last block (`use_final_norm`; None: pre-norm only)."""
    if self.use_final_norm is None:
      return self.norm_placement == "pre"
    return bool(self.use_final_norm)

  def validate(self):
    """Raises ValueError naming the field for inconsistent hyperparameters."""
    num_layers = self.num_layers
    checks = [
        (self.head in HEADS, f"head={self.head!r}; choose one of {HEADS}."),
        (self.pooling in POOLINGS, f"pooling={self.pooling!r}; choose one of {POOLINGS}."),
        (num_layers >= 1, f"num_layers must be >= 1; got {num_layers}."),
        (
            self.embed_dim >= 1 and self.mlp_dim >= 1,
            f"embed_dim ({self.embed_dim}) and mlp_dim ({self.mlp_dim}) must be >= 1.",
        ),
        (
            self.vocab_size >= 0,
            f"vocab_size must be >= 0 (0: feature input); got {self.vocab_size}.",
        ),
        (
            self.head != "lm" or self.token_input,
            "head='lm' needs token input (vocab_size > 0); use head='token_regression' for features.",
        ),
        (
            self.head in ("lm", "none") or self.num_outputs >= 1,
            f"head={self.head!r} needs num_outputs >= 1; got {self.num_outputs}.",
        ),
        (
            not self.tie_embeddings or (self.head == "lm" and self.token_input),
            "tie_embeddings=True needs token input and head='lm'.",
        ),
        (
            self.num_experts >= 0 and self.moe_every >= 1,
            f"num_experts ({self.num_experts}) must be >= 0 and moe_every ({self.moe_every}) >= 1.",
        ),
        (
            self.num_experts == 0 or num_layers % self.moe_every == 0,
            f"num_layers ({num_layers}) must be a multiple of moe_every ({self.moe_every}).",
        ),
        (
            self.remat_policy in REMAT_POLICIES,
            f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}.",
        ),
        (
            0.0 <= self.dropout_rate < 1.0,
            f"dropout_rate must be in [0, 1); got {self.dropout_rate}.",
        ),
        (self.norm in NORM_KINDS, f"norm={self.norm!r}; choose one of {NORM_KINDS}."),
        (
            not self.adaptive_norm or self.condition_dim >= 1,
            f"norm={self.norm!r} needs condition_dim >= 1 (the width of `condition`); "
            f"got {self.condition_dim}.",
        ),
        (
            self.position_embedding in POSITION_EMBEDDINGS,
            f"position_embedding={self.position_embedding!r}; choose one of "
            f"{POSITION_EMBEDDINGS}.",
        ),
        (self.max_len >= 0, f"max_len must be >= 0 (0: unbounded); got {self.max_len}."),
        (
            0.0 < self.mod_capacity <= 1.0 and self.mod_every >= 1,
            f"mod_capacity must be in (0, 1] (1.0 = no Mixture-of-Depths) and mod_every >= 1; "
            f"got mod_capacity={self.mod_capacity}, mod_every={self.mod_every}.",
        ),
        (
            self.mod_capacity == 1.0 or num_layers % self.mod_group_size == 0,
            f"num_layers ({num_layers}) must be a multiple of {self.mod_group_size} (lcm of "
            f"mod_every={self.mod_every} and moe_every) with mod_capacity < 1.",
        ),
        (
            self.position_embedding != "learned" or self.max_len >= 1,
            "position_embedding='learned' needs max_len >= 1 (the rows of the position table).",
        ),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"{type(self).__name__}: {message}")

  def check_condition(self, condition, batch: int):
    """Raises ValueError unless `condition` is `[batch, condition_dim]` exactly when the norm
    is adaptive (and None otherwise)."""
    name = type(self).__name__
    if not self.adaptive_norm:
      if condition is not None:
        raise ValueError(
            f"{name}: `condition` was given but norm={self.norm!r} is not adaptive; use "
            f"norm='adaptive_{self.norm}' (with condition_dim) to condition the model."
        )
      return
    if condition is None:
      raise ValueError(
          f"{name}: norm={self.norm!r} needs `condition` [batch, {self.condition_dim}]."
      )
    if condition.shape != (batch, self.condition_dim):
      raise ValueError(
          f"{name}: condition must be [batch, condition_dim] = {[batch, self.condition_dim]}; "
          f"got {list(condition.shape)}."
      )

  def check_positions(self, positions, length: int, name: str):
    """Raises ValueError if the sequence (or concrete `positions`) exceed `max_len`."""
    if not self.max_len:
      return
    if length > self.max_len:
      raise ValueError(
          f"{name}: sequence length {length} exceeds max_len {self.max_len} "
          f"({self.position_embedding} positions)."
      )
    if positions is not None and not isinstance(positions, jax.core.Tracer):
      values = np.asarray(positions)
      if values.size and (values.min() < 0 or values.max() >= self.max_len):
        raise ValueError(
            f"{name}: positions must lie in [0, {self.max_len}) (max_len); got values in "
            f"[{values.min()}, {values.max()}]."
        )

  def token_positions(self, batch: int, length: int, positions):
    """`[B, T]` positions of this call's tokens: `positions` if given, else 0..T-1, or while
    decoding with learned positions, the model's cache index onwards (the index advances by T)."""
    if not (self.decode and self.position_embedding == "learned"):
      return positions
    initialised = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((batch,), jnp.int32))
    if not initialised:
      return positions
    if positions is None:  # the index is [B] (one write position per row) or a scalar
      positions = jnp.reshape(index.value, (-1, 1)) + jnp.broadcast_to(
          jnp.arange(length, dtype=jnp.int32), (batch, length)
      )
    index.value = index.value + length
    return positions

  def add_positions(self, x, positions, name: str):
    """`x [B, T, E]` plus the learned position rows `positions [B, T]` (default 0..T-1)."""
    if self.position_embedding != "learned":
      return x
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    table = nn.Embed(
        self.max_len,
        self.embed_dim,
        dtype=x.dtype,
        param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        name=f"{name}_position_embed",
    )
    return x + table(positions.astype(jnp.int32)).astype(x.dtype)

  def embed_inputs(self, inputs, name: str, vocab_size: int, positions=None):
    """tokens `[B, T]` int -> `[B, T, E]`, or features `[B, T, F]` -> `[B, T, E]`; learned
    position rows (`positions [B, T]`, default 0..T-1) added when configured."""
    x, embed = self._embed(inputs, name, vocab_size)
    self.check_positions(positions, x.shape[1], name)
    return self.add_positions(x, positions, name), embed

  def _embed(self, inputs, name: str, vocab_size: int):
    dtype = self.dtype or jnp.float32
    if vocab_size > 0:
      if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(
            f"{name}: token input must be int [batch, length]; got "
            f"{inputs.dtype}{list(inputs.shape)}."
        )
      check_token_range(inputs, vocab_size, name)
      embed = nn.Embed(
          vocab_size,
          self.embed_dim,
          dtype=dtype,
          param_dtype=self.param_dtype,
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(1.0), ("vocab", "embed")
          ),
          name=f"{name}_embed",
      )
      return embed(inputs), embed
    if inputs.ndim != 3 or not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise ValueError(
          f"{name}: feature input (vocab_size=0) must be float [batch, length, "
          f"features]; got {inputs.dtype}{list(inputs.shape)}."
      )
    proj = nn.Dense(
        self.embed_dim,
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=f"{name}_proj",
    )
    return proj(inputs.astype(dtype)), None

  def block_kwargs(self, causal: bool, cross: bool) -> dict[str, Any]:
    """The `TransformerBlock` fields every block of this model's stacks is built with."""
    return dict(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        causal=causal,
        cross_attention=cross,
        norm=self.norm,
        norm_epsilon=self.norm_epsilon,
        norm_placement=self.norm_placement,
        activation=self.activation,
        dropout_rate=self.dropout_rate,
        rotary_fraction=0.0 if self.position_embedding == "learned" else self.rotary_fraction,
        rope_theta=self.rope_theta,
        qk_norm=self.qk_norm,
        attention_backend=self.attention_backend,
        num_experts=self.num_experts,
        moe_top_k=self.moe_top_k,
        moe_capacity_factor=self.moe_capacity_factor,
        moe_renormalize=self.moe_renormalize,
        moe_top_p=self.moe_top_p,
        moe_load_balance_coef=self.moe_load_balance_coef,
        moe_z_loss_coef=self.moe_z_loss_coef,
        moe_router_jitter=self.moe_router_jitter,
        decode=self.decode and causal,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )

  def stack(self, num_layers: int, causal: bool, cross: bool, name: str) -> TransformerStack:
    kw = self.block_kwargs(causal, cross)
    grouped = self.num_experts > 0 and self.moe_every > 1
    block = MoEGroup(**kw, moe_every=self.moe_every) if grouped else TransformerBlock(**kw)
    if self.mod_capacity < 1.0:  # Mixture-of-Depths: the group holds mod_every (and moe_every)
      block = MoDGroup(
          **kw,
          mod_every=self.mod_every,
          mod_capacity=self.mod_capacity,
          mod_predictor_coef=self.mod_predictor_coef,
          moe_every=self.moe_every,
      )
      grouped = True
    return TransformerStack(
        block=block,
        num_layers=num_layers // (getattr(block, "group_size", self.moe_every) if grouped else 1),
        scan_layers=self.scan_layers,
        share_layers=self.share_layers,
        remat_policy=self.remat_policy,
        final_norm=self.final_norm,
        name=name,
    )

  def run_stack(
      self,
      stack,
      x,
      *,
      context=None,
      positions=None,
      mask=None,
      context_mask=None,
      deterministic=True,
      condition=None,
  ):
    args = (x, context, None, positions, mask, context_mask, deterministic, condition)
    with contextlib.ExitStack() as ctx:
      if self.decode and mask is not None and self.num_experts > 0:
        ctx.enter_context(nn.intercept_methods(_drop_cache_mask_from_moe))
      x, aux = stack(*args)
    return x, ({"moe": aux} if self.num_experts > 0 else {})

  def apply_head(self, x, embed, mask=None):
    """`x [B, T, E]` -> head outputs (float32; see the module docstring for shapes)."""
    if self.head == "none":
      return x
    if self.head in ("classification", "regression"):
      x = pool(x, mask, self.pooling)
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])  # [tokens, E]: 2-D matmul (feedforward)
    if self.head == "lm" and self.tie_embeddings:
      out = embed.attend(x).astype(jnp.float32) / math.sqrt(self.embed_dim)
    else:
      axis = "vocab" if self.head == "lm" else None
      out = nn.Dense(
          self.output_dim,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.zeros if self.zero_init_head else nn.initializers.lecun_normal(),
              ("embed", axis),
          ),
          use_bias=self.head_bias,
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
          name="head",
      )(x)
    return out.reshape(*lead, out.shape[-1]).astype(jnp.float32)


def check_token_range(tokens, vocab_size: int, name: str = "tokens"):
  """Raises ValueError if concrete `tokens` hold ids outside [0, vocab_size) (no-op under jit)."""
  if isinstance(tokens, jax.core.Tracer):
    return
  values = np.asarray(tokens)
  if values.size and (values.min() < 0 or values.max() >= vocab_size):
    raise ValueError(
        f"{name}: token ids must lie in [0, {vocab_size}); got values in "
        f"[{values.min()}, {values.max()}]."
    )


def pool(x_BTE, mask_BT, pooling: str):
  """Pools `[B, T, E]` over valid tokens (`mask [B, T]`, default all) -> `[B, E]`."""
  b, t, _ = x_BTE.shape
  mask = jnp.ones((b, t), bool) if mask_BT is None else mask_BT.astype(bool)
  if pooling == "mean":
    w = mask.astype(jnp.float32)[..., None]
    return (jnp.sum(x_BTE * w, 1) / jnp.maximum(w.sum(1), 1.0)).astype(x_BTE.dtype)
  if pooling == "first":
    return x_BTE[jnp.arange(b), jnp.argmax(mask, axis=1)]
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  return x_BTE[jnp.arange(b), last]


class Encoder(_Transformer):
  """Bidirectional encoder. `inputs [B, T] | [B, T, F]`, `mask [B, T]` -> `(outputs, aux)`;
  `condition [B, condition_dim]` with an adaptive norm."""

  @nn.compact
  def __call__(self, inputs, mask=None, deterministic: bool = True, condition=None):
    self.validate()
    self.check_condition(condition, inputs.shape[0])
    x, embed = self.embed_inputs(inputs, "input", self.vocab_size)
    stack = self.stack(self.num_layers, causal=False, cross=False, name="encoder")
    x, aux = self.run_stack(stack, x, mask=mask, deterministic=deterministic, condition=condition)
    return self.apply_head(x, embed, mask), aux


class Decoder(_Transformer):
  """Causal decoder, optionally cross-attending to `context [B, S, E_ctx]`.

  `inputs [B, T] | [B, T, F]` -> `(outputs, aux)`. `mask [B, T]` marks valid tokens (key padding);
  with `decode=True` it is instead a `[B, cache_len]` mask over cache slots, and `positions
  [B, T]` (default: cache index onwards) place the chunk. Set `cross_attention=True` for a
  decoder that reads an encoder's output (`context_mask [B, S]` marks its valid positions).
  `condition [B, condition_dim]` feeds adaptive norms (on every decoding step too).
  """

  cross_attention: bool = False
  # PonderNet on top of the stack (models/ponder_lm.py): one more causal block, shared over up to
  # ponder_steps steps with per-token halting; 0 = off.
  ponder_steps: int = 0
  ponder_prior: float = 0.5  # lambda_p of the geometric prior (mean 1 / prior steps)
  ponder_beta: float = 0.01  # weight of the KL-to-prior aux loss
  ponder_threshold: float = 0.5  # halt at the first step whose cumulative probability >= this

  @nn.compact
  def __call__(
      self,
      inputs,
      context=None,
      mask=None,
      context_mask=None,
      positions=None,
      deterministic: bool = True,
      condition=None,
  ):
    self.validate()
    if self.cross_attention and context is None and not self.decode:
      raise ValueError("Decoder(cross_attention=True) needs `context` (the encoder output).")
    self.check_condition(condition, inputs.shape[0])
    positions = self.token_positions(inputs.shape[0], inputs.shape[1], positions)
    x, embed = self.embed_inputs(inputs, "input", self.vocab_size, positions)
    stack = self.stack(self.num_layers, causal=True, cross=self.cross_attention, name="decoder")
    x, aux = self.run_stack(
        stack,
        x,
        context=context,
        positions=positions,
        mask=mask,
        context_mask=context_mask,
        deterministic=deterministic,
        condition=condition,
    )
    if self.ponder_steps:
      from nexus_jax.models.ponder_lm import ponder_outputs  # noqa: PLC0415 (imports this module)

      return ponder_outputs(self, x, embed, positions, mask, deterministic, aux)
    return self.apply_head(x, embed, None if self.decode else mask), aux


class EncoderDecoder(_Transformer):
  """Encoder over `source`, causal decoder over `targets` with cross-attention.

  `__call__(source [B, S] | [B, S, F_src], targets [B, T] | [B, T, F], source_mask [B, S],
  target_mask [B, T]) -> (outputs, aux)`; the decoder's head is `head` (lm or token_regression).
  `encode(source, source_mask) -> (encoded [B, S, E], aux)` and `decode_targets(targets, encoded,
  ...)` split the pass for incremental decoding: encode once; with `decode=True` the
  cross-attention keys/values are cached on the first decoder call and `encoded=None` afterwards.
  With an adaptive norm every call takes `condition [B, condition_dim]` (encoder and decoder
  share it).
  """

  num_encoder_layers: int | None = None  # None: num_layers
  source_vocab_size: int | None = None  # None: vocab_size; 0: feature source

  def setup(self):
    if self.head not in ("lm", "token_regression"):
      raise ValueError(
          f"EncoderDecoder: head must be 'lm' or 'token_regression'; got {self.head!r}."
      )
    shared = {
        f: getattr(self, f)
        for f in _Transformer.__dataclass_fields__
        if f not in ("parent", "name")
    }
    source_vocab = self.vocab_size if self.source_vocab_size is None else self.source_vocab_size
    self.encoder = Encoder(
        **{
            **shared,
            "num_layers": self.num_encoder_layers or self.num_layers,
            "vocab_size": source_vocab,
            "head": "none",
            "tie_embeddings": False,
            "decode": False,
        }
    )
    self.decoder = Decoder(**shared, cross_attention=True)

  def encode(self, source, source_mask=None, deterministic: bool = True, condition=None):
    """`source [B, S] | [B, S, F]` -> `(encoded [B, S, E], aux)`."""
    return self.encoder(source, source_mask, deterministic, condition)

  def decode_targets(
      self,
      targets,
      encoded=None,
      source_mask=None,
      target_mask=None,
      positions=None,
      deterministic: bool = True,
      condition=None,
  ):
    """`targets [B, T] | [B, T, F]`, `encoded [B, S, E]` -> `(outputs, aux)`."""
    if encoded is None and not self.decode:
      raise ValueError(
          "decode_targets needs `encoded` (from `encode`) unless decoding with a "
          "cache whose cross-attention keys are already filled."
      )
    return self.decoder(
        targets, encoded, target_mask, source_mask, positions, deterministic, condition
    )

  def __call__(
      self,
      source,
      targets,
      source_mask=None,
      target_mask=None,
      deterministic: bool = True,
      condition=None,
  ):
    encoded, enc_aux = self.encode(source, source_mask, deterministic, condition)
    outputs, aux = self.decode_targets(
        targets, encoded, source_mask, target_mask, deterministic=deterministic, condition=condition
    )
    if enc_aux:
      aux = {**aux, "encoder_moe": enc_aux["moe"]}
    return outputs, aux
