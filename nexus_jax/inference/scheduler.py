"""Host-side scheduler for the continuous-batching `Engine`: FIFO queue, futures, streaming.

    server = DecodeServer(Engine(model, params, num_slots=8, max_len=256))
    with server:                                           # starts the engine thread (+ warmup)
      fut = server.submit(prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1,
                          stop_tokens=(eos,), on_token=lambda tok, logp: print(tok))
      done = fut.result()            # Completion(tokens, logprobs, finish_reason, prompt_tokens)

    # asyncio (an HTTP handler): completion = await asyncio.wrap_future(server.submit(...))
    # synchronous (tests, benchmarks): futs = [server.submit(...) ...]; server.run_until_idle()

Every iteration (Orca's iteration-level scheduling): free slots take prefilled requests in
arrival order (one `Engine.insert_many` call); when a free slot finds none prefilled, the next
queued requests, up to `prefill_batch` of them (default the engine's `max_prefill_batch`), are
prefilled in one `Engine.prefill_batch` call, which samples each one's first token (a request
that ends there never takes a slot); those that find no free slot wait, prefilled, for the next
(JetStream's prefill queue: a batched prefill reads the weights once for all its prompts). Then
one engine call advances every active slot by k decode steps (`Engine.generate_steps`, one
compiled call for any k <= `max_steps_per_call`), k = the fewest tokens any active request
still needs (at most `max_steps_per_call`), so no slot idles past its length. A request leaves
at its first stop token (`finish_reason="stop"`, the stop token included; tokens its slot
sampled after it in the same call are dropped) or after `max_new_tokens` (`"length"`), and its
slot takes the next request at the next iteration. `max_steps_per_call=1` gives one step per
call (tokens stream one by one; a new request waits at most one step for a free slot);
`prefill_batch=1` prefills a request only when a slot is free for it.

Threading: all JAX work runs on one thread -- the engine thread of `start()`, or the caller's in
`run_until_idle()` (not both). `submit` may be called from any thread; it validates the request
at once (ValueError naming the field) and returns a `concurrent.futures.Future[Completion]`.
`on_token(token_id, logprob)` is called on the engine thread, in order, before the future
resolves; if it raises, that request fails with the exception and the others go on. `cancel`
drops a queued request or ends a prefilled or running one (`finish_reason="cancelled"`).
`stop()` (also `close()` and leaving the `with` block) ends the thread and fails every
unfinished future with `ServerStopped`; `stop(drain=True)` first finishes what was submitted.
If the engine itself fails, every unfinished future gets that exception and later submits
raise RuntimeError.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
from typing import Callable, Sequence

import numpy as np

from nexus_jax.inference.engine import Engine
from nexus_jax.inference.generate import Sampling
from nexus_jax.models.transformer import check_token_range


class ServerStopped(RuntimeError):
  """The DecodeServer stopped before the request finished."""


@dataclasses.dataclass(frozen=True)
class Completion:
  tokens: list[int]  # generated ids, the stop token included
  logprobs: list[float]  # log-probability of each token under the processed distribution
  finish_reason: str  # "stop" | "length" | "cancelled"
  prompt_tokens: int


@dataclasses.dataclass(eq=False)
class _Request:
  prompt: np.ndarray
  max_new_tokens: int
  sampling: Sampling
  seed: int
  stop_tokens: frozenset
  on_token: Callable[[int, float], None] | None
  future: concurrent.futures.Future
  tokens: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  cancelled: bool = False


def _int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int; got {value!r}.")
  return int(value)


def _float(value, name: str) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number; got {value!r}.") from None
  if not math.isfinite(out):
    raise ValueError(f"{name} must be finite; got {value!r}.")
  return out


class DecodeServer:
  """FIFO request queue over an `Engine`; see the module docstring."""

  def __init__(
      self, engine: Engine, *, max_steps_per_call: int = 8, prefill_batch: int | None = None
  ):
    """max_steps_per_call: the most decode steps one engine call may run (1 streams every token
    as soon as it is sampled); prefill_batch: the most queued requests one prefill call takes
    (default and at most `engine.max_prefill_batch`; 1: prefill only for a free slot)."""
    if max_steps_per_call < 1:
      raise ValueError(f"max_steps_per_call must be >= 1; got {max_steps_per_call}.")
    prefill_batch = int(prefill_batch or engine.max_prefill_batch)
    if not 1 <= prefill_batch <= engine.max_prefill_batch:
      raise ValueError(
          f"prefill_batch must be in [1, engine.max_prefill_batch={engine.max_prefill_batch}]; "
          f"got {prefill_batch}."
      )
    self.engine = engine
    self.max_steps_per_call = int(max_steps_per_call)
    self.capacity = 1 << (self.max_steps_per_call - 1).bit_length()  # the compiled call's steps
    self.prefill_batch = prefill_batch
    self._queue: collections.deque[_Request] = collections.deque()
    self._ready: collections.deque[tuple[_Request, object]] = collections.deque()  # prefilled
    self._slots: dict[int, _Request] = {}
    self._lock = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._drain = False
    self._closed = False
    self._error: BaseException | None = None
    self.stats = {
        "steps": 0,
        "calls": 0,
        "prefills": 0,
        "prefill_calls": 0,
        "tokens": 0,
        "completed": 0,
    }

  # ----- client side (any thread) -----

  def submit(
      self,
      prompt_ids: Sequence[int],
      *,
      max_new_tokens: int,
      temperature: float = 0.0,
      top_k: int = 0,
      top_p: float = 1.0,
      repetition_penalty: float = 1.0,
      stop_tokens: Sequence[int] = (),
      seed: int = 0,
      on_token: Callable[[int, float], None] | None = None,
  ) -> concurrent.futures.Future:
    """Queues one request; returns a `Future[Completion]`. Raises ValueError for a bad request."""
    request = self._validate(
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        stop_tokens,
        seed,
        on_token,
    )
    with self._lock:
      if self._closed:
        raise RuntimeError("DecodeServer is stopped; create a new one to submit requests.")
      if self._error is not None:
        raise RuntimeError(f"DecodeServer's engine failed: {self._error!r}") from self._error
      self._queue.append(request)
      self._lock.notify_all()
    return request.future

  def cancel(self, future: concurrent.futures.Future) -> bool:
    """Drops a queued request, or ends a prefilled or running one at the next iteration (finish
    "cancelled")."""
    if future.cancel():
      return True
    with self._lock:
      for request in [*self._slots.values(), *(r for r, _ in self._ready)]:
        if request.future is future:
          request.cancelled = True
          return True
    return False

  def _validate(
      self, prompt, max_new, temperature, top_k, top_p, penalty, stops, seed, on_token
  ) -> _Request:
    engine = self.engine
    try:
      ids = np.asarray(prompt)
    except Exception:
      raise ValueError("prompt_ids must be a sequence of int token ids.") from None
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(
          f"prompt_ids must be a non-empty 1-D sequence of token ids; got shape {ids.shape}."
      )
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt_ids must hold int token ids; got dtype {ids.dtype}.")
    check_token_range(ids, engine.vocab_size, "prompt_ids")
    max_new = _int(max_new, "max_new_tokens")
    engine.check_request(ids.size, max_new)
    temperature, top_p = _float(temperature, "temperature"), _float(top_p, "top_p")
    penalty = _float(penalty, "repetition_penalty")
    sampling = Sampling(temperature, _int(top_k, "top_k"), top_p, penalty)  # names the field
    stops = frozenset(_int(s, "stop_tokens") for s in stops)
    check_token_range(np.array(sorted(stops), np.int64), engine.vocab_size, "stop_tokens")
    seed = _int(seed, "seed")
    if not 0 <= seed < 2**31:
      raise ValueError(f"seed must be in [0, 2**31); got {seed}.")
    if on_token is not None and not callable(on_token):
      raise ValueError(f"on_token must be callable(token_id, logprob); got {on_token!r}.")
    return _Request(
        ids.astype(np.int32),
        max_new,
        sampling,
        seed,
        stops,
        on_token,
        concurrent.futures.Future(),
    )

  # ----- engine side (one thread) -----

  def _prefill(self, want: int):
    """Prefills up to `want` queued requests (arrival order) in one engine call; each records
    its first token, and those it does not end wait in `_ready` for a slot."""
    batch = []
    while len(batch) < want:
      with self._lock:
        request = self._queue.popleft() if self._queue else None
      if request is None:
        break
      if request.future.set_running_or_notify_cancel():  # else: cancelled while queued
        batch.append(request)
    if not batch:
      return
    try:
      prefixes = self.engine.prefill_batch(
          [r.prompt for r in batch], [r.sampling for r in batch], [r.seed for r in batch]
      )
    except Exception as e:  # validated at submit; should it still fail, only these requests do
      for request in batch:
        request.future.set_exception(e)
      return
    self.stats["prefills"] += len(batch)
    self.stats["prefill_calls"] += 1
    for request, prefix in zip(batch, prefixes):
      ended = self._record(request, prefix.token, prefix.logprob)
      if ended is None:
        with self._lock:
          self._ready.append((request, prefix))
      else:
        self._resolve(request, *ended)

  def _admit(self):
    """Fills the free slots with prefilled requests in arrival order (prefilling the next
    queued ones when none is ready), in one insert call per prefill call."""
    free = self.engine.free_slots()
    pairs = []
    while free:
      if not self._ready:
        self._prefill(min(max(self.prefill_batch, len(free)), self.engine.max_prefill_batch))
        if not self._ready:
          if self._queue:
            continue  # every prefilled request ended at its first token: prefill more
          break
      with self._lock:
        request, prefix = self._ready.popleft()
        if not request.cancelled:
          self._slots[free[0]] = request
      if request.cancelled:
        self._resolve(request, "cancelled")
        continue
      pairs.append((prefix, free.pop(0)))
    if pairs:
      self.engine.insert_many(pairs)

  def _resolve(self, request: _Request, reason: str, error: BaseException | None = None):
    """Sets the future of a request that holds no slot (any more)."""
    if error is not None:
      request.future.set_exception(error)
      return
    self.stats["completed"] += 1
    request.future.set_result(
        Completion(request.tokens, request.logprobs, reason, int(request.prompt.size))
    )

  def _finish(self, slot: int, reason: str, error: BaseException | None = None):
    self.engine.free(slot)
    with self._lock:
      request = self._slots.pop(slot)
    self._resolve(request, reason, error)

  def warmup(self):
    """Compiles every prefill bucket and batch size and the engine call this server uses."""
    self.engine.warmup((self.capacity,))

  def _num_steps(self) -> int:
    """The fewest tokens an active request still needs (its `max_new_tokens`), capped."""
    room = min(r.max_new_tokens - len(r.tokens) for r in self._slots.values())
    return max(1, min(room, self.max_steps_per_call))

  def step(self) -> bool:
    """One scheduler iteration: admit into free slots, then one engine call of up to
    `max_steps_per_call` steps (never past any request's length; a request that meets a stop
    token mid-call ends there and the rest of its tokens are dropped). False when idle."""
    self._admit()
    for slot, request in list(self._slots.items()):
      if request.cancelled:
        self._finish(slot, "cancelled")
    with self._lock:
      dropped = [r for r, _ in self._ready if r.cancelled]
      if dropped:
        self._ready = collections.deque((r, p) for r, p in self._ready if not r.cancelled)
    for request in dropped:
      self._resolve(request, "cancelled")
    if not self._slots:
      return bool(self._queue or self._ready)
    k = self._num_steps()
    out = self.engine.generate_steps(k, self.capacity)
    self.stats["steps"] += k
    self.stats["calls"] += 1
    tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
    for slot, request in list(self._slots.items()):
      for i in range(k):
        ended = self._record(request, tokens[i][slot], logprobs[i][slot])
        if ended is not None:
          self._finish(slot, *ended)
          break
    return True

  def _record(self, request: _Request, token: int, logprob: float):
    """Records one token of a request; returns `(finish_reason, error)` when it has ended."""
    request.tokens.append(token)
    request.logprobs.append(logprob)
    self.stats["tokens"] += 1
    if request.on_token is not None:
      try:
        request.on_token(token, logprob)
      except Exception as e:  # the callback's failure ends its own request only
        return "error", e
    if token in request.stop_tokens:
      return "stop", None
    if len(request.tokens) >= request.max_new_tokens:
      return "length", None
    return None

  def run_until_idle(self):
    """Runs iterations on the calling thread until the queue and every slot are empty."""
    if self._thread is not None:
      raise RuntimeError("run_until_idle() is for a DecodeServer without a running thread.")
    try:
      while self.step():
        pass
    except BaseException as e:
      self._fail_all(e)
      raise

  def start(self, *, warmup: bool = True) -> "DecodeServer":
    """Starts the engine thread (it first compiles everything when `warmup`)."""
    with self._lock:
      if self._closed:
        raise RuntimeError("DecodeServer is stopped; create a new one.")
      if self._thread is not None:
        return self
      self._thread = threading.Thread(
          target=self._loop, args=(warmup,), name="nexus-decode-engine", daemon=True
      )
    self._thread.start()
    return self

  def _loop(self, warmup: bool):
    try:
      if warmup:
        self.warmup()
      while True:
        with self._lock:
          while not (self._queue or self._ready or self._slots or self._stopping):
            self._lock.wait()
          busy = self._queue or self._ready or self._slots
          if self._stopping and not (self._drain and busy):
            return
        self.step()
    except BaseException as e:  # fail everything in flight; later submits raise
      with self._lock:
        self._error = e
      self._fail_all(e)

  def _fail_all(self, error: BaseException):
    with self._lock:
      pending = [*self._queue, *(r for r, _ in self._ready), *self._slots.values()]
      self._queue.clear()
      self._ready.clear()
      self._slots.clear()
    for request in pending:
      future = request.future
      if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(error)
    for slot in self.engine.active_slots():
      self.engine.free(slot)

  def stop(self, *, drain: bool = False, timeout: float | None = None):
    """Stops the engine thread; unfinished futures fail with `ServerStopped` (after finishing
    everything submitted when `drain`)."""
    with self._lock:
      self._closed = self._stopping = True
      self._drain = drain
      self._lock.notify_all()
      thread = self._thread
    if thread is not None:
      thread.join(timeout)
      if thread.is_alive():
        raise TimeoutError(f"the engine thread did not stop within {timeout} s.")
    self._fail_all(ServerStopped("DecodeServer stopped before the request finished."))

  close = stop

  def __enter__(self) -> "DecodeServer":
    return self.start()

  def __exit__(self, *exc):
    self.stop()
