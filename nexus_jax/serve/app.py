"""The HTTP server: `create_app(artifact_dir)` serves a saved LM or a NexusFlow tabular artifact.

    app = create_app("runs/lm/model", ServeOptions(num_slots=8))
    uvicorn.run(app, host="127.0.0.1", port=8000)   # or: python -m nexus_jax.serve --artifact DIR

The lifespan starts loading on a background thread and returns at once, so the server answers
/healthz while the model loads and warms (every prefill bucket and the decode step compile before
/readyz says ready). On shutdown (SIGTERM, Ctrl-C) it stops the engine; pending requests fail.

Endpoints:
  GET  /healthz      {"status": "ok"}: the process answers; never touches the model.
  GET  /readyz       200 {"status": "ready"} once loaded and warm; 503 {"status": "loading" |
                     "failed" | "closed", "detail"} before (or when loading failed).
  GET  /v1/models    {"object": "list", "data": [{"id", "kind", "state", ...model facts}]}
  POST /v1/generate  a saved LM only: see `serve.generate_api`.
  POST /v1/predict   a tabular artifact only: see `serve.predict_api`.

Limits (`ServeOptions`): bodies over `max_body_bytes` get 413 before they are read, requests not
answered within `request_timeout_s` get 504 (and are cancelled), requests before warm-up ends get
503 with Retry-After. All model work runs off the event loop (the LM's engine thread, the tabular
model's one prediction thread), so /healthz stays fast under load.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from nexus_jax.serve.backends import LMBackend, ServeOptions, TabularBackend, open_backend
from nexus_jax.serve.limits import BodySizeLimit

INSTALL_HINT = "pip install 'nexus_jax[serve]' (FastAPI and uvicorn)"


def _require_fastapi():
  try:
    import fastapi  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ImportError(f"serving needs the serve extra: {INSTALL_HINT}; {err}") from None
  return fastapi


def create_app(artifact_dir: str, options: ServeOptions | None = None, *, start: bool = True):
  """The FastAPI app for `artifact_dir` (`start=False`: the caller starts `app.state.backend`)."""
  fastapi = _require_fastapi()
  from fastapi.responses import JSONResponse  # noqa: PLC0415
  from pydantic import BaseModel  # noqa: PLC0415 (comes with fastapi)

  from nexus_jax.serve.generate_api import add_generate_route  # noqa: PLC0415
  from nexus_jax.serve.predict_api import add_predict_route  # noqa: PLC0415

  options = options or ServeOptions()
  backend = open_backend(artifact_dir, options)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if start:
      backend.start()
    try:
      yield
    finally:
      backend.close()

  app = fastapi.FastAPI(
      title=f"nexus_jax: {backend.name} ({backend.kind})",
      description=__doc__.split("\n")[0],
      lifespan=lifespan,
  )
  app.state.backend = backend
  app.add_middleware(BodySizeLimit, max_bytes=options.max_body_bytes)

  class Status(BaseModel):
    status: str
    detail: Optional[str] = None

  class ModelList(BaseModel):
    object: str = "list"
    data: list[dict]

  @app.get("/healthz", response_model=Status)
  async def healthz():
    return {"status": "ok"}

  @app.get("/readyz", response_model=Status, responses={503: {"model": Status}})
  async def readyz():
    if backend.state == "ready":
      return {"status": "ready"}
    return JSONResponse(status_code=503, content={"status": backend.state, "detail": backend.error})

  @app.get("/v1/models", response_model=ModelList)
  async def models():
    return {"object": "list", "data": [backend.describe()]}

  if isinstance(backend, LMBackend):
    add_generate_route(app, backend, options)
  elif isinstance(backend, TabularBackend):
    add_predict_route(app, backend, options)
  return app
