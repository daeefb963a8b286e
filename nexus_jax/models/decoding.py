"""Incremental decoding for `Decoder` / `EncoderDecoder` (and `lm.LanguageModel`).

The decoding state is the Flax `cache` collection of the model with `decode=True`: per layer
`cached_key`/`cached_value [B, cache_len, K, D]` and `cache_index [B]` (self-attention: each
row's next write position, so rows may decode at different positions) and the
projected encoder keys/values `[B, S, K, D]` (cross-attention). Its length is static, so one
jitted step serves every position.

    cache = init_cache(model, batch_size=B, cache_len=L)            # zeros, no forward pass
    logits, cache = decode_step(model, params, cache, prompt_BP)     # prefill: [B, P, V]
    logits, cache = decode_step(model, params, cache, token_B1)      # then one token at a time

`unroll_layers(model, params)` gives the same decoder with its layers unrolled (`scan_layers=False`,
params split per layer): a decode step then updates each layer's cache in place, where the layer
scan rewrites the whole stacked cache every call (about 2x faster steps for small models on CPU).

For an `EncoderDecoder`, `encode(model, params, source)` runs the encoder once; pass
`encoded=` on the first `decode_step` (it fills the cross-attention cache) and omit it later.
`cache_mask [B, L]` marks valid cache slots (left-padded prompts), `positions [B, T]` the RoPE
(or learned) positions (default: each row's cache index onwards). A model with an adaptive norm
takes `condition [B, condition_dim]` on `encode` and on every `decode_step`. Inside jit, writes
past `cache_len` are dropped (never wrapped onto earlier slots); `check_fits` is the host-side
check the generation functions and the engine run first, raising a ValueError, and a `cache_len`
above the model's `max_len` is refused by `init_cache`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.models.transformer import Decoder, EncoderDecoder

CACHE_INDEX = "cache_index"


def _check_model(model):
  if not isinstance(model, (Decoder, EncoderDecoder)):
    raise TypeError(
        f"incremental decoding needs a Decoder or EncoderDecoder (e.g. the LM's "
        f"`.decoder()`); got {type(model).__name__}."
    )
  if model.attention_backend == "fourier":
    raise ValueError(
        "attention_backend='fourier' has no KV cache; decode with 'xla' or "
        "'chunked' (the params are the same)."
    )


def _dummy(vocab_size: int, batch: int, length: int, features: int):
  if vocab_size > 0:
    return jnp.zeros((batch, length), jnp.int32)
  if features < 1:
    raise ValueError(
        "feature-input models need num_features / source_features >= 1 to size " "the cache."
    )
  return jnp.zeros((batch, length, features), jnp.float32)


def init_cache(
    model,
    batch_size: int,
    cache_len: int,
    *,
    num_features: int = 0,
    source_len: int = 0,
    source_features: int = 0,
) -> Any:
  """Zero decoding state for `batch_size` sequences of up to `cache_len` positions.

  `num_features`: input width of a feature-input decoder; `source_len` / `source_features`:
  the encoder input length / width of an `EncoderDecoder` (sizes the cross-attention cache).
  """
  _check_model(model)
  if batch_size < 1 or cache_len < 1:
    raise ValueError(f"batch_size ({batch_size}) and cache_len ({cache_len}) must be >= 1.")
  if model.max_len and cache_len > model.max_len:
    raise ValueError(
        f"cache_len {cache_len} exceeds the model's max_len {model.max_len}; decode at most "
        f"{model.max_len} positions."
    )
  dec = model.clone(decode=True)
  targets = _dummy(model.vocab_size, batch_size, cache_len, num_features)
  kw = {}
  if model.adaptive_norm:
    kw["condition"] = jnp.zeros((batch_size, model.condition_dim), jnp.float32)
  if isinstance(model, EncoderDecoder):
    if source_len < 1:
      raise ValueError("init_cache(EncoderDecoder) needs source_len >= 1 (encoder length).")
    src_vocab = model.vocab_size if model.source_vocab_size is None else model.source_vocab_size
    source = _dummy(src_vocab, batch_size, source_len, source_features)
    shapes = jax.eval_shape(lambda: dec.init(jax.random.PRNGKey(0), source, targets, **kw))
  else:
    shapes = jax.eval_shape(lambda: dec.init(jax.random.PRNGKey(0), targets, **kw))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def cache_length(cache: Any) -> int:
  """The static number of positions of a cache made by `init_cache`."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    keys = [getattr(p, "key", None) for p in path]
    if "self_attention" in keys and keys[-1] == "cached_key":
      return int(leaf.shape[-3])
  raise ValueError("no self-attention KV cache found in `cache`.")


