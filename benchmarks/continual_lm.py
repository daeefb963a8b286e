"""Domain-incremental byte LM through the trainer: fine-tuning vs EWC vs replay, in one run.

    python benchmarks/continual_lm.py [--domains asyncio,email,xml] [--steps 150]
        [--lambdas 30,300,3000] [--replay_capacity 1024] [--replay_fraction 0.25]
        [--test_bytes 131072] [--workdir DIR] [--set model.embed_dim=64 ...]

The same code path as `python -m experiments.run --config configs/lm.py
--config.continual.domains=...` (`train/continual_fit.run_domains`: one `fit` per domain, each
domain starting from the previous one's best params), on configs/lm.py's MoE LM with the same
domains, steps per domain, batches and seed for every protocol:
  finetune  plain sequential training;
  ewc       `optim.ewc_lambda` from `--lambdas`, each trained in full; the one with the lowest
            average VALIDATION bits/byte over all domains after the last domain is reported
            (the test bytes take no part in the choice; every lambda's test row is printed too);
  replay    a reservoir of `--replay_capacity` windows of the earlier domains, replacing the last
            `replay_fraction` of every batch in the later domains (batch size unchanged).
For each: the test bits/byte matrix R[i][j] (domain j after training domain i; lower is better),
average final bits/byte, backward transfer (mean over earlier domains of R[T-1, j] - R[j, j];
> 0 is forgetting) and forgetting. Prints one JSON object per protocol (one line each, as they
finish) and then one summary object with the machine, versions and config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.models.lm import lm_from_config  # noqa: E402
from nexus_jax.models.seq_objectives import lm_objective  # noqa: E402
from nexus_jax.train.config import compute_dtype  # noqa: E402
from nexus_jax.train.continual_fit import run_domains  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lm_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("lm_config", ROOT / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_set(config: ml_collections.ConfigDict, assignment: str) -> None:
  """`section.key=value` (value parsed as JSON when it can be, else a string)."""
  path, sep, raw = assignment.partition("=")
  if not sep or "." not in path:
    raise SystemExit(f"--set {assignment!r}: expected section.key=value, e.g. model.embed_dim=64")
  section, key = path.rsplit(".", 1)
  node = config
  for part in section.split("."):
    if part not in node:
      raise SystemExit(f"--set {assignment!r}: configs/lm.py has no section {section!r}")
    node = node[part]
  if key not in node:
    raise SystemExit(f"--set {assignment!r}: configs/lm.py has no field {path!r}")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  node[key] = type(node[key])(value) if isinstance(node[key], float) else value


def base_config(args) -> ml_collections.ConfigDict:
  c = lm_config()
  c.continual.domains = args.domains
  c.train.num_steps = args.steps
  c.train.eval_every_steps = args.steps
  c.train.progress = False
  c.train.tensorboard = False
  c.data.test_bytes = args.test_bytes
  c.continual.fisher_examples = args.fisher_examples
  for assignment in args.set:
    apply_set(c, assignment)
  return c


def run_protocol(base, workdir: pathlib.Path, *, ewc_lambda=0.0, replay_capacity=0, fraction=0.25):
  config = ml_collections.ConfigDict(base.to_dict())
  config.optim.ewc_lambda = float(ewc_lambda)
  config.continual.replay_capacity = int(replay_capacity)
  config.continual.replay_fraction = float(fraction) if replay_capacity else 0.0
  model = lm_from_config(config.model, 256, compute_dtype(config.train.compute_dtype))
  t0 = time.perf_counter()
  out = run_domains(lambda: lm_objective(model), config, workdir)
  report = out.report()
  report["seconds"] = round(time.perf_counter() - t0, 1)
  return report


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--domains", default="asyncio,email,xml")
  ap.add_argument("--steps", type=int, default=150, help="optimizer steps per domain")
  ap.add_argument("--lambdas", default="30,300,3000", help="EWC lambda grid (comma-separated)")
  ap.add_argument("--fisher_examples", type=int, default=256)
  ap.add_argument("--replay_capacity", type=int, default=1024)
  ap.add_argument("--replay_fraction", type=float, default=0.25)
  ap.add_argument("--test_bytes", type=int, default=131_072, help="test bytes per domain")
  ap.add_argument("--protocols", default="finetune,ewc,replay")
  ap.add_argument("--workdir", default="", help="a new or empty folder; '' = a temporary one")
  ap.add_argument("--set", action="append", default=[], help="configs/lm.py override a.b=value")
  args = ap.parse_args()
  lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
  protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
  unknown = sorted(set(protocols) - {"finetune", "ewc", "replay"})
  if unknown or not protocols:
    raise SystemExit(f"--protocols={args.protocols!r}: choose from finetune, ewc, replay")
  if "ewc" in protocols and (not lambdas or min(lambdas) <= 0):
    raise SystemExit(f"--lambdas={args.lambdas!r}: needs one or more values > 0")
  base = base_config(args)
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="continual_lm_"))
  if workdir.exists() and any(workdir.iterdir()):  # fit would resume the runs found there
    raise SystemExit(f"--workdir={workdir} is not empty; give a new folder (runs there resume)")
  t_start = time.perf_counter()
  results = {}

  def emit(name, report):
    results[name] = report
    print(json.dumps({"protocol": name, **report}), flush=True)

  if "finetune" in protocols:
    emit("finetune", run_protocol(base, workdir / "finetune"))
  if "ewc" in protocols:
    grid = {}
    for lam in lambdas:
      grid[lam] = run_protocol(base, workdir / f"ewc_{lam:g}", ewc_lambda=lam)
      print(json.dumps({"protocol": f"ewc_lambda_{lam:g}", **grid[lam]}), flush=True)
    chosen = min(grid, key=lambda lam: grid[lam]["average_valid_bits_per_byte"])
    emit(
        "ewc",
        {
            **grid[chosen],
            "ewc_lambda": chosen,
            "lambda_selection": {
                f"{lam:g}": r["average_valid_bits_per_byte"] for lam, r in grid.items()
            },
        },
    )
  if "replay" in protocols:
    emit(
        "replay",
        {
            **run_protocol(
                base,
                workdir / "replay",
                replay_capacity=args.replay_capacity,
                fraction=args.replay_fraction,
            ),
            "replay_capacity": args.replay_capacity,
            "replay_fraction": args.replay_fraction,
        },
    )
  keys = ("average_bits_per_byte", "backward_transfer", "forgetting")
  print(
      json.dumps(
          {
              "benchmark": "continual_lm",
              "machine": machine_info(),
              "config": {
                  **vars(args),
                  "model": base.model.to_dict(),
                  "train": {
                      "batch_size": base.train.batch_size,
                      "num_steps": base.train.num_steps,
                      "seq_len": base.data.seq_len,
                      "learning_rate": base.optim.learning_rate,
                  },
              },
              "summary": {name: {k: r[k] for k in keys} for name, r in results.items()},
              "seconds": round(time.perf_counter() - t_start, 1),
          }
      ),
      flush=True,
  )


if __name__ == "__main__":
  main()
