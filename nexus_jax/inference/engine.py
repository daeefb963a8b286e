"""A decode engine for continuous batching (Orca's iteration-level scheduling, JetStream's API).

    engine = Engine(model, params, num_slots=8, max_len=256)
    engine.warmup()                         # compiles every prefill bucket and batch, insert, step
    prefix = engine.prefill(prompt_ids, temperature=0.8, top_p=0.95, seed=7)
    prefix.token, prefix.logprob            # the first generated token (sampled by the prefill)
    engine.insert(prefix, slot=0)           # into the decode state, with lax.dynamic_update_slice
    out = engine.generate()                 # one jitted step: the next token of every slot
    out.tokens[0], out.logprobs[0]          # [num_slots] numpy, valid where out.active
    out = engine.generate_steps(4)          # 4 steps in one call: tokens [4, num_slots]
    engine.free(0)                          # the slot takes the next request
    prefixes = engine.prefill_batch([p1, p2, p3], [Sampling(0.0)] * 3, seeds=[0, 1, 2])
    engine.insert_many([(prefixes[0], 1), (prefixes[2], 3)])  # one call, several slots

The decode state holds `num_slots` rows: the model's KV cache (`cache_index [S]`: every slot at
its own position), each slot's pending token (sampled, not yet fed) and its position, PRNG key,
sampling settings (`row_sampling.RowSampling`) and the tokens it has seen (repetition penalty).
So one compiled step serves any mix of requests, and requests join and leave between steps.

- `prefill_batch` runs up to `max_prefill_batch` prompts in one call: each right-padded to the
  smallest bucket >= the longest prompt's length (`prefill_buckets`), the batch padded to the
  next of `prefill_sizes` (default 1 and `num_slots`; one compile per (size, bucket): warm-up
  time grows with both), into a cache of the bucket's length whose write index is rewound per
  row to the row's true length: the padding's keys are never visible (causal prefill; later
  tokens overwrite them). Each row samples its first token
  from its last prompt position (as JetStream: a request of n tokens then needs n - 1 decode
  steps) and gets a `Prefix` (`state`: the decode state's structure with the call's batch,
  shared by the call's prefixes; `row`: its row). `prefill` is a call of one. A batched prefill
  reads the weights once for all its rows (a batch-1 prefill of a short prompt costs about two
  decode steps here), so a scheduler prefills queued requests ahead of free slots (JetStream's
  prefill queue) and inserts them as slots free.
- `insert_many` copies prefix rows into slots in one jitted call (a loop of
  `lax.dynamic_update_slice` over the donated decode state: in place); a prefix's cache is
  shorter than a slot's, so it fills the row's first positions (the rest is stale and
  invisible). `insert` is one pair.
- `generate` feeds every slot's pending token at the slot's position and samples the next one
  from the new logits, with the same key schedule, transforms and draw as `generate.generate`
  on the request alone (`jax.random.split` per token, per-row `categorical`), so greedy and
  seeded requests give `generate`'s tokens. Free slots are computed too and their outputs
  ignored. `generate_steps(k)` runs k steps in one call (a `lax.fori_loop` with a dynamic trip
  count inside a jitted call compiled per power-of-two `capacity` >= k: no host round trip in
  between, no compile per k), for a scheduler that knows no slot finishes sooner.
- Host-side checks: a prompt longer than the largest bucket, a prompt plus `max_new_tokens` over
  `max_len` (`check_request`), and a step that would write an active slot past `max_len` raise a
  ValueError naming the field; inside jit nothing wraps (out-of-range writes are dropped).
- `compile_count` counts traces of the jitted functions; after `warmup()` it must not change.

A layer-scanned model is decoded through `decoding.unroll_layers` (the same model with its layers
unrolled and params split per layer; `engine.model` / `engine.params`): each step then updates
every layer's cache in place instead of rewriting the stacked cache (about 2x faster steps here).

Supported: token-input `Decoder` / `LanguageModel` (dense or MoE: decoding is dropless, so a
request's tokens do not depend on the other slots or prefill rows) or a `generate.StepModel`
whose `rewind` sets per-row write positions. A `HybridLM` is refused (its SSM state is
recurrent: bucket padding would run through it); use `hybrid.generate` or `stream_tokens` for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nexus_jax.inference.generate import Sampling, StepModel, step_model
from nexus_jax.inference.row_sampling import RowSampling, sample_rows
from nexus_jax.models import decoding
from nexus_jax.models.transformer import Decoder, EncoderDecoder, check_token_range


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` below `max_len`, then `max_len`: (16, 32, ..., max_len)."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix:
  """A prefilled request: row `row` of `state` (device pytree, the decode state's structure with
  the prefill call's batch; the call's other prefixes share it)."""

  state: Any
  length: int  # prompt tokens
  bucket: int  # padded prefill length
  token: int  # the first generated token
  logprob: float  # its log-probability under the processed distribution
  row: int = 0


class StepOutput(NamedTuple):
  tokens: np.ndarray  # [S] int32, the token each slot sampled this step
  logprobs: np.ndarray  # [S] float32, its log-probability under the processed distribution
  active: np.ndarray  # [S] bool, slots holding a request (the others' outputs are garbage)


def _engine_step_model(model, max_len: int):
  """(the decode `StepModel`, a function bucket -> the prefill `StepModel`)."""
  from nexus_jax.models.hybrid import HybridLM

  if isinstance(model, HybridLM):
    raise ValueError(
        "Engine does not support HybridLM: its SSM state is recurrent, so prefill bucket padding "
        "would run through it and slots cannot be padded. Use hybrid.generate or "
        "inference.stream.stream_tokens for a HybridLM."
    )
  if isinstance(model, StepModel):
    if model.needs_source:
      raise ValueError("Engine serves decoder-only models; this StepModel needs `source`.")
    if model.cache_len != max_len:
      raise ValueError(f"max_len ({max_len}) must equal the StepModel's cache_len.")
    return model, lambda bucket: model  # a prefix as long as the decode cache
  if isinstance(model, EncoderDecoder):
    raise ValueError("Engine serves decoder-only LMs; an EncoderDecoder needs `source=` per row.")
  return step_model(model, max_len), lambda bucket: step_model(model, bucket)


class Engine:
  """`num_slots` concurrent sequences over one KV cache of `max_len` positions per slot."""

  def __init__(
      self,
      model,
      params,
      *,
      num_slots: int = 8,
      max_len: int | None = None,
      prefill_buckets: Sequence[int] | None = None,
      prefill_sizes: Sequence[int] | None = None,
      unroll_layers: bool = True,
  ):
    """model: `LanguageModel` / token-input `Decoder` (or a `StepModel`); max_len: positions per
    slot (prompt + generated; default the model's `max_len`); prefill_buckets: padded prompt
    lengths, ascending, each <= max_len (default `default_buckets(max_len)`);
    prefill_sizes: the batch sizes a `prefill_batch` call is padded to, ascending (default
    `(1, num_slots)`: each is one compile per bucket; the largest is the most prompts one call
    takes, `max_prefill_batch`); unroll_layers:
    decode a layer-scanned model through `decoding.unroll_layers` (in-place per-layer caches;
    `self.model` / `self.params` are what the engine runs)."""
    if max_len is None:
      max_len = getattr(model, "max_len", 0) or getattr(model, "cache_len", 0)
      if not max_len:
        raise ValueError(
            "Engine needs max_len= (KV-cache positions per slot): the model has max_len=0."
        )
    max_len, num_slots = int(max_len), int(num_slots)
    if num_slots < 1 or max_len < 2:
      raise ValueError(f"num_slots ({num_slots}) must be >= 1 and max_len ({max_len}) >= 2.")
    buckets = tuple(int(b) for b in (prefill_buckets or default_buckets(max_len)))
    if list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] > max_len:
      raise ValueError(
          f"prefill_buckets must be ascending distinct lengths in [1, max_len={max_len}]; "
          f"got {buckets}."
      )
    sizes = tuple(int(k) for k in (prefill_sizes or sorted({1, num_slots})))
    if list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
      raise ValueError(f"prefill_sizes must be ascending distinct sizes >= 1; got {sizes}.")
    if unroll_layers and not isinstance(model, StepModel) and isinstance(model, Decoder):
      model, params = decoding.unroll_layers(model, params)
    self.model, self.params = model, params
    self.sm, self._prefill_sm = _engine_step_model(model, max_len)
    self.num_slots, self.max_len, self.buckets = num_slots, max_len, buckets
    self.prefill_sizes, self.max_prefill_batch = sizes, sizes[-1]
    self.vocab_size = self.sm.vocab_size
    self.compile_count = 0  # traces of the jitted functions (each trace is one compile)
    self._axes = self._batch_axes()
    self._prefill_jit = jax.jit(self._counted(self._prefill_fn))
    self._insert_jit = jax.jit(self._counted(self._insert_fn), donate_argnums=(0,))
    self._block_jit = jax.jit(
        self._counted(self._block_fn), static_argnums=(3,), donate_argnums=(1,)
    )
    self._state_shapes = jax.eval_shape(lambda p: self._init_state(p, num_slots), params)
    self.reset()

  # ----- host API -----

  def reset(self):
    """A fresh decode state: every slot free."""
    self.state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._state_shapes)
    self._pos = np.zeros(self.num_slots, np.int64)  # host copy of each slot's position
    self._active = np.zeros(self.num_slots, bool)

  def free_slots(self) -> list[int]:
    return [int(i) for i in np.flatnonzero(~self._active)]

  def active_slots(self) -> list[int]:
    return [int(i) for i in np.flatnonzero(self._active)]

  def position(self, slot: int) -> int:
    """Tokens in the slot's cache so far (prompt + fed tokens)."""
    return int(self._pos[slot])

  def bucket_for(self, length: int) -> int:
    for b in self.buckets:
      if b >= length:
        return b
    raise ValueError(
        f"prompt_ids length {length} exceeds the largest prefill bucket {self.buckets[-1]}; "
        f"add a larger bucket to prefill_buckets (<= max_len {self.max_len})."
    )

  def check_request(self, prompt_len: int, max_new_tokens: int):
    """Raises ValueError unless a prompt of `prompt_len` plus `max_new_tokens` fits a slot."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
    self.bucket_for(prompt_len)
    try:
      decoding.check_fits(self.max_len, prompt_len, max_new_tokens)
    except ValueError as e:
      raise ValueError(f"prompt_ids + max_new_tokens: {e} (Engine max_len)") from None

  def prefill(
      self,
      prompt_ids: Sequence[int],
      *,
      temperature: float = 0.0,
      top_k: int = 0,
      top_p: float = 1.0,
      repetition_penalty: float = 1.0,
      seed: int = 0,
  ) -> Prefix:
    """Runs the prompt `[P]` through a batch-1 cache (jitted once per bucket) -> `Prefix`."""
    sampling = Sampling(temperature, int(top_k), top_p, repetition_penalty)  # validates
    return self.prefill_batch([prompt_ids], [sampling], [seed])[0]

  def prefill_batch(
      self,
      prompts: Sequence[Sequence[int]],
      samplings: Sequence[Sampling] | None = None,
      seeds: Sequence[int] | None = None,
  ) -> list[Prefix]:
    """Runs up to `max_prefill_batch` prompts in one jitted call (right-padded to the bucket of
    the longest, the batch padded to a `prefill_sizes` entry) -> one `Prefix` per prompt.
    samplings / seeds: per prompt (default greedy / 0)."""
    n = len(prompts)
    if not 1 <= n <= self.max_prefill_batch:
      raise ValueError(
          f"prefill_batch takes 1 to max_prefill_batch={self.max_prefill_batch} prompts; got {n}."
      )
    samplings = [Sampling(temperature=0.0)] * n if samplings is None else list(samplings)
    seeds = [0] * n if seeds is None else [int(s) for s in seeds]
    if len(samplings) != n or len(seeds) != n:
      raise ValueError(
          f"prefill_batch: {n} prompts need {n} samplings and seeds; got {len(samplings)} "
          f"and {len(seeds)}."
      )
    rows = []
    for i, prompt in enumerate(prompts):
      ids = np.asarray(prompt).reshape(-1)
      name = "prompt_ids" if n == 1 else f"prompt_ids (prompt {i})"
      if ids.size == 0:
        raise ValueError(f"{name} is empty: every prompt needs at least one token (e.g. BOS).")
      if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids; got dtype {ids.dtype}.")
      check_token_range(ids, self.vocab_size, name)
      if not 0 <= seeds[i] < 2**31:
        raise ValueError(f"seed must be in [0, 2**31); got {seeds[i]}.")
      rows.append(ids)
    bucket = self.bucket_for(max(r.size for r in rows))
    size = next(k for k in self.prefill_sizes if k >= n)
    tokens = np.zeros((size, bucket), np.int32)
    lengths = np.ones(size, np.int32)  # padding rows: one token, greedy
    for i, ids in enumerate(rows):
      tokens[i, : ids.size], lengths[i] = ids, ids.size
    pad = [Sampling(temperature=0.0)] * (size - n)
    seed_arr = np.array(seeds + [0] * (size - n), np.int32)
    state, logp = self._prefill_jit(
        self.params, tokens, lengths, RowSampling.of(samplings + pad), seed_arr
    )
    toks, logp = np.asarray(state["tok"]), np.asarray(logp)  # one host sync per call
    return [
        Prefix(state, int(lengths[i]), bucket, int(toks[i]), float(logp[i]), row=i)
        for i in range(n)
    ]

  def insert(self, prefix: Prefix, slot: int):
    """Copies the prefix into row `slot` of the decode state (the slot must be free)."""
    self.insert_many([(prefix, slot)])

  def insert_many(self, pairs: Sequence[tuple[Prefix, int]]):
    """Copies each `(prefix, slot)` into its (free, distinct) slot: one jitted call per prefill
    call the prefixes come from."""
    slots = [int(slot) for _, slot in pairs]
    for prefix, slot in zip((p for p, _ in pairs), slots):
      if not 0 <= slot < self.num_slots:
        raise ValueError(f"slot must be in [0, {self.num_slots}); got {slot}.")
      if self._active[slot]:
        raise ValueError(f"slot {slot} is busy; free it first.")
      if prefix.length >= self.max_len:
        raise ValueError(
            f"prompt length {prefix.length} leaves no room in max_len {self.max_len} to decode."
        )
    if len(set(slots)) != len(slots):
      raise ValueError(f"insert_many: each slot at most once; got slots {slots}.")
    groups: dict[int, list[tuple[Prefix, int]]] = {}
    for prefix, slot in zip((p for p, _ in pairs), slots):
      groups.setdefault(id(prefix.state), []).append((prefix, slot))
    for group in groups.values():
      rows = np.zeros(self.num_slots, np.int32)
      where = np.zeros(self.num_slots, np.int32)
      for i, (prefix, slot) in enumerate(group):
        rows[i], where[i] = prefix.row, slot
      self.state = self._insert_jit(
          self.state, group[0][0].state, rows, where, np.int32(len(group))
      )
      for prefix, slot in group:
        self._pos[slot], self._active[slot] = prefix.length, True

  def generate(self) -> StepOutput:
    """One jitted decode step for all slots: feeds each slot's pending token and samples the
    next; outputs `[S]`."""
    out = self.generate_steps(1)
    return StepOutput(out.tokens[0], out.logprobs[0], out.active)

  def generate_steps(self, num_steps: int, capacity: int | None = None) -> StepOutput:
    """`num_steps` decode steps in one jitted call (no host round trip between them); outputs
    `[num_steps, S]`. capacity: the compiled call's most steps (default the smallest power of
    two >= num_steps); each distinct capacity compiles once, any num_steps <= it reuses it."""
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
    capacity = int(capacity or 1 << (int(num_steps) - 1).bit_length())
    if capacity < num_steps:
      raise ValueError(f"capacity ({capacity}) must be >= num_steps ({num_steps}).")
    full = self._active & (self._pos + num_steps > self.max_len)
    if full.any():
      slot = int(np.flatnonzero(full)[0])
      raise ValueError(
          f"slot {slot} is at position {int(self._pos[slot])}: {num_steps} more step(s) would "
          f"write past the KV cache (max_len {self.max_len}); free the slot or raise max_len."
      )
    self.state, tok, logp = self._block_jit(self.params, self.state, np.int32(num_steps), capacity)
    self._pos += self._active * num_steps
    tok, logp = np.asarray(tok), np.asarray(logp)  # one host sync per call
    return StepOutput(tok[:num_steps], logp[:num_steps], self._active.copy())

  def free(self, slot: int):
    """Marks the slot free (its row is overwritten by the next `insert`)."""
    if not 0 <= slot < self.num_slots:
      raise ValueError(f"slot must be in [0, {self.num_slots}); got {slot}.")
    self._active[slot] = False

  def warmup(self, step_blocks: Sequence[int] = (1,), prefill_sizes: Sequence[int] | None = None):
    """Compiles the prefill and insert of every bucket and prefill batch size (default all of
    `prefill_sizes`) and the step (each `generate_steps` capacity in `step_blocks`); leaves every
    slot free. Call it before inserting requests."""
    if self._active.any():
      raise ValueError("warmup() resets the decode state; call it before inserting requests.")
    for k in prefill_sizes or self.prefill_sizes:
      for b in self.buckets:
        self.insert(self.prefill_batch([[0] * b] * k)[0], 0)
        self.free(0)
    self.insert(self.prefill([0]), 0)
    for k in step_blocks:
      self.generate_steps(k, k)
    self.reset()

  # ----- jitted functions -----

  def _counted(self, fn):
    def traced(*args):
      self.compile_count += 1  # runs only while jax traces (a cache miss)
      return fn(*args)

    return traced

  def _init_state(self, params, batch: int):
    v = self.vocab_size
    return {
        "model": self.sm.init(params, batch, None),
        "tok": jnp.zeros((batch,), jnp.int32),  # sampled, fed at `pos` by the next step
        "pos": jnp.zeros((batch,), jnp.int32),
        "rng": jnp.zeros((batch, 2), jnp.uint32),
        "seen": jnp.zeros((batch, v), bool),
        "sampling": RowSampling(
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
            jnp.ones((batch,), jnp.float32),
            jnp.ones((batch,), jnp.float32),
        ),
    }

  def _batch_axes(self):
    """The batch axis of every decode-state leaf (found by comparing batch 1 and 2 shapes)."""
    one = jax.eval_shape(lambda p: self._init_state(p, 1), self.params)
    two = jax.eval_shape(lambda p: self._init_state(p, 2), self.params)

    def axis(path, a, b):
      diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
      if len(diff) != 1:
        raise ValueError(
            f"decode-state leaf {jax.tree_util.keystr(path)} {a.shape} has no single batch "
            "axis; the Engine needs per-row state (e.g. a [B] cache_index)."
        )
      return diff[0]

    return jax.tree_util.tree_map_with_path(axis, one, two)

  def _prefill_fn(self, params, tokens_KP, lengths_K, rows, seeds_K):
    k, p = tokens_KP.shape
    sm = self._prefill_sm(p)  # a cache of the bucket's length: insert copies it into the slot
    state = sm.init(params, k, None)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (k, p))
    logits, state = sm.apply(params, state, tokens_KP, positions, None, True)
    valid = jnp.arange(p)[None, :] < lengths_K[:, None]
    seen = jnp.any(jax.nn.one_hot(tokens_KP, self.vocab_size, dtype=bool) & valid[..., None], 1)
    rows = jax.tree.map(jnp.asarray, rows)
    last = jnp.take_along_axis(logits, (lengths_K - 1)[:, None, None], axis=1)[:, 0]  # [K, V]
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(seeds_K)  # generate's
    tok, logp = sample_rows(keys[:, 1], last, rows, seen)
    prefix = {
        "model": sm.rewind(state, lengths_K),  # next write at each row's true length
        "tok": tok,
        "pos": lengths_K.astype(jnp.int32),
        "rng": keys[:, 0],
        "seen": seen | jax.nn.one_hot(tok, self.vocab_size, dtype=bool),
        "sampling": rows,
    }
    return prefix, logp

  def _insert_fn(self, state, prefix, rows_S, slots_S, n):
    """Row `rows_S[i]` of the prefix into slot `slots_S[i]`, for i < n, of every leaf (a
    shorter KV cache fills the row's first positions; the rest is stale and invisible: each
    row sees only positions before its own)."""

    def one(i, state):
      def put(s, x, axis):
        row = lax.dynamic_index_in_dim(x, rows_S[i], axis, keepdims=True)
        start = [jnp.int32(0)] * s.ndim
        start[axis] = slots_S[i]
        return lax.dynamic_update_slice(s, row.astype(s.dtype), start)

      return jax.tree.map(put, state, prefix, self._axes)

    return lax.fori_loop(0, n, one, state)

  def _step_fn(self, params, state):
    pos = jnp.minimum(state["pos"], self.max_len - 1)  # free slots may run past: stay in range
    logits, model_state = self.sm.apply(
        params, state["model"], state["tok"][:, None], pos[:, None], None, False
    )
    rows = state["sampling"]

    def full(logits_SV, rng, seen):
      keys = jax.vmap(jax.random.split)(rng)  # [S, 2, 2]: (carry, draw) as generate
      tok, logp = sample_rows(keys[:, 1], logits_SV, rows, seen)
      return tok, logp, keys[:, 0], seen | jax.nn.one_hot(tok, self.vocab_size, dtype=bool)

    def plain_greedy(logits_SV, rng, seen):  # no row reads its key or seen set: skip them
      tok = jnp.argmax(logits_SV, -1).astype(jnp.int32)
      return tok, jnp.zeros(tok.shape, jnp.float32), rng, seen

    greedy = jnp.all(rows.temperature == 0) & jnp.all(rows.repetition_penalty == 1.0)
    tok, logp, rng, seen = lax.cond(
        greedy, plain_greedy, full, logits[:, 0], state["rng"], state["seen"]
    )
    new = {**state, "model": model_state, "tok": tok, "pos": state["pos"] + 1, "rng": rng}
    return {**new, "seen": seen}, tok, logp

  def _block_fn(self, params, state, num_steps, capacity: int):
    """`num_steps` (dynamic, <= capacity) steps -> (state, tokens / logprobs [capacity, S])."""

    def body(i, carry):
      state, tok_CS, logp_CS = carry
      state, tok, logp = self._step_fn(params, state)
      return state, tok_CS.at[i].set(tok), logp_CS.at[i].set(logp)

    s = self.num_slots
    out = (jnp.zeros((capacity, s), jnp.int32), jnp.zeros((capacity, s), jnp.float32))
    return lax.fori_loop(0, num_steps, body, (state, *out))
