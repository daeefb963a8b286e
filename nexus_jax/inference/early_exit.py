"""Confidence-based early exit at decode time (CALM, Schuster et al. 2022).

Each generated token runs the layers one at a time; after layer l < L its confidence is measured
and the token exits (its logits are layer l's, through the shared final norm and LM head) once
the confidence reaches `threshold` (tau):

- "softmax_max": the top-1 probability of layer l's softmax;
- "softmax_diff": top-1 minus top-2 probability;
- "state": cosine similarity of the hidden states after layers l and l-1 (0: the embeddings).

An exited token's hidden state is frozen and propagated: every later ("skipped") layer still
writes its key/value cache entry, computed from the exited state (its self-attention norm, K/V
projections and RoPE only, no attention or MLP), so later tokens attend to every layer as usual.
The last layer always exits. `threshold=1.0` never exits early (a float32 softmax can round to
exactly 1) and reproduces `generate` token for token; `threshold=0.0` exits every token at layer
1 (the softmax measures are >= 0; "state" unless the cosine is negative).

    out = early_exit_generate(model, params, [[1, 5, 7]], max_new_tokens=32, threshold=0.9,
                              confidence="softmax_max")
    out.tokens [B, N], out.lengths [B], out.exit_layers [B, N] (1..L; 0 after a stop)

Layer-compute accounting (`EarlyExitOutput`): `skipped_fraction` is CALM's measure, the fraction
of (generated token, layer) pairs after each token's exit layer, `mean((L - exit) / L)`; those
layers still pay for the K/V projections of the propagated state (2 of a layer's ~7 matmuls, no
attention scores, no MLP), and every computed layer below L pays one extra head call for its
confidence. What is actually skipped at run time: with `skip_compute=True` each layer is a
`lax.cond` that takes the K/V-only branch when every unfinished row of the batch has exited, so
for batch 1 the skipped fraction is real compute; for a batch it is `batch_skipped_fraction`
(the fraction of (step, layer) pairs the whole batch skipped). `skip_compute=False` runs every
layer for every row and discards the exited rows' outputs (same tokens: the reference).

The prompt except its last token is prefilled at full depth (`decoding.decode_step`); the last
prompt token is the first early-exit step, so every generated token's logits come from one.
`exit_layers_teacher_forced` gives the per-token exit layers of a full forward pass (every
layer's logits from `models.anytime`), for scoring without decoding. Supported models: those of
`models.anytime.check_supported`, with RoPE (not learned) positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.inference.generate import Sampling, prepare_prompts, sample
from nexus_jax.layers import rotary
from nexus_jax.layers.blocks import TransformerBlock
from nexus_jax.layers.norms import RMSNorm, make_norm
from nexus_jax.models import decoding
from nexus_jax.models.anytime import check_supported, layer_logits, stack_template
from nexus_jax.models.transformer import check_token_range

CONFIDENCES = ("softmax_max", "softmax_diff", "state")


def check_exit_args(threshold: float, confidence: str) -> None:
  """ValueError naming `threshold` unless it lies in [0, 1], or `confidence` unless known."""
  if not (isinstance(threshold, (int, float, np.floating)) and 0.0 <= float(threshold) <= 1.0):
    raise ValueError(
        f"threshold (tau) must be a number in [0, 1] (1: never exit early); got {threshold!r}."
    )
  if confidence not in CONFIDENCES:
    raise ValueError(f"confidence={confidence!r} is unknown; choose one of {CONFIDENCES}.")


def confidence_scores(confidence: str, logits_V, state, prev_state):
  """Confidence `[...]` of logits `[..., V]` (softmax measures) or of the hidden states
  `state`, `prev_state [..., E]` (cosine similarity, "state")."""
  if confidence == "state":
    a, b = state.astype(jnp.float32), prev_state.astype(jnp.float32)
    dot = jnp.sum(a * b, -1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
  probs = jax.nn.softmax(logits_V.astype(jnp.float32), -1)
  if confidence == "softmax_max":
    return jnp.max(probs, -1)
  top2 = jax.lax.top_k(probs, 2)[0]
  return top2[..., 0] - top2[..., 1]


def exit_layers_teacher_forced(layer_logits_LBTV, states_LBTE, threshold: float, confidence: str):
  """Per-token exit layers `[B, T]` int32 (1..L) of a full forward pass.

  `layer_logits [L, B, T, V]` (`anytime.layer_logits`), `states [L + 1, B, T, E]`
  (`anytime.layer_states`: embeddings first). A token exits at the first layer l < L whose
  confidence is >= threshold (never when threshold == 1), else at L. The context is the full-depth
  one (no propagated states): the teacher-forced estimate of what decoding would do.
  """
  check_exit_args(threshold, confidence)
  num_layers = layer_logits_LBTV.shape[0]
  conf = confidence_scores(confidence, layer_logits_LBTV, states_LBTE[1:], states_LBTE[:-1])
  go = (conf >= threshold) & (threshold < 1.0)
  go = go.at[-1].set(True)
  return (jnp.argmax(go, axis=0) + 1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the per-layer step needs from the model (hashable: a jit static argument)."""

  model: Any
  block: TransformerBlock  # the stack's block template, decode=True
  num_layers: int
  layout: str  # "scanned" (params and cache stacked on [L]) | "shared" | "unrolled"


