"""Autoregressive generation with a KV cache: sampling, stop tokens, batched prompts, beam search.

    out = generate(model, params, [[1, 5, 7], [2]], max_new_tokens=32, rng=key,
                   sampling=Sampling(temperature=0.8, top_k=40, top_p=0.95),
                   stop_tokens=(0,))
    out.tokens [B, max_new_tokens] (pad_id after a sequence stops), out.lengths [B]

- `Sampling`: temperature (0 = greedy), top-k, top-p (nucleus) and the CTRL repetition penalty
  (logits of tokens already in the prompt or output divided by the penalty when positive,
  multiplied when negative), applied in that order: penalty, temperature, top-k, top-p.
- Prompts of different lengths are left-padded to one array; a `[B, cache_len]` cache mask hides
  the padding and RoPE positions start at 0 for every sequence, so each row generates exactly
  what it would alone. Each row stops at its first stop token (included in `lengths`); the loop
  ends when all rows have stopped.
- `beam_search` keeps `beam_width` hypotheses per prompt ranked by `log p / length **
  length_penalty` (0: raw log-probability; finished hypotheses keep their score and length).
- `return_uncertainty=True` (or `abstain=`, a `uncertainty.ConformalAbstainer`) returns an
  `uncertainty.UncertainOutput`: per-token log-probability, entropy, top-2 margin and max
  probability of the processed distribution each token was drawn from (computed in the same
  loop, no second pass; greedy decoding scores the transforms at temperature 1 or
  `score_temperature`), sequence aggregates, and abstain flags per token and per sequence.
- Everything runs in one `jax.jit` over a `StepModel`: `step_model(model, cache_len)` adapts a
  `Decoder` / `EncoderDecoder` / `LanguageModel` (pass `source=` for the encoder input); tests
  and tools may build a `StepModel` from any functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.inference import uncertainty
from nexus_jax.models import decoding
from nexus_jax.models.transformer import EncoderDecoder, check_token_range


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is drawn from logits. temperature 0 = greedy (argmax after the penalty)."""

  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # nucleus mass in (0, 1]; 1: off
  repetition_penalty: float = 1.0  # 1: off; > 1 discourages repeats

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}.")
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0; got {self.repetition_penalty}.")


def process_logits(logits_BV, sampling: Sampling, seen_BV=None):
  """Penalised, tempered, top-k/top-p filtered float32 logits `[B, V]` (-inf = excluded)."""
  x = logits_BV.astype(jnp.float32)
  if sampling.repetition_penalty != 1.0 and seen_BV is not None:
    pen = jnp.where(x > 0, x / sampling.repetition_penalty, x * sampling.repetition_penalty)
    x = jnp.where(seen_BV, pen, x)
  if sampling.temperature == 0:
    return jnp.where(jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=bool), 0.0, -jnp.inf)
  x = x / sampling.temperature
  if 0 < sampling.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_p = jax.nn.softmax(jnp.take_along_axis(x, order, -1), -1)
    before = jnp.cumsum(sorted_p, -1) - sorted_p  # mass of strictly more likely tokens
    keep_sorted = before < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    x = jnp.where(keep, x, -jnp.inf)
  return x


def sampling_probs(logits_BV, sampling: Sampling, seen_BV=None):
  """The distribution `[B, V]` that `sample` draws from."""
  return jax.nn.softmax(process_logits(logits_BV, sampling, seen_BV), -1)


def sample(rng, logits_BV, sampling: Sampling, seen_BV=None):
  """One token per row `[B]` int32."""
  x = process_logits(logits_BV, sampling, seen_BV)
  if sampling.temperature == 0:
    return jnp.argmax(x, -1).astype(jnp.int32)
  return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class StepModel:
  """A cached autoregressive scorer, as pure functions.

  init(params, batch, source) -> state; source is None or {"source", "source_mask"} arrays.
  apply(params, state, tokens [B, T], positions [B, T], cache_mask [B, L] | None, first: bool)
    -> (logits [B, T, V], state); `first` is the prefill call.
  reorder(state, index [B']) -> state (rows gathered); rewind(state, index) -> state (next write
  position set to `index`).
  """

  vocab_size: int
  cache_len: int
  init: Callable[..., Any]
  apply: Callable[..., Any]
  reorder: Callable[[Any, Any], Any]
  rewind: Callable[[Any, Any], Any]
  needs_source: bool = False


