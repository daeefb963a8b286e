"""Token-by-token generation for interactive use: each token is yielded as soon as it is sampled.

    for token in stream_tokens(model, params, prompt_ids, max_new_tokens=200, rng=key,
                               sampling=Sampling(temperature=0.8, top_p=0.95)):
      print(tokenizer.token_bytes(token), end="", flush=True)

`generate` runs its whole loop inside one `jax.jit` and returns at the end; a chat needs every
token at once. `stream_tokens` runs the same steps from the host -- one jitted prefill, then one
jitted `sample -> decode_step` per token -- with the same random-key schedule, repetition-penalty
set and positions as `generate`, so for an unpadded prompt it yields exactly `generate`'s tokens
(tested). The consumer can stop early (`break`, `KeyboardInterrupt`): nothing is left running.

`pad_to_multiple` left-pads the prompt to a multiple of that many tokens (masked out of the cache,
positions still start at 0), so prompts of many lengths share a few compiled prefills. Recurrent
models (the hybrid's SSM state) would run the padding through their state, so they always take
the exact length.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.inference.generate import Sampling, StepModel, sample, step_model
from nexus_jax.models import decoding
from nexus_jax.models.transformer import check_token_range


def step_model_for(model, cache_len: int) -> StepModel:
  """The `StepModel` of a `Decoder` / `LanguageModel` / `EncoderDecoder`-free LM or `HybridLM`."""
  if isinstance(model, StepModel):
    return model
  from nexus_jax.models.hybrid import HybridLM
  from nexus_jax.models.hybrid import step_model as hybrid_step_model

  if isinstance(model, HybridLM):
    return hybrid_step_model(model, int(cache_len))
  return step_model(model, int(cache_len))


def is_recurrent(model) -> bool:
  """True for models whose decoding state is recurrent (no left padding possible)."""
  from nexus_jax.models.hybrid import HybridLM

  return isinstance(model, HybridLM)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(sm: StepModel, params, tokens_1P, pad):
  """Left-padded prompt `[1, P]` with `pad` leading pad slots -> (last logits [1, V], state, mask, seen)."""
  p = tokens_1P.shape[1]
  state = sm.init(params, 1, None)
  cache_mask = jnp.arange(sm.cache_len)[None, :] >= pad
  positions = jnp.maximum(jnp.arange(p)[None, :] - pad, 0)
  logits, state = sm.apply(params, state, tokens_1P, positions, cache_mask, True)
  valid = jnp.arange(p)[None, :] >= pad
  seen = jnp.any(jax.nn.one_hot(tokens_1P, sm.vocab_size, dtype=bool) & valid[..., None], axis=1)
  return logits[:, -1], state, cache_mask, seen


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(sm: StepModel, sampling: Sampling, params, state, last_1V, seen_1V, cache_mask, rng, pos):
  """Samples one token from `last_1V` and feeds it at position `pos` -> (token [1], ...)."""
  rng, key = jax.random.split(rng)
  tok = sample(key, last_1V, sampling, seen_1V)
  logits, state = sm.apply(params, state, tok[:, None], jnp.full((1, 1), pos), cache_mask, False)
  seen = seen_1V | jax.nn.one_hot(tok, sm.vocab_size, dtype=bool)
  return tok, logits[:, 0], state, seen, rng


def stream_tokens(
    model,
    params,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    rng=None,
    sampling: Sampling = Sampling(temperature=0.0),
    stop_tokens: Sequence[int] = (),
    cache_len: int | None = None,
    pad_to_multiple: int = 1,
) -> Iterator[int]:
  """Yields up to `max_new_tokens` sampled token ids, one at a time (a stop token is yielded, then
  the stream ends).

  Args:
    model: a token-input `Decoder` / `LanguageModel`, a `HybridLM`, or a `StepModel`.
    params: the model's params.
    prompt: token ids `[P]` (at least one).
    cache_len: static KV-cache length (default: the padded prompt + `max_new_tokens`); keep it
      fixed across calls to reuse the compiled steps.
    pad_to_multiple: left-pad the prompt to a multiple of this, within the room `cache_len`
      leaves (ignored for recurrent models).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  ids = np.asarray(prompt, np.int64).reshape(-1)
  if ids.size == 0:
    raise ValueError("empty prompt: streaming needs at least one prompt token.")
  check_token_range(ids, model.vocab_size, "prompt")
  if rng is None:
    if sampling.temperature != 0:
      raise ValueError("sampling with temperature > 0 needs `rng`.")
    rng = jax.random.PRNGKey(0)
  multiple = 1 if is_recurrent(model) else max(1, int(pad_to_multiple))
  padded = -(-ids.size // multiple) * multiple
  if cache_len:  # never pad past the room the cache leaves
    padded = max(ids.size, min(padded, int(cache_len) - int(max_new_tokens)))
  pad = padded - ids.size
  sm = step_model_for(model, int(cache_len or padded + max_new_tokens))
  decoding.check_fits(sm.cache_len, padded, max_new_tokens)
  tokens = np.zeros((1, padded), np.int32)
  tokens[0, pad:] = ids
  last, state, cache_mask, seen = _prefill(sm, params, jnp.asarray(tokens), jnp.int32(pad))
  stops = {int(s) for s in stop_tokens}
  for t in range(int(max_new_tokens)):
    tok, last, state, seen, rng = _step(
        sm, sampling, params, state, last, seen, cache_mask, rng, jnp.int32(ids.size + t)
    )
    token = int(tok[0])
    yield token
    if token in stops:
      return
