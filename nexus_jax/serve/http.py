"""What every route shares: error bodies, the not-ready refusal, awaiting an engine future.

Errors are `{"detail": one line}` (FastAPI's own 422 body lists the invalid fields). Futures come
from the engine / prediction threads and are awaited with `asyncio.wrap_future`, so no JAX work
ever runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable

ERRORS = {
    400: "a body that is not JSON, or (tabular) tables the model cannot use",
    413: "request body larger than the server's limit",
    503: "the model is still loading (or failed to load): see /readyz",
    504: "the request was not answered within the server's timeout; it was cancelled",
}


def refuse_non_numbers(value):
  """A pydantic BeforeValidator for `int` / `float` fields that keeps JSON Schema's meaning: 2.0
  is the integer 2, but "2" and true are refused (pydantic's lax mode would coerce them, its
  strict mode would refuse 2.0). Use as `Annotated[int, NUMBER, Field(...)]`."""
  if isinstance(value, (str, bytes, bool)):
    raise ValueError(f"must be a JSON number, not {type(value).__name__}")
  return value


def one_line(text: Any) -> str:
  return " ".join(str(text).split())


def error_response(code: int, detail: str | None = None, headers: dict | None = None):
  from fastapi.responses import JSONResponse  # noqa: PLC0415

  return JSONResponse(
      status_code=code, content={"detail": one_line(detail or ERRORS[code])}, headers=headers
  )


def refuse_unless_ready(backend):
  """A 503 response while the backend is not ready, else None."""
  if backend.state == "ready":
    return None
  detail = f"model {backend.state}" + (f": {backend.error}" if backend.error else "")
  return error_response(503, detail, headers={"Retry-After": "1"})


def documented(*codes: int) -> dict:
  """OpenAPI `responses` entries for error codes (body `{"detail": str}`)."""
  schema = {
      "type": "object",
      "properties": {"detail": {"type": "string"}},
      "required": ["detail"],
  }
  return {
      code: {"description": ERRORS[code], "content": {"application/json": {"schema": schema}}}
      for code in codes
  }


async def await_future(
    future: concurrent.futures.Future,
    timeout_s: float,
    cancel: Callable[[concurrent.futures.Future], None],
):
  """The future's result; on timeout cancels it (`cancel`) and raises asyncio.TimeoutError.

  A future cancelled by someone else (e.g. a stop string) raises concurrent.futures.CancelledError.
  """
  try:
    return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
  except asyncio.TimeoutError:
    cancel(future)
    raise
  except asyncio.CancelledError:
    if future.cancelled():
      raise concurrent.futures.CancelledError from None
    cancel(future)  # the request itself was cancelled (client gone, shutdown)
    raise