@functools.lru_cache(maxsize=32)
def step_model(model, cache_len: int) -> StepModel:
  """Adapts a token-input `Decoder` / `EncoderDecoder` to a `StepModel` with a static cache."""
  if model.vocab_size < 1 or model.head != "lm":
    raise ValueError("generation needs a token-input model with head='lm'.")
  encdec = isinstance(model, EncoderDecoder)

  def init(params, batch, source=None):
    if not encdec:
      return {"cache": decoding.init_cache(model, batch, cache_len)}
    if source is None:
      raise ValueError("an EncoderDecoder needs `source=` (the encoder input) to generate.")
    src, mask = source["source"], source.get("source_mask")
    encoded = decoding.encode(model, params, src, mask)  # once per generate call
    repeat = batch // src.shape[0]
    rep = lambda x: None if x is None else jnp.repeat(x, repeat, axis=0)
    cache = decoding.init_cache(
        model,
        batch,
        cache_len,
        source_len=src.shape[1],
        source_features=src.shape[-1] if src.ndim == 3 else 0,
    )
    return {"cache": cache, "encoded": rep(encoded), "source_mask": rep(mask)}

  def apply(params, state, tokens, positions, cache_mask, first):
    kw = {}
    if encdec:
      kw = {"encoded": state["encoded"] if first else None, "source_mask": state["source_mask"]}
    logits, cache = decoding.decode_step(
        model, params, state["cache"], tokens, positions=positions, cache_mask=cache_mask, **kw
    )
    return logits, {**state, "cache": cache}

  return StepModel(
      vocab_size=model.vocab_size,
      cache_len=cache_len,
      init=init,
      apply=apply,
      reorder=lambda s, idx: {**s, "cache": decoding.reorder_cache(model, s["cache"], idx)},
      rewind=lambda s, i: {**s, "cache": decoding.set_cache_index(s["cache"], i)},
      needs_source=encdec,
  )


def prepare_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Ragged prompts (sequences of ids) or an int array `[B, P]` -> left-padded `[B, P]`, lengths."""
  if hasattr(prompts, "ndim") and prompts.ndim != 2:
    raise ValueError(f"a prompt array must be [batch, length]; got shape {prompts.shape}.")
  if not hasattr(prompts, "ndim") and any(np.ndim(p) != 1 for p in prompts):
    raise ValueError("prompts must be a list of token-id sequences or an int array [B, P].")
  rows = [np.asarray(p).reshape(-1) for p in prompts]
  if not rows:
    raise ValueError("no prompts given.")
  lengths = np.array([len(r) for r in rows], np.int32)
  if lengths.min() == 0:
    raise ValueError(
        f"empty prompt at row {int(np.argmin(lengths))}: every prompt needs at least "
        "one token (e.g. a BOS id)."
    )
  for i, r in enumerate(rows):
    if not np.issubdtype(r.dtype, np.integer):
      raise ValueError(f"prompt {i} must hold integer token ids; got dtype {r.dtype}.")
    check_token_range(r, vocab_size, f"prompt {i}")
  out = np.zeros((len(rows), lengths.max()), np.int32)
  for i, r in enumerate(rows):
    out[i, out.shape[1] - len(r) :] = r
  return out, lengths


def _source_arg(sm: StepModel, source, source_mask):
  if sm.needs_source != (source is not None):
    raise ValueError("pass `source=` exactly when generating with an EncoderDecoder.")
  if source is None:
    return None
  return {
      "source": jnp.asarray(source),
      "source_mask": None if source_mask is None else jnp.asarray(source_mask),
  }


def _as_step_model(model, cache_len, prompt_len, new_tokens):
  if isinstance(model, StepModel):
    return model
  return step_model(model, int(cache_len or prompt_len + new_tokens))


def _prefill(sm, params, state, tokens_BP, lengths_B):
  """Left-padded prompts -> (last logits [B, V], state, cache_mask [B, L])."""
  b, p = tokens_BP.shape
  pad = p - lengths_B
  cache_mask = jnp.arange(sm.cache_len)[None, :] >= pad[:, None]
  positions = jnp.maximum(jnp.arange(p)[None, :] - pad[:, None], 0)
  logits, state = sm.apply(params, state, tokens_BP, positions, cache_mask, True)
  return logits[:, -1], state, cache_mask


class GenerateOutput(NamedTuple):
  tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after the sequence stopped
  lengths: np.ndarray  # [B] generated tokens per row, the stop token included


def generate(
    model,
    params,
    prompts,
    *,
    max_new_tokens: int,
    rng=None,
    sampling: Sampling = Sampling(temperature=0.0),
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    cache_len: int | None = None,
    source=None,
    source_mask=None,
    return_uncertainty: bool = False,
    score_temperature: float | None = None,
    abstain: uncertainty.ConformalAbstainer | None = None,
) -> GenerateOutput | uncertainty.UncertainOutput:
  """Samples `max_new_tokens` per prompt (see the module docstring). model: module or StepModel.

  return_uncertainty / abstain: return an `UncertainOutput` (tokens and lengths as
  GenerateOutput) instead. score_temperature: the temperature the scores use in place of the
  sampling one (None: the sampling temperature, 1 when greedy); tokens are still drawn with
  `sampling`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  if abstain is not None and not isinstance(abstain, uncertainty.ConformalAbstainer):
    raise ValueError(
        f"abstain must be an uncertainty.ConformalAbstainer (see calibrate_abstainer); got "
        f"{type(abstain).__name__}."
    )
  if score_temperature is not None and not score_temperature > 0:
    raise ValueError(f"score_temperature must be > 0 (or None); got {score_temperature}.")
  score_sampling = None
  if return_uncertainty or abstain is not None:
    t = score_temperature or (sampling.temperature if sampling.temperature > 0 else 1.0)
    score_sampling = dataclasses.replace(sampling, temperature=float(t))
  vocab = model.vocab_size
  tokens, lengths = prepare_prompts(prompts, vocab)
  sm = _as_step_model(model, cache_len, tokens.shape[1], max_new_tokens)
  decoding.check_fits(sm.cache_len, tokens.shape[1], max_new_tokens)
  _check_special(stop_tokens, pad_id, vocab)
  if rng is None:
    if sampling.temperature != 0:
      raise ValueError("sampling with temperature > 0 needs `rng`.")
    rng = jax.random.PRNGKey(0)
  out, gen_len, stats = _generate_jit(
      sm,
      sampling,
      int(max_new_tokens),
      params,
      tokens,
      lengths,
      rng,
      _source_arg(sm, source, source_mask),
      _stops(stop_tokens),
      jnp.int32(pad_id),
      score_sampling=score_sampling,
  )
  if score_sampling is None:
    return GenerateOutput(np.asarray(out), np.asarray(gen_len))
  return uncertainty.uncertain_output(np.asarray(out), np.asarray(gen_len), stats, abstain)


