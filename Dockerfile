# The HTTP server (`python -m nexus_jax.serve`) for a saved LM or a NexusFlow artifact, on CPU.
#
#   docker build -t nexus-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/lm/model:/artifact:ro" nexus-serve
#   curl localhost:8000/readyz        # 503 while warming, then {"status": "ready"}
#
# The artifact is mounted read-only at /artifact (never baked into the image). For an NVIDIA GPU,
# build with `--build-arg EXTRAS=serve,cuda12` and run with `--gpus all`.
# Not built on this project's machines: they have the docker client but no engine.
FROM python:3.11-slim

ARG EXTRAS=serve
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 JAX_PLATFORMS=""

WORKDIR /app
COPY pyproject.toml README.md ./
COPY nexus_jax ./nexus_jax
COPY experiments ./experiments
COPY configs ./configs
RUN pip install ".[${EXTRAS}]" \
    && useradd --create-home --uid 10001 nexus
USER nexus

EXPOSE 8000
# SIGTERM (docker stop) shuts uvicorn down gracefully and exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=1)"
ENTRYPOINT ["python", "-m", "nexus_jax.serve", "--artifact", "/artifact", "--host", "0.0.0.0", "--port", "8000"]
