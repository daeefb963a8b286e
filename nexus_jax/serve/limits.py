"""An ASGI middleware that refuses request bodies over a byte limit with 413, before they are read.

    app.add_middleware(BodySizeLimit, max_bytes=1_000_000)

A `Content-Length` over the limit is refused at once; a body sent without one (chunked) is counted
as it arrives and refused when it passes the limit. The 413 body is `{"detail": ...}`.
"""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
  """Raised inside `receive` when a chunked body passes the limit."""


class BodySizeLimit:
  """Pure ASGI middleware (no buffering; responses stream through untouched)."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, int(max_bytes)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
      return await self._refuse(send)
    seen = 0
    started = False

    async def counted_receive():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > self.max_bytes:
          raise BodyTooLarge
      return message

    async def tracked_send(message):
      nonlocal started
      if message["type"] == "http.response.start":
        started = True
      await send(message)

    try:
      await self.app(scope, counted_receive, tracked_send)
    except BodyTooLarge:
      if not started:
        await self._refuse(send)

  async def _refuse(self, send):
    body = json.dumps(
        {"detail": f"request body larger than the server's limit of {self.max_bytes} bytes"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
