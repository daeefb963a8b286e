"""Anytime language modelling (CALM, Schuster et al. 2022): a next-token loss at every layer.

Every block's output goes through the shared final norm and LM head, so any layer can emit a
token; the training loss is a weighted mean of the per-layer cross-entropies with weights rising
with depth (CALM: `w_l = l / sum(1..L)`, `calm_layer_weights`). Nothing in the model changes:
the per-layer hidden states are read with Flax's `capture_intermediates` (each block of the
layer stack, scanned or not, records its output; the scan stacks them on `[L]`), and the head is
re-applied to them from the model's own params.

    states = layer_states(model, variables, tokens)        # [L + 1, B, T, E]; 0 = embeddings
    logits = layer_logits(model, variables["params"], states[1:])   # [L, B, T, V]
    loss, per_layer = anytime_loss(logits, targets, weights)        # scalar, [L] nats
    objective = anytime_lm_objective(model)    # train.steps.Objective (configs/lm.py switch)

`layer_logits(...)[-1]` equals the model's own logits. Supported: token-input `Decoder` /
`LanguageModel` with the LM head, no cross-attention, no adaptive norm and one block per scan
unit (`moe_every=1`); anything else raises a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nexus_jax.layers.blocks import TransformerBlock, TransformerStack
from nexus_jax.layers.norms import make_norm
from nexus_jax.models.seq_objectives import _row_weights
from nexus_jax.models.transformer import Decoder
from nexus_jax.train.steps import Objective


def check_supported(model, what: str = "anytime / early-exit") -> None:
  """Raises ValueError naming the field when `model` is not a plain token-input LM decoder."""
  if not isinstance(model, Decoder):
    raise ValueError(f"{what} needs a transformer.Decoder / LanguageModel; got {type(model)}.")
  checks = [
      (model.head == "lm" and model.vocab_size > 0, "head='lm' with vocab_size > 0"),
      (not model.cross_attention, "cross_attention=False"),
      (not model.adaptive_norm, f"a non-adaptive norm (got norm={model.norm!r})"),
      (model.num_experts == 0 or model.moe_every == 1, "moe_every=1 (one block per layer)"),
      (not getattr(model, "ponder_steps", 0), "ponder_steps=0 (no PonderNet head)"),
  ]
  for ok, need in checks:
    if not ok:
      raise ValueError(f"{what}: {type(model).__name__} needs {need}.")


def calm_layer_weights(num_layers: int) -> jax.Array:
  """CALM's anytime weights `[L]`: `l / sum(1..L)` for layers l = 1..L (sum 1)."""
  w = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
  return w / jnp.sum(w)


@functools.lru_cache(maxsize=32)
def stack_template(model) -> tuple[TransformerBlock, bool]:
  """The decoder's block template (unbound, as the stack repeats it) and whether a final norm
  follows the last block; read by intercepting the stack while tracing `init` (nothing runs)."""
  check_supported(model)
  found = {}

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, TransformerStack) and context.method_name == "__call__":
      found["block"] = context.module.block.clone(parent=None)
      found["final_norm"] = context.module.final_norm
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return found["block"], found["final_norm"]


def _captured(module, method: str) -> bool:
  """Records the input embedding and every layer of the stack (not the blocks inside a group)."""
  if method != "__call__":
    return False
  if isinstance(module, nn.Embed):
    return module.name == "input_embed"
  return isinstance(module, TransformerBlock) and (module.name or "").startswith("layers")


def _apply_capturing(model, variables, args, kwargs, mutable):
  """`model.apply` that also returns the `[L + 1, B, T, E]` states (embeddings, then layers)."""
  mutable = [] if mutable is False else list(mutable)
  out, updates = model.apply(
      variables,
      *args,
      capture_intermediates=_captured,
      mutable=[*mutable, "intermediates"],
      **kwargs,
  )
  updates = dict(updates)
  sown = updates.pop("intermediates")
  embedded = sown["input_embed"]["__call__"][0]
  decoder = sown["decoder"]
  if "layers" in decoder:  # scanned / shared: one entry, stacked on [L]
    layers = decoder["layers"]["__call__"][0][0]
  else:
    n = len([k for k in decoder if k.startswith("layers_")])
    layers = jnp.stack([decoder[f"layers_{i}"]["__call__"][0][0] for i in range(n)])
  states = jnp.concatenate([embedded[None].astype(layers.dtype), layers], axis=0)
  return out, updates, states


def layer_states(model, variables, inputs, **kwargs) -> jax.Array:
  """`[L + 1, B, T, E]` hidden states of `model(inputs, **kwargs)`: index 0 the input embeddings,
  index l the output of block l (before the final norm)."""
  check_supported(model)
  return _apply_capturing(model, variables, (inputs,), kwargs, False)[2]


