"""POST /v1/generate for a saved language model: validated requests, JSON or server-sent events.

Request (every field but `prompt` optional; unknown fields are refused):
  prompt            text (1..room//4 characters) or token ids (1..room ids in [0, vocab)), where
                    room = context_length - max_new_tokens_limit: whatever the schema admits fits
                    the KV cache (a character is at most 4 UTF-8 bytes; no tokenizer makes more
                    tokens than bytes)
  max_new_tokens    1..max_new_tokens_limit (default min(16, limit))
  temperature       >= 0 (0 = greedy: exactly `inference.generate`'s tokens), top_k >= 0 (0 off),
  top_p             in (0, 1], seed in [0, 2^31), stop: up to max_stop strings matched on the
                    decoded text, stop_token_ids: up to max_stop ids the engine stops on
  logprobs          return each chosen token's log-probability (under the processed distribution)
  stream            server-sent events instead of one JSON body

Response: {"id", "model", "text", "tokens", "finish_reason": "stop" | "length",
"usage": {"prompt_tokens", "completion_tokens"}, "logprobs": [float] | null}. Streamed: one
`data: {"token", "text", "logprob"?}` per token (text is the token's UTF-8, decoded incrementally),
then `data: {"id", "finish_reason", "usage"}` and `data: [DONE]`; an error mid-stream is
`data: {"error": ...}`.
"""

import asyncio
import codecs
import concurrent.futures
import json
import threading
import uuid
from typing import Annotated, List, Literal, Optional, Union

from nexus_jax.serve.backends import GenerateJob, LMBackend, ServeOptions
from nexus_jax.serve.http import ERRORS, await_future, documented, error_response, refuse_non_numbers
from nexus_jax.serve.http import one_line
from nexus_jax.serve.http import refuse_unless_ready
from nexus_jax.serve.stop_strings import StopStrings

_USAGE = {
    "type": "object",
    "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}},
    "required": ["prompt_tokens", "completion_tokens"],
}
# The JSON in the `data:` of one streamed event: a token, the final summary, or an error.
SSE_DATA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "token": {"type": "integer"},
                "text": {"type": "string"},
                "logprob": {"type": "number"},
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "finish_reason": {"enum": ["stop", "length"]},
                "usage": _USAGE,
            },
            "required": ["id", "finish_reason", "usage"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"error": {"type": "string"}},
            "required": ["error"],
            "additionalProperties": False,
        },
    ]
}
# One server-sent event (OpenAPI 3.2's item schema for text/event-stream): `data` is JSON
# (SSE_DATA), or "[DONE]" at the end.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {
            "anyOf": [
                {"type": "string", "enum": ["[DONE]"]},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": SSE_DATA,
                },
            ]
        },
        "event": {"type": "string", "enum": ["message"]},
    },
    "required": ["data"],
}


class Collected:
  """Tokens and log-probs as the engine thread streams them (for requests ended by a stop string)."""

  def __init__(self):
    self.tokens: list[int] = []
    self.logprobs: list[float] = []
    self.future: concurrent.futures.Future | None = None
    self.lock = threading.Lock()