def _check_special(stop_tokens, pad_id, vocab_size):
  check_token_range(
      np.asarray(list(stop_tokens) + [pad_id], np.int64), vocab_size, "stop_tokens / pad_id"
  )


def _stops(stop_tokens) -> jax.Array:
  """Stop ids as a dynamic int32 array (-1 when none: never sampled), so they cost no recompile."""
  return jnp.asarray(list(stop_tokens) or [-1], jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("score_sampling",))
def _generate_jit(
    sm, sampling, max_new, params, tokens, lengths, rng, source, stops, pad_id, score_sampling=None
):
  b = tokens.shape[0]
  state = sm.init(params, b, source)
  last, state, cache_mask = _prefill(sm, params, state, tokens, lengths)
  valid = jnp.arange(tokens.shape[1])[None, :] >= (tokens.shape[1] - lengths)[:, None]
  seen = jnp.any(jax.nn.one_hot(tokens, sm.vocab_size, dtype=bool) & valid[..., None], axis=1)

  stat_names = () if score_sampling is None else ("logprob", "entropy", "margin", "max_prob")

  def cond(c):
    return (c["t"] < max_new) & ~jnp.all(c["done"])

  def body(c):
    rng, key = jax.random.split(c["rng"])
    tok = sample(key, c["last"], sampling, c["seen"])
    stats = c["stats"]
    if score_sampling is not None:  # scores of the distribution `tok` was drawn from
      st = uncertainty.token_stats(process_logits(c["last"], score_sampling, c["seen"]), tok)
      stats = {k: v.at[:, c["t"]].set(jnp.where(c["done"], 0.0, st[k])) for k, v in stats.items()}
    tok = jnp.where(c["done"], pad_id, tok)
    done = c["done"] | jnp.isin(tok, stops)
    logits, state = sm.apply(
        params, c["state"], tok[:, None], (lengths + c["t"])[:, None], cache_mask, False
    )
    return {
        "stats": stats,
        "t": c["t"] + 1,
        "rng": rng,
        "state": state,
        "last": logits[:, 0],
        "done": done,
        "seen": c["seen"] | (jax.nn.one_hot(tok, sm.vocab_size, dtype=bool) & ~c["done"][:, None]),
        "out": c["out"].at[:, c["t"]].set(tok),
        "len": c["len"] + (~c["done"]),
    }

  init = {
      "t": jnp.int32(0),
      "rng": rng,
      "state": state,
      "last": last,
      "seen": seen,
      "done": jnp.zeros((b,), bool),
      "out": jnp.full((b, max_new), pad_id, jnp.int32),
      "len": jnp.zeros((b,), jnp.int32),
      "stats": {k: jnp.zeros((b, max_new), jnp.float32) for k in stat_names},
  }
  final = jax.lax.while_loop(cond, body, init)
  return final["out"], final["len"], final["stats"]


