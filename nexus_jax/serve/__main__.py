"""`python -m nexus_jax.serve --artifact DIR [--host 127.0.0.1] [--port 8000] [limits]`.

Serves a saved LM (`nexus-lm` / `experiments.run` writes `workdir/model`) or a NexusFlow artifact
(`workdir/artifact`) under uvicorn. The port opens at once; /readyz turns 200 once warm. SIGTERM
or Ctrl-C shut it down cleanly (exit code 0). Bad flags or a folder that is neither kind: one line
on stderr, exit code 2.
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from nexus_jax.cli.common import Parser, run_main
from nexus_jax.serve.backends import ServeOptions, artifact_kind


def build_parser() -> Parser:
  defaults = ServeOptions()
  p = Parser(
      prog="python -m nexus_jax.serve",
      description="Serve a saved language model or a NexusFlow artifact over HTTP.",
      epilog="example:\n  python -m nexus_jax.serve --artifact runs/lm/model --port 8000",
  )
  p.add_argument("--artifact", required=True, help="a saved LM folder or a NexusFlow artifact")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--num-slots", type=int, default=defaults.num_slots, help="LM decode slots")
  p.add_argument("--max-new-tokens-limit", type=int, default=defaults.max_new_tokens_limit)
  p.add_argument("--cache-len", type=int, default=None, help="LM KV cache length per slot")
  p.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s)
  p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
  p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info"])
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()

  def run() -> int:
    args = parser.parse_args(argv)
    options = ServeOptions(
        num_slots=args.num_slots,
        max_new_tokens_limit=args.max_new_tokens_limit,
        cache_len=args.cache_len,
        request_timeout_s=args.request_timeout_s,
        max_body_bytes=args.max_body_bytes,
    )
    artifact_kind(args.artifact)  # refuses a wrong folder before uvicorn starts
    import uvicorn  # noqa: PLC0415

    from nexus_jax.serve.app import create_app  # noqa: PLC0415

    app = create_app(args.artifact, options)
    # uvicorn shuts down gracefully on SIGTERM / Ctrl-C, then re-raises the signal to the handler
    # that was there before it: this one makes that a clean exit (code 0) instead of death by
    # signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

  return run_main("nexus_jax.serve", run)


if __name__ == "__main__":
  sys.exit(main())