def request_models(backend: LMBackend, options: ServeOptions):
  """(GenerateRequest, GenerateResponse) pydantic models carrying this model's limits."""
  from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool  # noqa: PLC0415
  from pydantic import StringConstraints  # noqa: PLC0415

  number = BeforeValidator(refuse_non_numbers)  # after Field: its bounds stay in the schema

  vocab, limit = backend.vocab_size, options.max_new_tokens_limit
  room = backend.max_prompt_tokens
  if room < 1:
    raise ValueError(
        f"max_new_tokens_limit={limit} leaves no room for a prompt in a KV cache of "
        f"{backend.cache_len} tokens; lower it or raise cache_len"
    )
  TokenId = Annotated[int, Field(ge=0, lt=vocab), number]
  Text = Annotated[str, StringConstraints(min_length=1, max_length=max(room // 4, 1))]
  Ids = Annotated[List[TokenId], Field(min_length=1, max_length=room)]
  Stop = Annotated[str, StringConstraints(min_length=1, max_length=64)]

  class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # JSON types exactly: "16" is not 16, 0 not false
    prompt: Union[Text, Ids] = Field(description="text, or token ids of the model's tokenizer")
    max_new_tokens: Annotated[int, Field(ge=1, le=limit), number] = min(16, limit)
    temperature: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False), number] = 0.0
    top_k: Annotated[int, Field(ge=0, le=vocab), number] = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False), number] = 1.0
    stop: List[Stop] = Field([], max_length=options.max_stop)
    stop_token_ids: List[TokenId] = Field([], max_length=options.max_stop)
    seed: Annotated[int, Field(ge=0, le=2**31 - 1), number] = 0
    logprobs: StrictBool = False
    stream: StrictBool = False

  class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int

  class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    tokens: List[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage
    logprobs: Optional[List[float]] = None

  return GenerateRequest, GenerateResponse


def add_generate_route(app, backend: LMBackend, options: ServeOptions) -> None:
  from fastapi.responses import JSONResponse, StreamingResponse  # noqa: PLC0415

  GenerateRequest, GenerateResponse = request_models(backend, options)

  def start(body, on_token=None):
    """(prompt ids, Future[Completion], Collected, StopStrings) of an accepted request."""
    ids = backend.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
    stops, seen = StopStrings(body.stop, backend.token_bytes), Collected()

    def watch(token, logprob):  # engine thread
      with seen.lock:
        seen.tokens.append(int(token))
        seen.logprobs.append(float(logprob))
        hit = stops.feed(token)
        future = seen.future
      if on_token is not None:
        on_token(int(token), float(logprob))
      if hit and future is not None:
        backend.cancel(future)

    job = GenerateJob(
        prompt_ids=tuple(ids),
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        stop_tokens=tuple(body.stop_token_ids),
        seed=body.seed,
        on_token=watch,
    )
    future = backend.generate(job)
    with seen.lock:
      seen.future = future
      if stops.hit:
        backend.cancel(future)
    return ids, future, seen, stops

  def outcome(future, seen: Collected, stops: StopStrings):
    """(tokens, logprobs, finish_reason) of a finished or stop-string-cancelled request."""
    if future.cancelled() or future.result().finish_reason == "cancelled":
      tokens, logprobs, reason = seen.tokens, seen.logprobs, "stop"
    else:
      done = future.result()
      tokens, logprobs, reason = list(done.tokens), list(done.logprobs), done.finish_reason
    tokens, logprobs, hit = stops.cut(tokens, logprobs)
    return tokens, logprobs, "stop" if hit else reason

  @app.post(
      "/v1/generate",
      response_model=GenerateResponse,
      responses={
          **documented(400, 413, 503, 504),
          200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
      },
  )
  async def generate(body: GenerateRequest):
    if (refused := refuse_unless_ready(backend)) is not None:
      return refused
    rid = f"gen-{uuid.uuid4().hex[:16]}"
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
    try:
      started = start(body, on_token=(lambda t, lp: put((t, lp))) if body.stream else None)
    except ValueError as err:  # what the engine refuses beyond the schema (named field)
      return JSONResponse(
          status_code=422,
          content={"detail": [{"loc": ["body"], "msg": one_line(err), "type": "value_error"}]},
      )
    if body.stream:
      started[1].add_done_callback(lambda _: put(None))
      return StreamingResponse(_events(body, rid, queue, *started), media_type="text/event-stream")
    ids, future, seen, stops = started
    try:
      await await_future(future, options.request_timeout_s, backend.cancel)
    except asyncio.TimeoutError:
      return error_response(504)
    except concurrent.futures.CancelledError:
      if not stops.hit:
        return error_response(503, "the request was cancelled (the server is shutting down)")
    except RuntimeError as err:  # the engine stopped under the request
      return error_response(503, one_line(err))
    tokens, logprobs, reason = outcome(future, seen, stops)
    return {
        "id": rid,
        "model": backend.name,
        "text": backend.decode(tokens),
        "tokens": tokens,
        "finish_reason": reason,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens)},
        "logprobs": logprobs if body.logprobs else None,
    }

  async def _events(body, rid, queue, ids, future, seen, stops):
    """Server-sent events of one streamed request (tokens arrive on `queue`; None = done)."""
    loop = asyncio.get_running_loop()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    deadline = loop.time() + options.request_timeout_s
    watch = StopStrings(body.stop, backend.token_bytes)
    pending, sent, sent_bytes = [], 0, 0

    def flush(upto: int):
      """Events of the pending tokens whose bytes end at or before byte `upto`."""
      nonlocal sent, sent_bytes
      while pending and sent_bytes + len(backend.token_bytes(pending[0][0])) <= upto:
        token, logprob = pending.pop(0)
        piece = backend.token_bytes(token)
        sent, sent_bytes = sent + 1, sent_bytes + len(piece)
        event = {"token": token, "text": decoder.decode(piece)}
        if body.logprobs:
          event["logprob"] = logprob
        yield _sse(event)

    try:
      while True:
        try:
          item = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 1e-3))
        except asyncio.TimeoutError:
          backend.cancel(future)
          yield _sse({"error": ERRORS[504]})
          return
        if item is None:
          break
        pending.append(item)
        if watch.feed(item[0]):  # a stop string: send what precedes it, never the string
          for event in flush(watch.first_match()):
            yield event
          break
        safe = len(watch.text) - watch.held_bytes() if watch.stops else float("inf")
        for event in flush(safe):
          yield event
      if not watch.hit:
        for event in flush(float("inf")):
          yield event
      if not watch.hit and not future.cancelled() and future.exception() is not None:
        yield _sse({"error": one_line(future.exception())})
        return
      reason = "stop" if watch.hit else outcome(future, seen, stops)[2]
      if tail := decoder.decode(b"", final=True):
        yield _sse({"text": tail})
      usage = {"prompt_tokens": len(ids), "completion_tokens": sent}
      yield _sse({"id": rid, "finish_reason": reason, "usage": usage})
      yield "data: [DONE]\n\n"
    finally:
      if not future.done():  # the client went away, or a stop string ended it
        backend.cancel(future)


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"