class BeamOutput(NamedTuple):
  tokens: np.ndarray  # [B, W, max_new_tokens], best hypothesis first, pad_id after a stop
  lengths: np.ndarray  # [B, W] generated tokens (stop token included)
  scores: np.ndarray  # [B, W] total log-probability
  normalized_scores: np.ndarray  # [B, W] scores / lengths ** length_penalty (the ranking)


def beam_search(
    model,
    params,
    prompts,
    *,
    beam_width: int,
    max_new_tokens: int,
    length_penalty: float = 0.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    cache_len: int | None = None,
    source=None,
    source_mask=None,
) -> BeamOutput:
  """Beam search over `max_new_tokens` steps; model: module or StepModel."""
  if beam_width < 1:
    raise ValueError(f"beam_width must be >= 1; got {beam_width}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  tokens, lengths = prepare_prompts(prompts, model.vocab_size)
  sm = _as_step_model(model, cache_len, tokens.shape[1], max_new_tokens)
  decoding.check_fits(sm.cache_len, tokens.shape[1], max_new_tokens)
  _check_special(stop_tokens, pad_id, sm.vocab_size)
  src = _source_arg(sm, source, source_mask)
  out = _beam_jit(
      sm,
      int(beam_width),
      int(max_new_tokens),
      params,
      tokens,
      lengths,
      src,
      jnp.float32(length_penalty),
      _stops(stop_tokens),
      jnp.int32(pad_id),
  )
  return BeamOutput(*(np.asarray(x) for x in out))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _beam_jit(sm, w, max_new, params, tokens, lengths, source, alpha, stops, pad_id):
  b, v = tokens.shape[0], sm.vocab_size
  tokens, lengths = jnp.repeat(tokens, w, 0), jnp.repeat(lengths, w, 0)  # [B*W, P]
  state = sm.init(params, b * w, source)
  last, state, cache_mask = _prefill(sm, params, state, tokens, lengths)
  norm = lambda s, n: s / jnp.maximum(n, 1).astype(jnp.float32) ** alpha

  def body(c):
    t = c["t"]
    logp = jax.nn.log_softmax(c["last"].astype(jnp.float32)).reshape(b, w, v)
    fin = c["finished"][..., None]
    keep_pad = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)
    cand = c["scores"][..., None] + jnp.where(fin, keep_pad, logp)  # [B, W, V]
    cand_len = jnp.where(fin, c["len"][..., None], t + 1)
    _, idx = jax.lax.top_k(norm(cand, cand_len).reshape(b, w * v), w)  # [B, W]
    parent, tok = idx // v, (idx % v).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(x, parent, 1)
    was_fin = gather(c["finished"])
    tok = jnp.where(was_fin, pad_id, tok)
    seqs = jnp.take_along_axis(c["seqs"], parent[..., None], 1).at[:, :, t].set(tok)
    flat = (jnp.arange(b)[:, None] * w + parent).reshape(-1)
    state = sm.reorder(c["state"], flat)
    logits, state = sm.apply(
        params,
        state,
        tok.reshape(-1, 1),
        (lengths + t)[:, None],
        jnp.take(cache_mask, flat, 0),
        False,
    )
    return {
        "t": t + 1,
        "state": state,
        "last": logits[:, 0],
        "seqs": seqs,
        "scores": jnp.take_along_axis(cand.reshape(b, w * v), idx, 1),
        "finished": was_fin | jnp.isin(tok, stops),
        "len": jnp.where(was_fin, gather(c["len"]), t + 1),
    }

  init = {
      "t": jnp.int32(0),
      "state": state,
      "last": last,
      "seqs": jnp.full((b, w, max_new), pad_id, jnp.int32),
      "scores": jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), (b, 1)),
      "finished": jnp.zeros((b, w), bool),
      "len": jnp.zeros((b, w), jnp.int32),
  }
  final = jax.lax.while_loop(lambda c: (c["t"] < max_new) & ~jnp.all(c["finished"]), body, init)
  ranked = norm(final["scores"], final["len"])
  order = jnp.argsort(-ranked, axis=1)
  pick = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  return pick(final["seqs"]), pick(final["len"]), pick(final["scores"]), pick(ranked)
