"""Byte/token LM on `CompressiveAttention`: segment-recurrent training and a constant-size cache.

`CompressiveLM(...)(tokens [B, T]) -> (logits [B, T, vocab_size], aux)`: embedding, `num_layers`
pre-norm blocks (RMSNorm -> `CompressiveAttention` -> residual, RMSNorm -> `MLP` -> residual),
final RMSNorm and an untied head. Training (`decode=False`) needs `T % segment_length == 0` and
`nn.scan`s over the T / W segments, carrying every layer's memory (rematerialised per segment
with `remat=True`); the attention-reconstruction losses are sown per segment into `aux_loss`
(stacked `[num_segments]`). `memory_slots=0` is the window-only baseline (each segment sees the
previous one), so the compared models share this code. `memory` picks what older segments leave
behind ("compressive" | "summary" | "titans" | "none": `layers/segment_memory.py`).

Decoding (`decode=True`): `tokens [B, 1]` per call with `mutable=["cache"]`; initialise with
`init_cache(model, batch)`. The cache has the same shapes at every position.
`aux` is `{"segments": T / W}` in training and `{}` when decoding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.layers.compressive_attention import CompressiveAttention, init_memory
from nexus_jax.layers.feedforward import MLP
from nexus_jax.layers.norms import RMSNorm


class _Block(nn.Module):
  attn_fields: tuple  # (name, value) pairs of the CompressiveAttention fields
  mlp_dim: int
  activation: str

  @nn.compact
  def __call__(self, x, memory=None):
    attn = CompressiveAttention(**dict(self.attn_fields), name="attn")
    h, memory = attn(RMSNorm(name="attn_norm")(x), memory)
    x = x + h
    x = x + MLP(self.mlp_dim, activation=self.activation, name="mlp")(RMSNorm(name="mlp_norm")(x))
    return x, memory


class _SegmentStack(nn.Module):
  """`(memories, x [B, W, E]) -> (memories, y [B, W, E])`: every block on one segment."""

  attn_fields: tuple
  num_layers: int
  mlp_dim: int
  activation: str

  @nn.compact
  def __call__(self, memories, x):
    new = []
    for i in range(self.num_layers):
      x, memory = _Block(self.attn_fields, self.mlp_dim, self.activation, name=f"block_{i}")(
          x, memories[i]
      )
      new.append(memory)
    return tuple(new), x


class CompressiveLM(nn.Module):
  """See the module docstring."""

  vocab_size: int = 256
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_dim: int = 256
  activation: str = "swiglu"
  segment_length: int = 128
  memory_slots: int = 0
  compression_rate: int = 4
  compression: str = "mean"
  reconstruction_coef: float = 1.0
  memory_stop_gradient: bool = False
  memory: str = "compressive"  # compressive | summary | titans | none (layers/segment_memory.py)
  titans_hidden_mult: int = 2
  titans_chunk: int = 16
  titans_max_lr: float = 0.02
  titans_truncate: bool = True
  remat: bool = True  # rematerialise each segment's forward in the backward pass
  decode: bool = False

  def attention_fields(self) -> tuple:
    return (
        ("num_heads", self.num_heads),
        ("num_kv_heads", self.num_kv_heads),
        ("segment_length", self.segment_length),
        ("memory_slots", self.memory_slots),
        ("compression_rate", self.compression_rate),
        ("compression", self.compression),
        ("reconstruction_coef", self.reconstruction_coef),
        ("memory_stop_gradient", self.memory_stop_gradient),
        ("memory", self.memory),
        ("titans_hidden_mult", self.titans_hidden_mult),
        ("titans_chunk", self.titans_chunk),
        ("titans_max_lr", self.titans_max_lr),
        ("titans_truncate", self.titans_truncate),
        ("decode", self.decode),
    )

  @nn.compact
  def __call__(self, inputs, deterministic: bool = True, mask=None):
    """`inputs`: tokens `[B, T]` (the trainer's `lm_objective` keywords are accepted; the model
    is causal, so a right-padding `mask` changes nothing before the padding and is unused)."""
    del deterministic, mask  # no dropout; causal
    tokens = inputs
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length]; got {tokens.shape}.")
    b, t = tokens.shape
    w = self.segment_length
    fields = self.attention_fields()
    attn = CompressiveAttention(**dict(fields), parent=None)
    attn.dims(self.embed_dim)  # validates the attention fields
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    stack_args = (fields, self.num_layers, self.mlp_dim, self.activation)
    if self.decode:
      if t != 1:
        raise ValueError(f"decode=True takes tokens [batch, 1]; got {tokens.shape}.")
      _, x = _SegmentStack(*stack_args, name="stack")((None,) * self.num_layers, x)
      aux = {}
    else:
      if t % w:
        raise ValueError(
            f"sequence length {t} must be a multiple of segment_length ({w}) in training; "
            f"pad or crop the tokens."
        )
      segments = t // w
      memories = tuple(init_memory(b, attn, self.embed_dim) for _ in range(self.num_layers))
      body = nn.remat(_SegmentStack) if self.remat else _SegmentStack
      scan = nn.scan(
          body,
          variable_broadcast="params",
          split_rngs={"params": False},
          variable_axes={"aux_loss": 0},
          in_axes=0,
          out_axes=0,
          length=segments,
      )
      x_SBWE = x.reshape(b, segments, w, -1).swapaxes(0, 1)
      _, y = scan(*stack_args, name="stack")(memories, x_SBWE)
      x = y.swapaxes(0, 1).reshape(b, t, -1)
      aux = {"segments": segments}
    x = RMSNorm(name="final_norm")(x)
    logits = nn.Dense(self.vocab_size, name="head")(x.reshape(b * t, -1)).reshape(b, t, -1)
    return logits, aux


def init_cache(model: CompressiveLM, params: Any, batch: int) -> Any:
  """The empty decoding cache of `model.clone(decode=True)` for `batch` rows."""
  dec = model.clone(decode=True)
  tokens = jnp.zeros((batch, 1), jnp.int32)
  return dec.init(jax.random.PRNGKey(0), tokens)["cache"]


def decode_step(model: CompressiveLM, params: Any, cache: Any, tokens_B1):
  """One token: `(logits [B, 1, V], new cache)`."""
  (logits, _), state = model.clone(decode=True).apply(
      {"params": params, "cache": cache}, tokens_B1, mutable=["cache"]
  )
  return logits, state["cache"]


def generate(model: CompressiveLM, params: Any, prompts, *, max_new_tokens: int, rng, sampling):
  """Samples `max_new_tokens` after each prompt with the constant-size cache, one token per
  call of one compiled `decode_step` (prompts are fed token by token, all rows in lockstep, so
  every prompt must have the same length). Returns `inference.generate.GenerateOutput`."""
  from nexus_jax.inference.generate import GenerateOutput, sample  # noqa: PLC0415

  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[1] < 1:
    raise ValueError(f"prompts must be [batch, length >= 1] of equal lengths; got {prompts.shape}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  b = prompts.shape[0]
  step = jax.jit(lambda p, c, t: decode_step(model, p, c, t))
  cache = init_cache(model, params, b)
  for i in range(prompts.shape[1]):
    logits, cache = step(params, cache, jnp.asarray(prompts[:, i : i + 1]))
  out = []
  for _ in range(max_new_tokens):
    rng, key = jax.random.split(rng)
    token = sample(key, logits[:, -1].astype(jnp.float32), sampling)
    out.append(np.asarray(token))
    logits, cache = step(params, cache, token[:, None])
  tokens = np.stack(out, axis=1).astype(np.int32)
  return GenerateOutput(tokens=tokens, lengths=np.full((b,), max_new_tokens, np.int32))


def compressive_lm_from_config(model_config: Any, vocab_size: int, seq_len: int) -> CompressiveLM:
  """The LM experiment's `config.model` with `context_memory` set -> a `CompressiveLM`
  (ValueError naming the field for a bad memory, segment length or slot count)."""
  mc = model_config
  memory = mc.context_memory
  w = int(mc.get("segment_len", 0))
  if w < 1:
    raise ValueError(f"config.model.segment_len={w} must be >= 1 (tokens per segment).")
  if seq_len % w:
    raise ValueError(
        f"config.model.segment_len={w} must divide config.data.seq_len={seq_len} (the model "
        "trains on whole segments)."
    )
  slots = int(mc.get("memory_slots", 0))
  if memory in ("compressive", "summary") and slots < 1:
    raise ValueError(
        f"config.model.memory_slots={slots} must be >= 1 for context_memory={memory!r} "
        "(use context_memory='none' for window-only)."
    )
  rate = int(mc.get("compression_rate", 0)) or max(w * max(seq_len // w - 2, 1) // max(slots, 1), 1)
  model = CompressiveLM(
      vocab_size=vocab_size,
      num_layers=int(mc.num_layers),
      embed_dim=int(mc.embed_dim),
      num_heads=int(mc.num_heads),
      num_kv_heads=int(mc.num_kv_heads) or None,
      mlp_dim=int(mc.mlp_dim),
      segment_length=w,
      memory_slots=slots if memory in ("compressive", "summary") else 0,
      compression_rate=rate,
      compression=mc.get("compression", "mean"),
      memory=memory,
  )
  try:
    CompressiveAttention(**dict(model.attention_fields()), parent=None).dims(model.embed_dim)
  except ValueError as e:
    raise ValueError(f"config.model (context_memory={memory!r}): {e}") from None
  return model


def cache_bytes(cache: Any) -> int:
  """Bytes held by a decoding cache."""
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))
