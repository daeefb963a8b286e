"""One process of the small multi-process runs of tests/train/test_distributed.py.

    python tests/train/distributed_worker.py WORKDIR NUM_PROCESSES PROCESS_ID PORT [STOP_AFTER]

Starts `jax.distributed` (NUM_PROCESSES > 1: coordinator on 127.0.0.1:PORT, gloo collectives,
heartbeat timeout 10 s, or NEXUS_TEST_HEARTBEAT seconds), then trains with the project's `fit`,
in WORKDIR/lm and WORKDIR/tabular: a tiny dense LM on random tokens and a tiny tabular
RowPredictor (MLP) on random rows, 8 steps each, evaluated and checkpointed at steps 4 and 8.
STOP_AFTER > 0: stop after that many steps, as if interrupted (a rerun resumes); STOP_AFTER < 0:
start jax.distributed, print "idle", sleep -STOP_AFTER seconds and exit (a process that runs no
collective when a peer dies). Process 0 writes WORKDIR/<model>/valid.json (the validation
metrics, predictions included) after each run.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8
EVAL_EVERY = 4  # evaluation and checkpoint at steps 4 and 8
BATCH = 8


def main(argv: list[str]) -> None:
  workdir, processes, rank, port = pathlib.Path(argv[0]), int(argv[1]), int(argv[2]), argv[3]
  stop_after = int(argv[4]) if len(argv) > 4 else 0
  sys.path.insert(0, str(ROOT))
  from nexus_jax.train import distributed  # noqa: PLC0415 (after the argument checks)
  from nexus_jax.train.config import base_config  # noqa: PLC0415

  c = base_config()
  c.distributed.update(
      num_processes=processes,
      process_id=rank,
      coordinator_address=f"127.0.0.1:{port}",
      coordinator_bind_address=f"127.0.0.1:{port}",
      heartbeat_timeout_seconds=int(os.environ.get("NEXUS_TEST_HEARTBEAT", 10)),
      shutdown_timeout_seconds=20,
  )
  distributed.initialize(c.distributed)  # before any JAX computation
  if stop_after < 0:  # an idle process (no collective running when a peer dies)
    print("idle", flush=True)
    time.sleep(-stop_after)
    return

  import jax  # noqa: PLC0415

  from experiments.run import load_config_module  # noqa: PLC0415
  from nexus_jax.models.lm import lm_from_config  # noqa: PLC0415
  from nexus_jax.models.seq_objectives import lm_objective  # noqa: PLC0415
  from nexus_jax.models.tabular.row_predictor import RowPredictor  # noqa: PLC0415
  from nexus_jax.nexusflow.objectives import tabular_objective  # noqa: PLC0415
  from nexus_jax.train.data import ArrayDataset  # noqa: PLC0415
  from nexus_jax.train.loop import fit  # noqa: PLC0415

  c.train.update(
      batch_size=BATCH,
      num_steps=STEPS,
      eval_every_steps=EVAL_EVERY,
      log_every_steps=1,
      stop_after_steps=stop_after,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 2
  rng = np.random.default_rng(0)

  lm_config = load_config_module(ROOT / "configs" / "lm.py").get_config().model
  lm_config.update(
      num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16, num_experts=0
  )
  lm = lm_from_config(lm_config, 64, jax.numpy.float32)
  tokens = lambda n: {"tokens": rng.integers(0, 64, (n, 17)).astype(np.int32)}
  lm_train, lm_valid = ArrayDataset(tokens(48), BATCH, seed=1), ArrayDataset(tokens(20), BATCH)

  model = RowPredictor(
      encoder="mlp",
      num_numeric=3,
      cat_cardinalities=(4, 5),
      d_hidden=16,
      encoder_kwargs={"d_layers": (16,), "d_embedding": 4},
  )

  def rows(n):
    x_num = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x_num[:, 0] + rng.normal(size=n) > 0).astype(np.int32)
    x_cat = np.stack([rng.integers(0, 4, n), rng.integers(0, 5, n)], 1).astype(np.int32)
    return {"x_num": x_num, "x_cat": x_cat, "num_missing": np.zeros((n, 3), bool), "y": y}

  tab_train, tab_valid = ArrayDataset(rows(80), BATCH, seed=2), ArrayDataset(rows(21), BATCH)

  runs = {
      "lm": (lm_objective(lm), lm_train, lm_valid),
      "tabular": (tabular_objective(model, "binary"), tab_train, tab_valid),
  }
  for name, (objective, train, valid) in runs.items():
    result = fit(objective, train, valid, c, workdir / name)
    metrics, predictions = result.trainer.evaluate(result.state, valid)  # every process
    if distributed.is_primary():
      out = {"metrics": metrics, "predictions": np.asarray(predictions).tolist()}
      (workdir / name / "valid.json").write_text(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
