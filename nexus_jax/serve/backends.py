"""What the HTTP server serves: a saved language model or a tabular artifact, loaded off the loop.

    backend = open_backend("runs/lm/model", options)   # cheap: reads which kind the folder holds
    backend.start()            # loads + warms on a background thread; `state` says how far it got
    fut = backend.generate(GenerateJob(...))          # concurrent.futures.Future[Completion]
    backend.close()

`LMBackend` hands every request to the continuous-batching `inference.scheduler.DecodeServer`,
whose single engine thread does all of the model's JAX work; `TabularBackend` runs each
prediction on a one-thread executor. Neither ever blocks the asyncio event loop: the app awaits
their futures with `asyncio.wrap_future`.

States: "loading" (start() not finished: warming every prefill bucket), "ready", "failed"
(`error` holds the one-line reason), "closed".
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import json
import pathlib
import threading
from typing import Any, Callable

import numpy as np

LM_MARKER, TABULAR_MARKER = "model.json", "artifact.json"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  """Server limits. `max_new_tokens_limit` caps a request's `max_new_tokens`; bodies over
  `max_body_bytes` get 413; a request not answered within `request_timeout_s` gets 504."""

  num_slots: int = 8
  max_new_tokens_limit: int = 256
  cache_len: int | None = None  # None: the model's max_len (learned positions) or 1024
  request_timeout_s: float = 60.0
  max_body_bytes: int = 1_000_000
  max_stop: int = 8

  def __post_init__(self):
    for name in ("num_slots", "max_new_tokens_limit", "max_body_bytes", "max_stop"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
    if not self.request_timeout_s > 0:
      raise ValueError(f"request_timeout_s must be > 0; got {self.request_timeout_s}.")


@dataclasses.dataclass(frozen=True)
class GenerateJob:
  """One validated generation request, in token ids."""

  prompt_ids: tuple[int, ...]
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  seed: int = 0
  on_token: Callable[[int, float], None] | None = None


def artifact_kind(path: str | pathlib.Path) -> str:
  """ "lm" for a folder written by `models.saving.save_model`, "tabular" for a NexusFlow artifact."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"--artifact {path}: no such folder")
  if (path / TABULAR_MARKER).is_file():
    return "tabular"
  if (path / LM_MARKER).is_file():
    return "lm"
  raise ValueError(
      f"--artifact {path}: neither a saved language model ({LM_MARKER}) nor a NexusFlow "
      f"artifact ({TABULAR_MARKER})"
  )


def manifest_sha256(path: pathlib.Path) -> str | None:
  from nexus_jax.train.integrity import sha256_file  # noqa: PLC0415

  return sha256_file(path / MANIFEST) if (path / MANIFEST).is_file() else None


class Backend(abc.ABC):
  """Loads on a background thread (`start`) so `/healthz` answers while the model warms."""

  kind = ""

  def __init__(self, path: str | pathlib.Path, options: ServeOptions):
    self.path = pathlib.Path(path).absolute()
    self.options = options
    self.name = (
        self.path.name
        if self.path.name not in ("model", "artifact")
        else (f"{self.path.parent.name}/{self.path.name}")
    )
    self.state, self.error = "loading", None
    self.info: dict[str, Any] = {}
    self._ready = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self) -> None:
    self._thread = threading.Thread(target=self._load_guarded, name="nexus-serve-load", daemon=True)
    self._thread.start()

  def wait_ready(self, timeout: float | None = None) -> bool:
    self._ready.wait(timeout)
    return self.state == "ready"

  def _load_guarded(self) -> None:
    try:
      self._load()
      if self.state == "loading":
        self.state = "ready"
    except Exception as err:  # noqa: BLE001 (reported by /readyz, the process keeps serving health)
      self.state, self.error = "failed", f"{type(err).__name__}: {' '.join(str(err).split())}"
    finally:
      self._ready.set()

  @abc.abstractmethod
  def _load(self) -> None:
    """Loads and warms the model (runs on the loading thread)."""

  def close(self) -> None:
    self.state = "closed"

  def describe(self) -> dict[str, Any]:
    """The /v1/models entry."""
    return {"id": self.name, "kind": self.kind, "state": self.state, **self.info}