@functools.lru_cache(maxsize=32)
def _plan(model) -> _Plan:
  check_supported(model, "early exit")
  if model.position_embedding != "rope":
    raise ValueError(
        f"early exit: position_embedding={model.position_embedding!r} is not supported; "
        "use 'rope' (the learned table's cache index is not tracked per layer)."
    )
  if model.attention_backend == "fourier":
    raise ValueError("early exit: attention_backend='fourier' has no KV cache; use 'xla'.")
  block, _ = stack_template(model)
  layout = "shared" if model.share_layers else ("scanned" if model.scan_layers else "unrolled")
  return _Plan(model, block.clone(decode=True), model.num_layers, layout)


def _layer_tree(plan: _Plan, tree, l: int):
  dec = tree["decoder"]
  if plan.layout == "unrolled":
    return dec[f"layers_{l}"]
  return jax.tree.map(lambda x: x[l], dec["layers"])


def _layer_params(plan: _Plan, params, l: int):
  if plan.layout == "shared":
    return params["decoder"]["layers"]
  return _layer_tree(plan, params, l)


def _set_layer_cache(plan: _Plan, cache, l: int, value):
  dec = dict(cache["decoder"])
  if plan.layout == "unrolled":
    dec[f"layers_{l}"] = value
  else:
    dec["layers"] = jax.tree.map(lambda x, v: x.at[l].set(v), dec["layers"], value)
  return {**cache, "decoder": dec}


def _write_kv(block: TransformerBlock, params, cache, h_B1E, positions_B1):
  """The self-attention K/V cache update of one layer for states `h [B, 1, E]` (what the full
  block writes): norm (pre-norm), key/value projections, k-norm, RoPE, write at cache_index."""
  sa, c = params["self_attention"], cache["self_attention"]
  x = h_B1E
  if block.norm_placement == "pre":
    norm = make_norm(
        block.norm, epsilon=block.norm_epsilon, dtype=block.dtype, param_dtype=block.param_dtype
    )
    x = norm.apply({"params": params["self_attention_norm"]}, x)
  x = x.astype(block.dtype or x.dtype)
  b, t, e = x.shape

  def proj(p):
    kernel = p["kernel"]
    dense = nn.DenseGeneral(
        kernel.shape[1:],
        use_bias="bias" in p,
        dtype=block.dtype or x.dtype,
        param_dtype=kernel.dtype,
    )
    return dense.apply({"params": p}, x.reshape(-1, e)).reshape(b, t, *kernel.shape[1:])

  k, v = proj(sa["key"]), proj(sa["value"])
  if block.qk_norm:
    k = RMSNorm(param_axis="kv", param_dtype=block.param_dtype).apply({"params": sa["k_norm"]}, k)
  if block.rotary_fraction > 0:
    k = rotary.apply_rope(
        k, positions_B1, rotary_fraction=block.rotary_fraction, theta=block.rope_theta
    )
  index = jnp.broadcast_to(c["cache_index"], (b,)).astype(jnp.int32)
  slots, rows = index[:, None], jnp.arange(b)[:, None]
  ck = c["cached_key"].at[rows, slots].set(k.astype(c["cached_key"].dtype), mode="drop")
  cv = c["cached_value"].at[rows, slots].set(v.astype(c["cached_value"].dtype), mode="drop")
  new = {**c, "cached_key": ck, "cached_value": cv, "cache_index": c["cache_index"] + t}
  return {**cache, "self_attention": new}


