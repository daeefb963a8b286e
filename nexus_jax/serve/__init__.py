"""HTTP serving of a saved language model or a NexusFlow artifact (FastAPI + uvicorn).

    python -m nexus_jax.serve --artifact runs/lm/model --host 127.0.0.1 --port 8000

`create_app` (serve.app) builds the app; `ServeOptions` holds its limits. Needs the serve extra.
"""

from nexus_jax.serve.app import create_app
from nexus_jax.serve.backends import ServeOptions

__all__ = ["ServeOptions", "create_app"]
