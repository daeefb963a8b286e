"""Exact speculative decoding (Leviathan, Kalman & Matias 2023; Chen et al. 2023).

Each round the small draft model proposes `num_draft` (gamma) tokens d_1..d_gamma, sampled from
its distributions q_i; the target scores all of them in one cached forward pass, giving p_1 ..
p_{gamma+1}. Draft token i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the
first rejection a token is drawn from the normalised residual max(0, p_i - q_i), and if all are
accepted one more token is drawn from p_{gamma+1}. Every emitted token is then distributed
exactly as sampling from the target alone (p and q are the *processed* distributions: both
models use the same `Sampling`; temperature 0 makes both one-hot, i.e. greedy verification).

    out = speculative_generate(target, target_params, draft, draft_params, prompt_P,
                               max_new_tokens=64, num_draft=4, rng=key,
                               sampling=Sampling(temperature=1.0))
    out.tokens [max_new_tokens], out.length, out.accepted / out.proposed (acceptance rate)

Rejected positions are dropped by rewinding both caches' write index (`StepModel.rewind`);
one sequence at a time (`jax.vmap` over rng keys runs independent samples).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.inference.generate import (
    Sampling,
    StepModel,
    _as_step_model,
    _check_special,
    _stops,
    prepare_prompts,
    sampling_probs,
)
from nexus_jax.models import decoding


def speculative_accept(rng, draft_tokens_G, q_GV, p_G1V):
  """The acceptance rule. `draft_tokens [G]` were drawn from `q [G, V]`; `p [G+1, V]` are the
  target's distributions at the same positions plus one. Returns `(num_accepted, next_token)`:
  the first `num_accepted` draft tokens are kept and `next_token` follows them."""
  g, v = q_GV.shape
  k_accept, k_resample = jax.random.split(rng)
  u = jax.random.uniform(k_accept, (g,))
  p_d = p_G1V[jnp.arange(g), draft_tokens_G]
  q_d = q_GV[jnp.arange(g), draft_tokens_G]
  accepted = u * q_d < p_d  # u < p/q: probability min(1, p/q)
  n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32)))
  q_pad = jnp.concatenate([q_GV, jnp.zeros((1, v), q_GV.dtype)], 0)  # all accepted: residual = p
  residual = jnp.maximum(p_G1V[n] - q_pad[n], 0.0)
  mass = residual.sum()
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_G1V[n])
  next_token = jax.random.categorical(k_resample, jnp.log(residual))
  return n.astype(jnp.int32), next_token.astype(jnp.int32)


class SpeculativeOutput(NamedTuple):
  tokens: np.ndarray  # [max_new_tokens] int32, pad_id after a stop token / the end
  length: int  # generated tokens (stop token included)
  accepted: int  # draft tokens accepted
  proposed: int  # draft tokens proposed (rounds * num_draft)
  rounds: int  # target forward passes after the prefill


def speculative_generate(
    target,
    target_params,
    draft,
    draft_params,
    prompt,
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    rng=None,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    cache_len: int | None = None,
) -> SpeculativeOutput:
  """Samples from `target` with `draft` proposals; prompt is one token sequence `[P]`.

  target/draft: decoder-only modules (e.g. `LanguageModel`) or `StepModel`s, same vocabulary.
  """
  if target.vocab_size != draft.vocab_size:
    raise ValueError(
        f"draft and target must share the vocabulary: draft vocab_size "
        f"{draft.vocab_size} != target vocab_size {target.vocab_size}."
    )
  if num_draft < 1 or max_new_tokens < 1:
    raise ValueError(f"num_draft ({num_draft}) and max_new_tokens ({max_new_tokens}) must be >= 1.")
  if sampling.repetition_penalty != 1.0:
    raise ValueError(
        "speculative decoding does not support repetition_penalty (the penalised "
        "distribution would change inside a round); use generate()."
    )
  tokens, _ = prepare_prompts([prompt], target.vocab_size)
  _check_special(stop_tokens, pad_id, target.vocab_size)
  p_len = tokens.shape[1]
  models = [
      _as_step_model(m, cache_len, p_len, max_new_tokens + num_draft) for m in (target, draft)
  ]
  for sm in models:
    if sm.needs_source:
      raise ValueError("speculative_generate supports decoder-only models.")
    decoding.check_fits(sm.cache_len, p_len, max_new_tokens, extra=num_draft)
  if rng is None:
    if sampling.temperature != 0:
      raise ValueError("sampling with temperature > 0 needs `rng`.")
    rng = jax.random.PRNGKey(0)
  out = _speculative_jit(
      *models,
      sampling,
      int(max_new_tokens),
      int(num_draft),
      target_params,
      draft_params,
      jnp.asarray(tokens[0]),
      rng,
      _stops(stop_tokens),
      jnp.int32(pad_id),
  )
  toks, length, acc, rounds = (np.asarray(x) for x in out)
  return SpeculativeOutput(toks, int(length), int(acc), int(rounds) * num_draft, int(rounds))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _speculative_jit(
    tsm: StepModel,
    dsm: StepModel,
    sampling,
    max_new,
    gamma,
    tparams,
    dparams,
    prompt_P,
    rng,
    stops,
    pad_id,
):
  return speculative_sample(
      tsm, dsm, sampling, max_new, gamma, tparams, dparams, prompt_P, rng, stops, pad_id
  )


def speculative_sample(
    tsm: StepModel,
    dsm: StepModel,
    sampling: Sampling,
    max_new: int,
    gamma: int,
    tparams,
    dparams,
    prompt_P,
    rng,
    stops=None,
    pad_id=0,
):
  """Traceable core (vmap it over `rng`): returns `(tokens [max_new], length, accepted,
  rounds)`. `stops`: int array of stop ids (None: none). The caches must hold
  `len(prompt) + max_new + gamma` positions."""
  p_len = prompt_P.shape[0]
  buf = jnp.concatenate(
      [prompt_P.astype(jnp.int32), jnp.full((max_new + gamma + 1,), pad_id, jnp.int32)]
  )
  states = [sm.init(params, 1) for sm, params in ((tsm, tparams), (dsm, dparams))]
  if p_len > 1:  # everything but the last prompt token goes into both caches
    pos = jnp.arange(p_len - 1)[None]
    states = [
        sm.apply(params, st, prompt_P[None, :-1], pos, None, True)[1]
        for sm, params, st in ((tsm, tparams, states[0]), (dsm, dparams, states[1]))
    ]
  probs = lambda logits: sampling_probs(logits, sampling)
  stops = _stops(()) if stops is None else stops

  def draft_round(dstate, first_tok, n, key):
    def one(carry, i):
      state, tok, key = carry
      logits, state = dsm.apply(
          dparams, state, tok[None, None], (n - 1 + i)[None, None], None, False
      )
      q = probs(logits[:, 0])[0]
      key, sub = jax.random.split(key)
      nxt = jax.random.categorical(sub, jnp.log(q)).astype(jnp.int32)
      return (state, nxt, key), (nxt, q)

    # gamma + 1 feeds: the last one only puts d_gamma into the cache.
    (dstate, _, _), (toks, qs) = jax.lax.scan(one, (dstate, first_tok, key), jnp.arange(gamma + 1))
    return dstate, toks[:gamma], qs[:gamma]

  def body(c):
    n = c["n"]
    key, k_draft, k_accept = jax.random.split(c["rng"], 3)
    last = c["buf"][n - 1]
    dstate, d, q = draft_round(c["dstate"], last, n, k_draft)
    feed = jnp.concatenate([last[None], d])[None]  # [1, gamma + 1]
    logits, tstate = tsm.apply(
        tparams, c["tstate"], feed, (n - 1 + jnp.arange(gamma + 1))[None], None, False
    )
    p = probs(logits[0])  # [gamma + 1, V]
    k, nxt = speculative_accept(k_accept, d, q, p)
    new = jnp.where(jnp.arange(gamma + 1) < k, jnp.concatenate([d, d[:1]]), nxt)
    new = jnp.where(jnp.arange(gamma + 1) <= k, new, pad_id)
    buf = jax.lax.dynamic_update_slice(c["buf"], new, (n,))
    n_new = n + k + 1
    stopped = jnp.any(jnp.isin(new, stops) & (jnp.arange(gamma + 1) <= k))
    return {
        "n": n_new,
        "buf": buf,
        "rng": key,
        "done": stopped,
        "tstate": tsm.rewind(tstate, n_new - 1),
        "dstate": dsm.rewind(dstate, n_new - 1),
        "accepted": c["accepted"] + k,
        "rounds": c["rounds"] + 1,
    }

  init = {
      "n": jnp.int32(p_len),
      "buf": buf,
      "rng": rng,
      "done": jnp.bool_(False),
      "tstate": states[0],
      "dstate": states[1],
      "accepted": jnp.int32(0),
      "rounds": jnp.int32(0),
  }
  final = jax.lax.while_loop(lambda c: (c["n"] < p_len + max_new) & ~c["done"], body, init)
  out = final["buf"][p_len : p_len + max_new]
  # Truncate after the first stop token; count the stop token.
  is_stop = jnp.isin(out, stops)
  first_stop = jnp.where(jnp.any(is_stop), jnp.argmax(is_stop), max_new)
  length = jnp.minimum(jnp.minimum(final["n"] - p_len, max_new), first_stop + 1)
  out = jnp.where(jnp.arange(max_new) < length, out, pad_id)
  return out, length, final["accepted"], final["rounds"]