def early_exit_step(
    plan: _Plan,
    params,
    cache,
    tokens_B,
    positions_B,
    cache_mask,
    threshold,
    confidence: str,
    active_B,
    skip_compute: bool = True,
):
  """One decoding step with early exit: `tokens [B]` at `positions [B]` ->
  `(logits [B, V], cache, exit_layer [B] (1..L), layers_skipped_by_batch int32)`.

  Rows with `active=False` (finished) count as exited before layer 1 (only their K/V are written).
  """
  model, num_layers = plan.model, plan.num_layers
  params = nn.unbox(params)
  embed = nn.Embed(model.vocab_size, model.embed_dim, dtype=model.dtype or jnp.float32)
  h = embed.apply({"params": params["input_embed"]}, tokens_B[:, None])  # [B, 1, E]
  b = h.shape[0]
  pos = positions_B[:, None].astype(jnp.int32)
  carry = {
      "h": h,
      "exited": ~active_B,
      "exit_layer": jnp.full((b,), num_layers, jnp.int32),
      "logits": jnp.zeros((b, model.vocab_size), jnp.float32),
  }
  skipped = jnp.int32(0)
  for l in range(num_layers):
    p_l, c_l = _layer_params(plan, params, l), _layer_tree(plan, cache, l)
    last = l == num_layers - 1

    def computed(carry, c_l, p_l=p_l, last=last, l=l):
      (y, _), upd = plan.block.apply(
          {"params": p_l, "cache": c_l},
          carry["h"],
          None,
          None,
          pos,
          cache_mask,
          None,
          True,
          None,
          mutable=["cache"],
      )
      exited = carry["exited"]
      y = jnp.where(exited[:, None, None], carry["h"], y)  # exited rows keep their state
      logits = layer_logits(model, params, y[:, 0])
      if last:
        go = ~exited
      else:
        conf = confidence_scores(confidence, logits, y[:, 0], carry["h"][:, 0])
        go = ~exited & (conf >= threshold) & (threshold < 1.0)
      out = {
          "h": y,
          "exited": exited | go,
          "exit_layer": jnp.where(go, l + 1, carry["exit_layer"]),
          "logits": jnp.where(go[:, None], logits, carry["logits"]),
      }
      return out, upd["cache"], jnp.int32(0)

    def kv_only(carry, c_l, p_l=p_l):
      return carry, _write_kv(plan.block, p_l, c_l, carry["h"], pos), jnp.int32(1)

    if skip_compute and l > 0:
      carry, c_l, s = jax.lax.cond(jnp.all(carry["exited"]), kv_only, computed, carry, c_l)
    else:
      carry, c_l, s = computed(carry, c_l)
    skipped = skipped + s
    cache = _set_layer_cache(plan, cache, l, c_l)
  return carry["logits"], cache, carry["exit_layer"], skipped


class EarlyExitOutput(NamedTuple):
  tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after the sequence stopped
  lengths: np.ndarray  # [B] generated tokens per row, the stop token included
  exit_layers: np.ndarray  # [B, max_new_tokens] layer (1..L) whose logits gave the token; 0: none
  skipped_fraction: float  # mean over generated tokens of (L - exit) / L (CALM accounting)
  batch_skipped_fraction: float  # (step, layer) pairs the whole batch skipped (lax.cond)


