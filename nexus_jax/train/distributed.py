"""Training across processes: `jax.distributed` start-up, per-process batch rows, process-0 outputs.

Every process runs the same program on its own rows (multi-controller JAX):

    initialize(config.distributed)         # before any JAX computation; no-op for 1 process
    rows = local_rows(batch_sharding, B)   # this process's rows of every global batch [B, ...]
    x = global_batch(local, batch_sharding, B)   # -> global jax.Array [B, ...] (no copy of others' rows)
    if is_primary(): write_results(...)    # metrics, TensorBoard, results, plots, artifacts
    params = host_local(state.params)      # numpy copy of a (sharded) global tree on every process

The global batch for step s is the same whatever the number of processes (`ArrayDataset` picks the
rows from the seed and the step), so N processes with one device each train exactly what one
process with N devices trains. On CPU the collectives go over gloo (TCP), jax's default.

Faults: if a peer process dies, the next collective fails (gloo: "Connection closed by peer") or,
when none is running, the coordination service notices the missing heartbeats after
`heartbeat_timeout_seconds`. `raise_if_peer_lost` turns a failed collective into a
`LostProcessError` naming the lost process(es) and the checkpoint a rerun resumes from. But
jax.distributed also ends a process itself, from a C++ thread and within milliseconds, when its
coordination service reports an error ("The following tasks are unhealthy (stopped sending
heartbeats): 1", or the coordinator, process 0, is gone): no Python code of that process runs
again. So on Linux `initialize` forks first (`config.distributed.watch`): the process you started
becomes a watcher that passes the training process's output through and, if jax ended it,
prints the same `error: lost process ...` line (naming process 0, the coordinator, or the
unhealthy tasks, and the last complete checkpoint) and exits with 1. The training process dies
with its watcher (PR_SET_PDEATHSIG), so killing the started process kills the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pathlib
import re
import signal
import sys
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

# Set in `initialize` (the settings a later call must match).
_STARTED: dict[str, Any] = {}


class LostProcessError(RuntimeError):
  """A peer process of a multi-process run died or became unreachable; this one cannot go on."""


def settings(dc: Any) -> dict[str, Any]:
  """Validated `config.distributed` fields (see `train/config.py`); ValueError naming the field."""
  auto = bool(dc.get("auto", False))
  n, pid = int(dc.get("num_processes", 1)), int(dc.get("process_id", 0))
  address = str(dc.get("coordinator_address", "") or "")
  problems = []
  if not auto:
    if n < 1:
      problems.append(f"config.distributed.num_processes={n}: must be >= 1.")
    elif not 0 <= pid < n:
      problems.append(f"config.distributed.process_id={pid}: must be in [0, num_processes={n}).")
    if n > 1 and ":" not in address:
      problems.append(
          f"config.distributed.coordinator_address={address!r}: a run of {n} processes needs "
          "process 0's 'host:port' (the same on every process), e.g. 127.0.0.1:12355."
      )
  for field in (
      "heartbeat_timeout_seconds",
      "initialization_timeout_seconds",
      "shutdown_timeout_seconds",
  ):
    if int(dc.get(field, 1)) < 1:
      problems.append(f"config.distributed.{field}={dc.get(field)!r}: must be >= 1.")
  if problems:
    raise ValueError("invalid distributed config:\n  " + "\n  ".join(problems))
  return {
      "auto": auto,
      "num_processes": n,
      "process_id": pid,
      "coordinator_address": address,
      "coordinator_bind_address": str(dc.get("coordinator_bind_address", "") or ""),
      "heartbeat_timeout_seconds": int(dc.get("heartbeat_timeout_seconds", 60)),
      "initialization_timeout_seconds": int(dc.get("initialization_timeout_seconds", 300)),
      "shutdown_timeout_seconds": int(dc.get("shutdown_timeout_seconds", 60)),
      "watch": bool(dc.get("watch", True)),
  }


def initialize(dc: Any) -> bool:
  """Starts `jax.distributed` from `config.distributed`; returns True when this is a multi-process run.

  `auto=True` lets jax detect the cluster (SLURM, Open MPI, Cloud TPU pod slices: every argument
  from the environment). Otherwise `num_processes=1` does nothing, and more processes connect to
  `coordinator_address` (process 0 serves it, bound to `coordinator_bind_address`, default
  jax's `[::]:port`). Calling it again with the same settings is a no-op.

  Raises:
    ValueError naming the field for bad settings, or when JAX was already used in this process
    (jax.distributed must start before any computation) or started with other settings.
  """
  s = settings(dc)
  if not s["auto"] and s["num_processes"] == 1:
    return jax.process_count() > 1
  if _STARTED:
    if _STARTED != s:
      raise ValueError(
          f"jax.distributed already started in this process with {_STARTED}; "
          f"config.distributed asks for {s}."
      )
    return True
  kwargs: dict[str, Any] = {
      "initialization_timeout": s["initialization_timeout_seconds"],
      "heartbeat_timeout_seconds": s["heartbeat_timeout_seconds"],
      "shutdown_timeout_seconds": s["shutdown_timeout_seconds"],
  }
  if s["watch"]:
    _start_watcher(s)  # returns in the (forked) training process only
  if s["coordinator_bind_address"]:
    kwargs["coordinator_bind_address"] = s["coordinator_bind_address"]
  if not s["auto"]:
    kwargs.update(
        coordinator_address=s["coordinator_address"],
        num_processes=s["num_processes"],
        process_id=s["process_id"],
    )
  elif s["coordinator_address"]:
    kwargs["coordinator_address"] = s["coordinator_address"]
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as err:
    if "must be called before" in str(err):
      raise ValueError(
          "config.distributed: jax.distributed must start before any JAX computation in this "
          "process; start a fresh process per rank (python -m experiments.run ...)."
      ) from None
    raise
  _STARTED.update(s)
  _note(process=jax.process_index(), processes=jax.process_count())
  logging.getLogger(__name__).info(
      "process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return jax.process_count() > 1


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on process 0: the one that writes metrics, results, plots and artifacts."""
  return jax.process_index() == 0


def local_rows(sharding: Sharding, batch_size: int) -> slice:
  """The rows `[start, stop)` of a global `[batch_size, ...]` batch this process's devices hold.

  Raises ValueError if they are not one contiguous block (a mesh whose batch axes interleave the
  processes' devices).
  """
  index_map = sharding.addressable_devices_indices_map((int(batch_size),))
  spans = sorted(
      {
          (i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
          for i in index_map.values()
      }
  )
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  if covered != stop - start or any(b != c for (_, b), (c, _) in zip(spans, spans[1:])):
    raise ValueError(
        f"process {jax.process_index()} holds batch rows {spans}, not one contiguous block; "
        "order the mesh's devices by process (jax.make_mesh does) or use fewer batch axes."
    )
  return slice(start, stop)


def global_batch(local: Any, sharding: Sharding, batch_size: int) -> Any:
  """A tree of this process's rows `[stop - start, ...]` -> global arrays `[batch_size, ...]`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), (int(batch_size), *np.shape(x)[1:])
      ),
      local,
  )


def host_local(tree: Any) -> Any:
  """`tree` as numpy on every process (gathered across processes); unchanged in a 1-process run.

  A collective in a multi-process run: every process must call it.
  """
  if not is_multiprocess():
    return tree

  def get(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_replicated or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def sync(name: str) -> None:
  """Barrier: returns when every process reached `sync(name)` (no-op for 1 process)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
  """Process 0 runs the block first (e.g. writes a file), the others after it (e.g. read it)."""
  if not is_multiprocess():
    yield
    return
  if not is_primary():
    sync(name)
  yield
  if is_primary():
    sync(name)


def lost_processes(timeout_seconds: float = 10.0) -> list[int] | None:
  """Processes the coordination service no longer sees alive; None when it cannot tell in time.

  The query waits until every live process has asked too (or died), so it runs on a thread and is
  given up after `timeout_seconds`.
  """
  from jax._src import distributed as jax_distributed  # noqa: PLC0415 (the live-node query)

  client = jax_distributed.global_state.client
  if client is None:
    return None
  everyone = list(range(jax.process_count()))
  answer: dict[str, Any] = {}

  def ask():
    try:
      answer["alive"] = client.get_live_nodes(everyone)
    except Exception:  # the coordinator (process 0) itself is gone
      answer["alive"] = None if jax.process_index() == 0 else [p for p in everyone if p]

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout_seconds)
  if answer.get("alive") is None:
    return None
  return [p for p in everyone if p not in answer["alive"]]


# Phrases of the errors a collective or the coordination service raises when a peer is gone.
_COLLECTIVE_FAILURES = (
    "Gloo",
    "gloo",
    "Connection closed",
    "Connection reset",
    "UNAVAILABLE",
    "heartbeat",
    "coordination service",
    "Barrier",
    "barrier",
    "DEADLINE_EXCEEDED",
)


def complete_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
  """Steps whose checkpoint folder is complete on disk (Orbax renames a step's temporary folder
  only once every process wrote it); read without Orbax, e.g. after a peer process died."""
  path = pathlib.Path(checkpoint_dir)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def resume_note(workdir: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> str:
  """'Rerun every process ...: training resumes from step N, the last complete checkpoint.'"""
  done = complete_steps(checkpoint_dir)
  where = f"step {done[-1]}" if done else "the start (no checkpoint yet)"
  return (
      f"Rerun every process with the same workdir ({workdir}): training resumes from "
      f"{where}, the last complete checkpoint."
  )


def training_in(workdir: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> None:
  """Tells the watcher (if any) where this process trains now, for its resume note."""
  _note(workdir=str(workdir), checkpoints=str(checkpoint_dir))


def _who(lost: list[int] | None, n: int) -> str:
  """'process 1 of 2', 'process 0 of 2 (the coordinator)', 'processes 2, 3 of 4' or 'a peer ...'."""
  if not lost:
    return f"a peer process of {n}"
  who = f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {n}"
  return who + (" (the coordinator, which serves jax.distributed)" if 0 in lost else "")


def raise_if_peer_lost(err: BaseException, resume_note: str) -> None:
  """Raises `LostProcessError` (from `err`) when a peer process is gone; returns otherwise.

  The message names the lost process(es) and `resume_note` (e.g. the checkpoint a rerun of every
  process resumes from); it is written to stderr at once, because jax's coordination service
  aborts this process soon after it learns that a task died.
  """
  if not is_multiprocess() or isinstance(err, (KeyboardInterrupt, LostProcessError)):
    return
  text = str(err)
  if not any(key in text for key in _COLLECTIVE_FAILURES):
    return  # this process's own error: the caller re-raises it
  me, n = jax.process_index(), jax.process_count()
  if n == 2:  # the only peer; asking the coordinator would race with jax's abort
    lost = [1 - me]
  else:
    lost = lost_processes(float(_STARTED.get("heartbeat_timeout_seconds", 10)))
  who = _who(lost, n)
  message = (
      f"lost {who}: it died or became unreachable (process {me} saw: "
      f"{text.splitlines()[0][:200] if text else type(err).__name__}). {resume_note}"
  )
  os.write(sys.stderr.fileno(), f"error: {message}\n".encode())
  raise LostProcessError(message) from err


# ----------------------------------------------------------------------------------- the watcher
_LOST_MARKER = "error: lost "  # how our lost-process message starts on stderr
# jax.distributed's own last words (xla/pjrt/distributed/client.h) before it aborts a process.
_JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_NOTES_FD: list[int] = []  # in a watched training process: the pipe to the watcher
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _note(**fields: Any) -> None:
  """One JSON line to the watcher (no-op without one)."""
  if _NOTES_FD:
    with contextlib.suppress(OSError):
      os.write(_NOTES_FD[0], (json.dumps(fields) + "\n").encode())


def _start_watcher(s: dict[str, Any]) -> None:
  """Forks (Linux): the child returns and trains; this process watches it and never returns.

  The child's stderr goes through a pipe to the watcher (which copies it to its own stderr and
  keeps the tail), it runs in its own process group (the watcher forwards SIGINT, SIGTERM,
  SIGHUP, SIGUSR1/2 to it, once) and it is SIGKILLed if the watcher dies.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
  except (OSError, AttributeError):
    return  # not Linux: no watcher
  sys.stdout.flush(), sys.stderr.flush()
  err_r, err_w = os.pipe()
  note_r, note_w = os.pipe()
  watcher = os.getpid()
  pid = os.fork()
  if pid == 0:  # the training process
    os.close(err_r), os.close(note_r)
    os.dup2(err_w, 2)
    os.close(err_w)
    _NOTES_FD.append(note_w)
    os.setpgid(0, 0)
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != watcher:
      os._exit(1)  # the watcher is already gone
    return
  os.close(err_w), os.close(note_w)
  os._exit(_watch(pid, err_r, note_r, s))


def _watch(pid: int, err_r: int, note_r: int, s: dict[str, Any]) -> int:
  """Waits for the training process `pid`; returns the exit code this process ends with."""
  for sig in _FORWARDED:
    signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
  tail = bytearray()
  notes: dict[str, Any] = {"process": s["process_id"], "processes": s["num_processes"]}

  def copy_stderr():
    while chunk := os.read(err_r, 1 << 16):
      os.write(2, chunk)
      tail.extend(chunk)
      del tail[: max(len(tail) - (1 << 16), 0)]

  def read_notes():
    with os.fdopen(note_r, "rb") as f:
      for line in f:
        with contextlib.suppress(ValueError):
          notes.update(json.loads(line))

  threads = [threading.Thread(target=f, daemon=True) for f in (copy_stderr, read_notes)]
  for t in threads:
    t.start()
  _, status = os.waitpid(pid, 0)
  for t in threads:
    t.join(5.0)  # the pipes close with the training process (and any child that inherited them)
  code = os.waitstatus_to_exitcode(status)
  if code == 0:
    return 0
  text = tail.decode(errors="replace")
  if _LOST_MARKER in text:  # it reported the lost peer itself (jax may have ended it after)
    return 1
  message = _lost_message(text, notes, s)
  if message is None:  # its own failure: its exit code (128 + N for signal N, as a shell does)
    return code if code > 0 else 128 - code
  os.write(2, f"error: {message}\n".encode())
  return 1


def _lost_message(text: str, notes: dict[str, Any], s: dict[str, Any]) -> str | None:
  """Our message for a training process that jax.distributed ended; None if it did not."""
  if _JAX_ABORT not in text:
    return None
  status = text[text.rindex(_JAX_ABORT) :].partition("absl::Status: ")[2]
  me, n = int(notes["process"]), int(notes["processes"])
  if "stopped sending heartbeats" in status:
    listed = status.partition("stopped sending heartbeats):")[2].partition("The tasks")[0]
    lost = sorted({int(i) for i in re.findall(r"\d+", listed)} - {me})
  elif me != 0 and ("coordination service" in status or "leader" in status):
    lost = [0]
  else:
    lost = []
  who = _who(lost, n)
  first = status.strip().splitlines()[0].split(". ")[0][:200] if status.strip() else "fatal error"
  note = resume_note(notes["workdir"], notes["checkpoints"]) if "checkpoints" in notes else ""
  return (
      f"lost {who}: it died or became unreachable, and jax.distributed ended process {me} "
      f"(jax: {first}). {note}"
  ).rstrip()