def encode(model: EncoderDecoder, params, source, source_mask=None, condition=None):
  """Runs the encoder once: `source [B, S] | [B, S, F]` -> `encoded [B, S, E]`."""
  if not isinstance(model, EncoderDecoder):
    raise TypeError(f"encode needs an EncoderDecoder; got {type(model).__name__}.")
  encoded, _ = model.apply(
      {"params": params}, source, source_mask, condition=condition, method="encode"
  )
  return encoded


def decode_step(
    model,
    params,
    cache,
    inputs,
    *,
    positions=None,
    cache_mask=None,
    encoded=None,
    source_mask=None,
    condition=None,
):
  """Feeds `inputs [B, T] | [B, T, F]` at the cache index; returns `(outputs [B, T, ...], cache)`.

  outputs are the model head's (LM logits `[B, T, V]` float32); `condition [B, C]` for adaptive
  norms. jit it with `model` static.
  """
  _check_model(model)
  dec = model.clone(decode=True)
  variables = {"params": params, "cache": cache}
  if isinstance(model, EncoderDecoder):
    (outputs, _), state = dec.apply(
        variables,
        inputs,
        encoded,
        source_mask,
        cache_mask,
        positions,
        condition=condition,
        method="decode_targets",
        mutable=["cache"],
    )
  else:
    (outputs, _), state = dec.apply(
        variables,
        inputs,
        mask=cache_mask,
        positions=positions,
        condition=condition,
        mutable=["cache"],
    )
  return outputs, state["cache"]


def _is_index(path) -> bool:
  return getattr(path[-1], "key", None) == CACHE_INDEX


def set_cache_index(cache: Any, index) -> Any:
  """Every layer's write position set to `index`: an int scalar (every row) or `[B]` (per row);
  rewinds or skips the cache.

  Slots at and after a row's index become invisible to its later queries and are overwritten next.
  """

  def put(path, x):
    if not _is_index(path):
      return x
    return jnp.broadcast_to(jnp.asarray(index, x.dtype), x.shape)  # [B] or [layers, B]

  return jax.tree_util.tree_map_with_path(put, cache)


def reorder_cache(model, cache: Any, index_B) -> Any:
  """Gathers the batch rows `index_B [B']` of every cache array (beam search reordering); the
  write indices are kept (beam search moves every row in step), so `B'` must equal `B`.
  A PonderNet head's caches (`ponder_steps > 0`) carry a leading step axis, like scanned layers."""
  stacked = 1 if (model.scan_layers or model.share_layers) else 0

  def take(path, x):
    if _is_index(path):
      return x
    ponder = any(getattr(p, "key", None) == "ponder" for p in path)
    return jnp.take(x, index_B, axis=1 if ponder else stacked)

  return jax.tree_util.tree_map_with_path(take, cache)


def check_fits(cache_len: int, prompt_len: int, new_tokens: int, extra: int = 0):
  """Host-side check that a prompt plus the generated tokens fit the static cache; raises a
  ValueError naming the lengths (inside jit, a write past the cache would be dropped)."""
  if prompt_len < 1:
    raise ValueError("empty prompt: every sequence needs at least one token (e.g. a BOS id).")
  need = prompt_len + new_tokens + extra
  if need > cache_len:
    raise ValueError(
        f"prompt length {prompt_len} + {new_tokens} new tokens"
        f"{f' + {extra} lookahead' if extra else ''} = {need} exceeds the cache "
        f"length {cache_len}; raise cache_len or shorten the prompt."
    )


def _split_scanned(tree):
  """Every `{"layers": stacked}` scope -> `{"layers_0": ..., "layers_{n-1}": ...}` (leading axis)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _split_scanned(v) for k, v in tree.items() if k != "layers"}
  if isinstance(tree.get("layers"), dict):
    stacked = tree["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out.update({f"layers_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(n)})
  elif "layers" in tree:
    out["layers"] = tree["layers"]
  return out


def unroll_layers(model, params):
  """`(model with scan_layers=False, its params)` for a layer-scanned `Decoder` (same outputs;
  see the module docstring); any other model (shared or already unrolled layers) is returned
  as is. params are unboxed and copied once."""
  _check_model(model)
  plain = model.vocab_size > 0 and not model.adaptive_norm and not isinstance(model, EncoderDecoder)
  if not plain or not model.scan_layers or model.share_layers:
    return model, params  # token-input decoders without a condition only
  unrolled = model.clone(scan_layers=False)
  split = _split_scanned(nn.unbox(params))
  tokens = jnp.zeros((1, 2), jnp.int32)
  want = nn.unbox(jax.eval_shape(lambda: unrolled.init(jax.random.PRNGKey(0), tokens))["params"])
  shape = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  if jax.tree.structure(want) != jax.tree.structure(split) or shape(want) != shape(split):
    raise ValueError(
        f"unroll_layers: the params of {type(model).__name__} do not split into its unrolled "
        "layout (layers -> layers_i); pass unroll_layers=False."
    )
  return unrolled, split