def early_exit_generate(
    model,
    params,
    prompts,
    *,
    max_new_tokens: int,
    threshold: float,
    confidence: str = "softmax_max",
    rng=None,
    sampling: Sampling = Sampling(temperature=0.0),
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    cache_len: int | None = None,
    skip_compute: bool = True,
) -> EarlyExitOutput:
  """`generate` with confidence-based early exit (see the module docstring); same arguments
  plus `threshold` in [0, 1], `confidence` in CONFIDENCES and `skip_compute`."""
  check_exit_args(threshold, confidence)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  plan = _plan(model)
  tokens, lengths = prepare_prompts(prompts, model.vocab_size)
  cache_len = int(cache_len or tokens.shape[1] + max_new_tokens)
  decoding.check_fits(cache_len, tokens.shape[1], max_new_tokens)
  check_token_range(
      np.asarray(list(stop_tokens) + [pad_id], np.int64), model.vocab_size, "stop_tokens / pad_id"
  )
  if rng is None:
    if sampling.temperature != 0:
      raise ValueError("sampling with temperature > 0 needs `rng`.")
    rng = jax.random.PRNGKey(0)
  out, gen_len, exits, skipped, steps = _early_exit_jit(
      plan,
      sampling,
      int(max_new_tokens),
      confidence,
      bool(skip_compute),
      cache_len,
      nn.unbox(params),
      tokens,
      lengths,
      rng,
      jnp.asarray(list(stop_tokens) or [-1], jnp.int32),
      jnp.int32(pad_id),
      jnp.float32(threshold),
  )
  gen_len, exits = np.asarray(gen_len), np.asarray(exits)
  valid = np.arange(exits.shape[1])[None, :] < gen_len[:, None]
  num_layers = plan.num_layers
  frac = float(np.sum((num_layers - exits) * valid) / max(np.sum(valid) * num_layers, 1))
  batch_frac = float(skipped) / max(int(steps) * num_layers, 1)
  return EarlyExitOutput(np.asarray(out), gen_len, exits * valid, frac, batch_frac)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _early_exit_jit(
    plan, sampling, max_new, confidence, skip_compute, cache_len, params, tokens, lengths, rng,
    stops, pad_id, threshold,
):  # fmt: skip
  model = plan.model
  b, p = tokens.shape
  pad = p - lengths
  cache = decoding.init_cache(model, b, cache_len)
  cache_mask = jnp.arange(cache_len)[None, :] >= pad[:, None]
  if p > 1:  # all but the last prompt token at full depth (slots 0..P-2)
    positions = jnp.maximum(jnp.arange(p - 1)[None, :] - pad[:, None], 0)
    _, cache = decoding.decode_step(
        model, params, cache, tokens[:, :-1], positions=positions, cache_mask=cache_mask
    )
  valid = jnp.arange(p)[None, :] >= pad[:, None]
  seen = jnp.any(jax.nn.one_hot(tokens, model.vocab_size, dtype=bool) & valid[..., None], axis=1)

  def cond(c):
    return (c["t"] < max_new) & ~jnp.all(c["done"])

  def body(c):
    logits, cache, exit_layer, skipped = early_exit_step(
        plan,
        params,
        c["cache"],
        c["input"],
        lengths - 1 + c["t"],
        cache_mask,
        threshold,
        confidence,
        ~c["done"],
        skip_compute,
    )
    rng, key = jax.random.split(c["rng"])
    tok = sample(key, logits, sampling, c["seen"])
    tok = jnp.where(c["done"], pad_id, tok)
    return {
        "t": c["t"] + 1,
        "rng": rng,
        "cache": cache,
        "input": tok,
        "done": c["done"] | jnp.isin(tok, stops),
        "seen": c["seen"]
        | (jax.nn.one_hot(tok, model.vocab_size, dtype=bool) & ~c["done"][:, None]),
        "out": c["out"].at[:, c["t"]].set(tok),
        "exits": c["exits"].at[:, c["t"]].set(exit_layer),
        "len": c["len"] + (~c["done"]),
        "skipped": c["skipped"] + skipped,
    }

  init = {
      "t": jnp.int32(0),
      "rng": rng,
      "cache": cache,
      "input": tokens[:, -1],
      "done": jnp.zeros((b,), bool),
      "seen": seen,
      "out": jnp.full((b, max_new), pad_id, jnp.int32),
      "exits": jnp.zeros((b, max_new), jnp.int32),
      "len": jnp.zeros((b,), jnp.int32),
      "skipped": jnp.int32(0),
  }
  final = jax.lax.while_loop(cond, body, init)
  return final["out"], final["len"], final["exits"], final["skipped"], final["t"]