def layer_logits(model, params, states) -> jax.Array:
  """Hidden states `[..., E]` (e.g. `[L, B, T, E]`) -> float32 logits `[..., V]` through the
  model's final norm (if any) and LM head (tied or not), exactly as its last layer is scored."""
  block, final_norm = stack_template(model)
  params = nn.unbox(params)
  x = states
  if final_norm:
    norm = make_norm(
        block.norm, epsilon=block.norm_epsilon, dtype=block.dtype, param_dtype=block.param_dtype
    )
    x = norm.apply({"params": params["decoder"]["final_norm"]}, x)
  lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
  if model.tie_embeddings:
    embed = nn.Embed(model.vocab_size, model.embed_dim, dtype=model.dtype or jnp.float32)
    out = embed.apply({"params": params["input_embed"]}, x, method="attend")
    out = out.astype(jnp.float32) / math.sqrt(model.embed_dim)
  else:
    head = nn.Dense(
        model.vocab_size, dtype=model.dtype, param_dtype=model.param_dtype, use_bias=model.head_bias
    )
    out = head.apply({"params": params["head"]}, x)
  return out.reshape(*lead, out.shape[-1]).astype(jnp.float32)


def anytime_loss(logits_LBTV, targets_BT, weights_BT, layer_weights=None):
  """Weighted next-token cross-entropy over layers.

  Returns `(loss, per_layer [L])`: per_layer[l] is layer l+1's mean nats over `weights > 0`
  tokens, and loss = `sum_l layer_weights[l] * per_layer[l]` (default `calm_layer_weights`;
  any non-negative weights, normalised to sum 1).
  """
  num_layers = logits_LBTV.shape[0]
  if layer_weights is None:
    layer_weights = calm_layer_weights(num_layers)
  layer_weights = jnp.asarray(layer_weights, jnp.float32)
  if layer_weights.shape != (num_layers,):
    raise ValueError(
        f"layer_weights must have one entry per layer ({num_layers}); got shape "
        f"{layer_weights.shape}."
    )
  layer_weights = layer_weights / jnp.sum(layer_weights)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits_LBTV.astype(jnp.float32), targets_BT[None]
  )  # [L, B, T]
  w = weights_BT.astype(jnp.float32)
  per_layer = jnp.sum(nll * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w), 1e-9)
  return jnp.sum(layer_weights * per_layer), per_layer


@dataclasses.dataclass(frozen=True, eq=False)
class AnytimeModel:
  """The training loop's view of an LM under the anytime objective: `init` is the LM's (same
  params), `apply` returns `(layer_logits [L, B, T, V], aux)` (plus the mutable updates when
  asked, as `Module.apply` does). Train with it; save, decode and generate with `model`."""

  model: Decoder

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, mutable=False, **kwargs):
    (_, aux), updates, states = _apply_capturing(self.model, variables, args, kwargs, mutable)
    logits = layer_logits(self.model, variables["params"], states[1:])
    return ((logits, aux), updates) if mutable is not False else (logits, aux)


def anytime_lm_objective(model, layer_weights=None) -> Objective:
  """`seq_objectives.lm_objective`'s batches (`tokens [B, T+1]`, optional `mask`) with the
  anytime loss. Metrics: `bits_per_token` / `accuracy` / `last_layer_loss` (nats) of the last
  layer (full depth, what generation uses) and `bits_per_token_layer_{l}` for l = 1..L."""
  check_supported(model)

  def inputs(batch, train):
    kw = {"inputs": batch["tokens"][:, :-1], "deterministic": not train}
    if "mask" in batch:
      kw["mask"] = batch["mask"][:, :-1]
    return kw

  def loss(logits, batch):
    targets = batch["tokens"][:, 1:]
    weights = _row_weights(batch, "mask", batch["tokens"].shape[1])[:, 1:]
    total, per_layer = anytime_loss(logits, targets, weights, layer_weights)
    correct = (jnp.argmax(logits[-1], -1) == targets).astype(jnp.float32)
    metrics = {
        "bits_per_token": per_layer[-1] / math.log(2.0),
        "accuracy": jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1e-9),
        "last_layer_loss": per_layer[-1],
        **{
            f"bits_per_token_layer_{i + 1}": per_layer[i] / math.log(2.0)
            for i in range(per_layer.shape[0])
        },
    }
    return total, metrics

  return Objective(
      model=AnytimeModel(model),
      loss=loss,
      inputs=inputs,
      predict=lambda logits: jnp.argmax(logits[-1], -1),
  )
