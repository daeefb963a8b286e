"""A real server for tests: `python -m nexus_jax.serve` in a subprocess on a free 127.0.0.1 port.

with running_server(folder, "--num-slots", "4") as server:
  httpx.get(server.url + "/healthz")
assert server.returncode == 0        # stopped with SIGTERM, exited cleanly
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


@dataclasses.dataclass
class Server:
  url: str
  process: subprocess.Popen
  returncode: int | None = None
  output: str = ""

  def wait_ready(self, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"server exited with {self.process.returncode}: {self.read_output()}")
      with contextlib.suppress(httpx.HTTPError):
        status = httpx.get(self.url + "/readyz", timeout=5).json()
        if status["status"] == "ready":
          return
        if status["status"] == "failed":
          raise RuntimeError(f"server failed to load: {status}")
      time.sleep(0.1)
    raise TimeoutError(f"server not ready after {timeout_s} s")

  def wait_listening(self, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"server exited with {self.process.returncode}: {self.read_output()}")
      with contextlib.suppress(httpx.HTTPError):
        httpx.get(self.url + "/healthz", timeout=1)
        return
      time.sleep(0.02)
    raise TimeoutError(f"server not listening after {timeout_s} s")

  def read_output(self) -> str:
    if self.process.poll() is not None and self.process.stdout is not None:
      self.output += self.process.stdout.read() or ""
    return self.output

  def terminate(self, timeout_s: float = 30.0) -> int:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.returncode = self.process.returncode
    self.read_output()
    return self.returncode


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(artifact, args: tuple[str, ...]) -> Server:
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  if "NEXUS_TEST_COMPILATION_CACHE" in env:
    env["JAX_COMPILATION_CACHE_DIR"] = env["NEXUS_TEST_COMPILATION_CACHE"]
  cmd = [sys.executable, "-m", "nexus_jax.serve", "--artifact", str(artifact), "--port", str(port)]
  process = subprocess.Popen(
      cmd + ["--log-level", "warning", *args],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
  )
  return Server(f"http://127.0.0.1:{port}", process)


@contextlib.contextmanager
def running_server(artifact, *args: str, ready: bool = True, attempts: int = 5):
  """Yields a listening (and, with `ready`, warmed) `Server`; SIGTERMs it on exit.

  The free port is found before the server binds it, so another process (a parallel test worker's
  server or client) can take it in between: a server that exits with "address already in use" is
  restarted on a fresh port, up to `attempts` times.
  """
  for attempt in range(attempts):
    server = _start(artifact, args)
    try:
      server.wait_listening()
      break
    except RuntimeError:
      server.terminate()
      if "address already in use" not in server.output or attempt == attempts - 1:
        raise
  try:
    if ready:
      server.wait_ready()
    yield server
  finally:
    server.terminate()


def run_schemathesis(server: Server, cwd, *, also_exclude: tuple[str, ...] = ()):
  """schemathesis over the live OpenAPI: 50 examples per operation, every check but the auth /
  resource-lifecycle ones (no auth, no stateful resources here). Returns the CompletedProcess."""
  excluded = ("ignored_auth", "use_after_free", "ensure_resource_availability") + also_exclude
  cmd = [
      sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
      "--max-examples", "50", "--checks", "all", "--exclude-checks", ",".join(excluded),
      "--generation-deterministic", "--workers", "2", "--no-color",
  ]  # fmt: skip
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
