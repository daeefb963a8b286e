"""Host-side scheduler for the continuous-batching `Engine`: FIFO queue, futures, streaming.

    server = DecodeServer(Engine(model, params, num_slots=8, max_len=256))
    with server:                                           # starts the engine thread (+ warmup)
      fut = server.submit(prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1,
                          stop_tokens=(eos,), on_token=lambda tok, logp: print(tok))
      done = fut.result()            # Completion(tokens, logprobs, finish_reason, prompt_tokens)

    # asyncio (an HTTP handler): completion = await asyncio.wrap_future(server.submit(...))
    # synchronous (tests, benchmarks): futs = [server.submit(...) ...]; server.run_until_idle()

Every iteration (Orca's iteration-level scheduling): queued requests fill the free slots in
arrival order (`Engine.prefill`, which samples the first token, + `insert`; a request that ends
at its first token never takes a slot), then one engine call advances every active slot: k
decode steps in one jitted call (`Engine.generate_steps`), k the largest power of two <=
`max_steps_per_call` that no active request's remaining `max_new_tokens` is below, so no slot
idles past its length. A request leaves at its first stop token (`finish_reason="stop"`, the
stop token included; tokens its slot sampled after it in the same call are dropped) or after
`max_new_tokens` (`"length"`), and its slot takes the next request at the next iteration.
`max_steps_per_call=1` gives one step per call (tokens stream one by one; a new request waits
at most one step for a free slot).

Threading: all JAX work runs on one thread -- the engine thread of `start()`, or the caller's in
`run_until_idle()` (not both). `submit` may be called from any thread; it validates the request
at once (ValueError naming the field) and returns a `concurrent.futures.Future[Completion]`.
`on_token(token_id, logprob)` is called on the engine thread, in order, before the future
resolves; if it raises, that request fails with the exception and the others go on. `cancel`
drops a queued request or ends a running one (`finish_reason="cancelled"`). `stop()` (also
`close()` and leaving the `with` block) ends the thread and fails every unfinished future with
`ServerStopped`; `stop(drain=True)` first finishes what was submitted. If the engine itself
fails, every unfinished future gets that exception and later submits raise RuntimeError.
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

  def __init__(self, engine: Engine, *, max_steps_per_call: int = 8):
    """max_steps_per_call: the most decode steps one engine call may run (powers of two up to
    it are compiled by `warmup`); 1 streams every token as soon as it is sampled."""
    if max_steps_per_call < 1:
      raise ValueError(f"max_steps_per_call must be >= 1; got {max_steps_per_call}.")
    self.engine = engine
    self.block_sizes = tuple(2**i for i in range(int(max_steps_per_call).bit_length()))
    self._queue: collections.deque[_Request] = collections.deque()
    self._slots: dict[int, _Request] = {}
    self._lock = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._drain = False
    self._closed = False
    self._error: BaseException | None = None
    self.stats = {"steps": 0, "calls": 0, "prefills": 0, "tokens": 0, "completed": 0}

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
    """Drops a queued request, or ends a running one at the next step (finish "cancelled")."""
    if future.cancel():
      return True
    with self._lock:
      for request in self._slots.values():
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

  def _admit(self):
    """Prefills queued requests into the free slots, in arrival order. The prefill samples a
    request's first token; a request that ends there never takes a slot."""
    free = self.engine.free_slots()
    while free:
      with self._lock:
        request = self._queue.popleft() if self._queue else None
      if request is None:
        return
      if not request.future.set_running_or_notify_cancel():
        continue  # cancelled while queued
      s = request.sampling
      try:
        prefix = self.engine.prefill(
            request.prompt,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            seed=request.seed,
        )
      except Exception as e:  # validated at submit; should it still fail, only this request does
        request.future.set_exception(e)
        continue
      self.stats["prefills"] += 1
      slot = free[0]
      with self._lock:
        self._slots[slot] = request
      if not self._emit(slot, request, prefix.token, prefix.logprob):
        self.engine.insert(prefix, slot)
        free.pop(0)

  def _finish(self, slot: int, reason: str | None = None, error: BaseException | None = None):
    self.engine.free(slot)
    with self._lock:
      request = self._slots.pop(slot)
    if error is not None:
      request.future.set_exception(error)
      return
    self.stats["completed"] += 1
    request.future.set_result(
        Completion(request.tokens, request.logprobs, reason, int(request.prompt.size))
    )

  def warmup(self):
    """Compiles every prefill bucket and each engine call size this server uses."""
    self.engine.warmup(self.block_sizes)

  def _num_steps(self) -> int:
    """The largest compiled block no active request outruns (its `max_new_tokens`)."""
    room = min(r.max_new_tokens - len(r.tokens) for r in self._slots.values())
    return max(k for k in self.block_sizes if k <= room)

  def step(self) -> bool:
    """One scheduler iteration: admit into free slots, then one engine call of up to
    `max_steps_per_call` steps (never past any request's length; a request that meets a stop
    token mid-call ends there and the rest of its tokens are dropped). False when idle."""
    self._admit()
    for slot, request in list(self._slots.items()):
      if request.cancelled:
        self._finish(slot, "cancelled")
    if not self._slots:
      return False
    k = self._num_steps()
    out = self.engine.generate_steps(k)
    self.stats["steps"] += k
    self.stats["calls"] += 1
    for slot, request in list(self._slots.items()):
      for i in range(k):
        if self._emit(slot, request, int(out.tokens[i, slot]), float(out.logprobs[i, slot])):
          break
    return True

  def _emit(self, slot: int, request: _Request, token: int, logprob: float) -> bool:
    """Records one token of a running request; True when the request has ended."""
    request.tokens.append(token)
    request.logprobs.append(logprob)
    self.stats["tokens"] += 1
    if request.on_token is not None:
      try:
        request.on_token(token, logprob)
      except Exception as e:  # the callback's failure ends its own request only
        self._finish(slot, error=e)
        return True
    if token in request.stop_tokens:
      self._finish(slot, "stop")
      return True
    if len(request.tokens) >= request.max_new_tokens:
      self._finish(slot, "length")
      return True
    return False

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
          while not (self._queue or self._slots or self._stopping):
            self._lock.wait()
          if self._stopping and not (self._drain and (self._queue or self._slots)):
            return
        self.step()
    except BaseException as e:  # fail everything in flight; later submits raise
      with self._lock:
        self._error = e
      self._fail_all(e)

  def _fail_all(self, error: BaseException):
    with self._lock:
      pending = list(self._queue) + list(self._slots.values())
      self._queue.clear()
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
