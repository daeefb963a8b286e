"""Byte/token LM on `CompressiveAttention`: segment-recurrent training and a constant-size cache.

`CompressiveLM(...)(tokens [B, T]) -> (logits [B, T, vocab_size], aux)`: embedding, `num_layers`
pre-norm blocks (RMSNorm -> `CompressiveAttention` -> residual, RMSNorm -> `MLP` -> residual),
final RMSNorm and an untied head. Training (`decode=False`) needs `T % segment_length == 0` and
`nn.scan`s over the T / W segments, carrying every layer's memory (rematerialised per segment
with `remat=True`); the attention-reconstruction losses are sown per segment into `aux_loss`
(stacked `[num_segments]`). `memory_slots=0` is the window-only baseline (each segment sees the
previous one), so the compared models share this code.

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
        ("decode", self.decode),
    )

  @nn.compact
  def __call__(self, tokens):
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


def cache_bytes(cache: Any) -> int:
  """Bytes held by a decoding cache."""
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))