class LMBackend(Backend):
  """A saved LM (`nexus-lm` folder) behind the continuous-batching scheduler."""

  kind = "lm"

  def __init__(self, path, options):
    super().__init__(path, options)
    self.tokenizer = None
    self.scheduler = None
    fields = json.loads((self.path / LM_MARKER).read_text()).get("fields", {})
    self.vocab_size = int(fields.get("vocab_size") or 0)
    if self.vocab_size < 1:
      raise ValueError(f"--artifact {self.path}: {LM_MARKER} names no vocab_size (not an LM)")
    learned = fields.get("position_embedding") == "learned"
    self.cache_len = int(options.cache_len or (fields["max_len"] if learned else 1024))
    if learned and self.cache_len > int(fields["max_len"]):
      raise ValueError(
          f"cache_len={self.cache_len} is longer than the model's learned positions "
          f"(max_len={fields['max_len']})"
      )

  def _load(self) -> None:
    from nexus_jax.cli.nexus_lm import load_lm  # noqa: PLC0415 (imports jax)
    from nexus_jax.inference.engine import Engine, default_buckets  # noqa: PLC0415
    from nexus_jax.inference.scheduler import DecodeServer  # noqa: PLC0415
    from nexus_jax.models.lm import count_params  # noqa: PLC0415

    model, params, tokenizer, saved = load_lm(str(self.path))
    self.tokenizer = tokenizer
    self.info = {
        "family": saved.family,
        "parameters": int(count_params(params)),
        "vocab_size": self.vocab_size,
        "tokenizer": tokenizer.kind,
        "context_length": self.cache_len,
        "max_new_tokens_limit": self.options.max_new_tokens_limit,
        "sha256": manifest_sha256(self.path),
    }
    engine = Engine(
        model,
        params,
        num_slots=self.options.num_slots,
        max_len=self.cache_len,
        prefill_buckets=default_buckets(self.max_prompt_tokens),
    )
    self.scheduler = DecodeServer(engine)
    # The engine thread compiles every prefill bucket and decode block, then serves; the first
    # request's answer says that it is warm. All JAX work after loading runs on that thread.
    self.scheduler.start(warmup=True)
    self.scheduler.submit([0], max_new_tokens=1).result()
    if self.state == "closed":  # closed while warming
      self.scheduler.stop()

  @property
  def max_prompt_tokens(self) -> int:
    """The longest prompt a request may have: the cache less the most tokens it may ask for."""
    return self.cache_len - self.options.max_new_tokens_limit

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in self.tokenizer.encode(text.encode("utf-8"))]

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids)).decode("utf-8", "replace")

  def token_bytes(self, token: int) -> bytes:
    return self.tokenizer.token_bytes(int(token))

  def generate(self, job: GenerateJob) -> concurrent.futures.Future:
    return self.scheduler.submit(
        list(job.prompt_ids),
        max_new_tokens=job.max_new_tokens,
        temperature=job.temperature,
        top_k=job.top_k,
        top_p=job.top_p,
        stop_tokens=job.stop_tokens,
        seed=job.seed,
        on_token=job.on_token,
    )

  def cancel(self, future: concurrent.futures.Future) -> None:
    """Ends the request (its future resolves with finish_reason "cancelled")."""
    self.scheduler.cancel(future)

  def close(self) -> None:
    super().close()
    if self.scheduler is not None:
      self.scheduler.stop()


class TabularBackend(Backend):
  """A NexusFlow artifact; predictions run one at a time on their own thread."""

  kind = "tabular"

  def __init__(self, path, options):
    super().__init__(path, options)
    self.predictor = None
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nexus-serve-jax")

  def _load(self) -> None:
    self._executor.submit(self._load_on_executor).result()

  def _load_on_executor(self) -> None:
    import jax  # noqa: PLC0415

    from nexus_jax.nexusflow.artifact import load_artifact  # noqa: PLC0415

    predictor = load_artifact(self.path)
    meta = json.loads((self.path / TABULAR_MARKER).read_text())
    self.predictor = predictor
    self.info = {
        "task": predictor.task,
        "target": predictor.schema.to_dict()["target"],
        "tables": sorted(predictor.fit_columns),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(predictor.variables["params"]))),
        "format_version": meta["format_version"],
        "sha256": manifest_sha256(self.path),
    }

  def predict(self, tables: dict[str, list[dict]], predict_from: str | None):
    """Future of the /v1/predict response for JSON rows per table."""
    return self._executor.submit(self._predict, tables, predict_from)

  def _predict(self, tables, predict_from):
    from nexus_jax.nexusflow.predict_cli import predict_tables  # noqa: PLC0415
    from nexus_jax.nexusflow.server import frame, response  # noqa: PLC0415

    frames = {name: frame(name, rows) for name, rows in tables.items()}
    return response(self.predictor, predict_tables(self.predictor, frames, predict_from))

  def close(self) -> None:
    super().close()
    self._executor.shutdown(wait=False, cancel_futures=True)


def open_backend(path: str | pathlib.Path, options: ServeOptions) -> Backend:
  """The backend for the folder's kind (not loaded yet: call `start`)."""
  return {"lm": LMBackend, "tabular": TabularBackend}[artifact_kind(path)](path, options)
