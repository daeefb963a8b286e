"""Continual learning on scikit-learn digits: fine-tuning vs EWC vs online EWC vs replay.

Protocols (5 tasks each; every method trains the same MLP 64 -> 512 -> 10 with Adam):
  permuted (domain-incremental): task t is the digits with a fixed pixel permutation (task 0 the
    original pixels), labels 0-9 on every task.
  split (class-incremental): task t holds classes {2t, 2t+1}; ONE shared 10-way head, evaluated
    over all 10 classes (no task id at test time).
  lm (`--lm` or `--lm_only`): the tiny dense byte LanguageModel trained on stdlib sub-packages
    in sequence (asyncio -> email -> json; 200 steps of 16 x 64 bytes each, 1 seed); the matrix
    holds test bits/byte (lower is better, BWT > 0 is forgetting); EWC's lambda from
    `--lm_lambdas` on the tuning seed's run scored on validation bytes (80-90%, test is 90-100%); replay keeps 300 windows.
Per seed the rows are split stratified 60% train / 15% validation / 25% test. EWC's and online
EWC's lambda is chosen on a VALIDATION run: a separate seed (`--tune_seed`, its own split and
permutations), trained on its train rows, scored by average accuracy on its validation rows over
`--lambdas`; the chosen lambda then runs the test seeds, scored on their test rows. Replay keeps
a reservoir of 50 examples per task (capacity 250 = 50 x 5 tasks, uniform over the stream: about
50 of each task at the end) and appends 32 stored rows to every batch of 32.

  python benchmarks/continual_learning.py                # protocols permuted + split, 3 seeds
  python benchmarks/continual_learning.py --lm           # + the byte-LM protocol (~8 min here)
  python benchmarks/continual_learning.py --quick        # 1 seed, fewer steps (smoke test)

Prints one JSON object: machine, versions, config, per protocol and method the accuracy matrix
of every seed, average accuracy, backward transfer, forgetting, and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.layers.feedforward import MLP  # noqa: E402
from nexus_jax.train import continual  # noqa: E402
from nexus_jax.train.continual import ContinualConfig, Task  # noqa: E402
from nexus_jax.train.steps import Objective  # noqa: E402

NUM_TASKS = 5


def classification_loss(logits, batch):
  w = batch["weight"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.sum(w), {"accuracy": jnp.sum(correct * w) / jnp.sum(w)}


def mlp_objective(hidden: int) -> Objective:
  return Objective(
      model=MLP(hidden_dim=hidden, activation="relu", out_dim=10, use_bias=True),
      loss=classification_loss,
      inputs=lambda batch, train: {"x": batch["x"], "deterministic": not train},
  )


def digit_splits(seed: int) -> dict[str, dict[str, np.ndarray]]:
  """Stratified 60 / 15 / 25 train / valid / test split of the digits (pixels / 16)."""
  from sklearn.datasets import load_digits  # noqa: PLC0415
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  x, y = load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=0.25, stratify=y, random_state=seed
  )
  x_train, x_valid, y_train, y_valid = train_test_split(
      x_rest, y_rest, test_size=0.2, stratify=y_rest, random_state=seed
  )
  return {
      "train": {"x": x_train, "label": y_train},
      "valid": {"x": x_valid, "label": y_valid},
      "test": {"x": x_test, "label": y_test},
  }


def permuted_tasks(seed: int, eval_split: str) -> list[Task]:
  data = digit_splits(seed)
  rng = np.random.default_rng([seed, 7])
  perms = [np.arange(64)] + [rng.permutation(64) for _ in range(NUM_TASKS - 1)]
  pick = lambda d, p: {"x": d["x"][:, p], "label": d["label"]}
  return [
      Task(f"perm{t}", pick(data["train"], p), pick(data[eval_split], p))
      for t, p in enumerate(perms)
  ]


def split_tasks(seed: int, eval_split: str) -> list[Task]:
  data = digit_splits(seed)
  pick = lambda d, c: {k: v[np.isin(d["label"], c)] for k, v in d.items()}
  classes = [(2 * t, 2 * t + 1) for t in range(NUM_TASKS)]
  return [
      Task(f"classes{a}{b}", pick(data["train"], (a, b)), pick(data[eval_split], (a, b)))
      for a, b in classes
  ]


def joint_row(objective, tasks, config: ContinualConfig) -> list[float]:
  """Reference: one model trained on the union of all tasks (same total steps), per-task metric."""
  union = {k: np.concatenate([t.train[k] for t in tasks]) for k in tasks[0].train}
  steps = config.steps_per_task * len(tasks)
  cfg = ContinualConfig(**{**vars(config), "method": "finetune", "steps_per_task": steps})
  result = continual.run_sequence(objective, [Task("joint", union, union)], cfg)
  _, eval_step = continual._compiled_steps(objective, cfg.learning_rate)
  return [
      continual.evaluate(eval_step, result.state, t.eval, cfg.eval_batch, "accuracy") for t in tasks
  ]


def summary(values):
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def run_protocol(name, make_tasks, objective, base: ContinualConfig, args) -> dict:
  t0 = time.perf_counter()
  # lambda for EWC and online EWC: average VALIDATION accuracy of the tuning seed's run.
  tune_tasks = make_tasks(args.tune_seed, "valid")
  tuning, chosen = {}, {}
  for method in ("ewc", "online_ewc"):
    scores = {}
    for lam in args.lambdas:
      cfg = ContinualConfig(
          **{**vars(base), "method": method, "ewc_lambda": lam, "seed": args.tune_seed}
      )
      scores[str(lam)] = continual.run_sequence(objective, tune_tasks, cfg).average_accuracy
    tuning[method] = scores
    chosen[method] = float(max(scores, key=scores.get))
  methods = {
      "finetune": {"method": "finetune"},
      "ewc": {"method": "ewc", "ewc_lambda": chosen["ewc"]},
      "online_ewc": {"method": "online_ewc", "ewc_lambda": chosen["online_ewc"]},
      "replay": {"method": "replay", "replay_capacity": 50 * NUM_TASKS},
  }
  out = {"lambda_validation": tuning, "lambda_chosen": chosen, "methods": {}}
  for method, overrides in methods.items():
    rows = []
    for seed in args.seeds:
      cfg = ContinualConfig(**{**vars(base), **overrides, "seed": seed})
      r = continual.run_sequence(objective, make_tasks(seed, "test"), cfg)
      row = {
          "seed": seed,
          "average_accuracy": r.average_accuracy,
          "backward_transfer": r.backward_transfer,
          "forgetting": r.forgetting,
          "matrix": np.round(r.matrix, 4).tolist(),
          "train_seconds": round(r.train_seconds, 2),
      }
      if r.buffer is not None:
        labels = r.buffer.contents()["label"]
        row["buffer_labels"] = np.bincount(labels, minlength=10).tolist()
      rows.append(row)
    out["methods"][method] = {
        "average_accuracy": summary([x["average_accuracy"] for x in rows]),
        "backward_transfer": summary([x["backward_transfer"] for x in rows]),
        "forgetting": summary([x["forgetting"] for x in rows]),
        "seeds": rows,
    }
  joint = [np.mean(joint_row(objective, make_tasks(s, "test"), base)) for s in args.seeds]
  out["joint_reference_accuracy"] = summary(joint)
  out["seconds"] = round(time.perf_counter() - t0, 1)
  print(f"[{name}] done in {out['seconds']} s", file=sys.stderr, flush=True)
  return out


LM_DOMAINS = ("asyncio", "email", "json")


def lm_targets(batch):
  """Next-byte labels of `lm_objective` (inputs are tokens[:, :-1])."""
  return batch["tokens"][:, 1:]


def lm_tasks(
    seq_len: int, train_windows: int, eval_windows: int, seed: int, eval_split: str
) -> list[Task]:
  """Per stdlib sub-package: its `.py` files concatenated (sorted paths); by position the first
  80% of the bytes train (random windows), the next 10% are "valid", the last 10% "test"
  (consecutive windows). The packages are too small for `text.load_text_splits`' file-level
  split (json/ has 5 files), hence by position."""
  from nexus_jax.data.datasets import text  # noqa: PLC0415

  tasks = []
  for i, domain in enumerate(LM_DOMAINS):
    root = text.stdlib_dir() / domain
    data = np.frombuffer(b"".join((root / f).read_bytes() for f in text.list_files(root)), np.uint8)
    a, b = int(0.8 * len(data)), int(0.9 * len(data))
    train = text.random_windows(data[:a], seq_len + 1, train_windows, seed * 100 + i)
    held = data[a:b] if eval_split == "valid" else data[b:]
    evals = text.windows(held, seq_len + 1, eval_windows)
    tasks.append(
        Task(domain, {"tokens": train.astype(np.int32)}, {"tokens": evals.astype(np.int32)})
    )
  return tasks


def run_lm_protocol(args) -> dict:
  """Domain-incremental byte LM; the matrix holds test bits/byte (lower is better, BWT > 0 is
  forgetting). lambda: the grid `--lm_lambdas`, the tuning seed's run scored on the valid bytes."""
  from nexus_jax.models.lm import LanguageModel  # noqa: PLC0415
  from nexus_jax.models.seq_objectives import lm_objective  # noqa: PLC0415

  t0 = time.perf_counter()
  model = LanguageModel.from_preset("tiny", vocab_size=256, num_experts=0, mlp_dim=256, max_len=0)
  objective = lm_objective(model)
  base = ContinualConfig(
      steps_per_task=args.lm_steps,
      batch_size=16,
      learning_rate=3e-3,
      fisher_variant=args.fisher_variant,
      fisher_examples=128,
      gamma=args.gamma,
      replay_batch=16,
      eval_batch=64,
  )
  windows = args.lm_steps * 16
  run = lambda tasks, **kw: continual.run_sequence(
      objective,
      tasks,
      ContinualConfig(**{**vars(base), **kw}),
      targets_fn=lm_targets,
      metric="bits_per_token",
  )
  tune = lm_tasks(args.lm_seq_len, windows, 64, args.tune_seed, "valid")
  scores = {
      str(lam): run(tune, method="ewc", ewc_lambda=lam, seed=args.tune_seed).average_accuracy
      for lam in args.lm_lambdas
  }
  lam = float(min(scores, key=scores.get))  # mean bits/byte after the last task: lower is better
  methods = {
      "finetune": {"method": "finetune"},
      "ewc": {"method": "ewc", "ewc_lambda": lam},
      "replay": {"method": "replay", "replay_capacity": 300},
  }
  out = {
      "model": "LanguageModel tiny, dense (2 layers, d 64, mlp 256), bytes",
      "domains": list(LM_DOMAINS),
      "metric": "test bits/byte (matrix R[i, j] after training domain i, on domain j)",
      "ewc_lambda_validation_mean_bits": scores,
      "ewc_lambda_chosen": lam,
      "methods": {},
  }
  for method, overrides in methods.items():
    rows = []
    for seed in args.lm_seeds:
      r = run(lm_tasks(args.lm_seq_len, windows, 64, seed, "test"), **overrides, seed=seed)
      rows.append(
          {
              "seed": seed,
              "mean_bits_after_last": r.average_accuracy,
              "earlier_domains_bits_after_last": float(np.mean(r.matrix[-1, :-1])),
              "backward_transfer_bits": r.backward_transfer,
              "matrix": np.round(r.matrix, 4).tolist(),
              "train_seconds": round(r.train_seconds, 2),
          }
      )
    out["methods"][method] = {
        k: summary([x[k] for x in rows])
        for k in (
            "mean_bits_after_last",
            "earlier_domains_bits_after_last",
            "backward_transfer_bits",
        )
    } | {"seeds": rows}
  out["seconds"] = round(time.perf_counter() - t0, 1)
  print(f"[lm] done in {out['seconds']} s", file=sys.stderr, flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--tune_seed", type=int, default=100)
  p.add_argument("--lambdas", type=float, nargs="+", default=[3.0, 10.0, 30.0, 100.0, 300.0])
  p.add_argument("--steps_per_task", type=int, default=800)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--gamma", type=float, default=0.9)
  p.add_argument("--fisher_variant", default="sampled")
  p.add_argument("--lm", action="store_true", help="also run the byte-LM protocol")
  p.add_argument("--lm_only", action="store_true", help="only the byte-LM protocol")
  p.add_argument("--lm_steps", type=int, default=200)
  p.add_argument("--lm_seq_len", type=int, default=64)
  p.add_argument("--lm_seeds", type=int, nargs="+", default=[0])
  p.add_argument("--lm_lambdas", type=float, nargs="+", default=[30.0, 300.0, 3000.0])
  p.add_argument("--quick", action="store_true", help="1 seed, 100 steps, 2 lambdas")
  args = p.parse_args()
  if args.quick:
    args.seeds, args.steps_per_task, args.lambdas = [0], 100, [10.0, 100.0]
    args.lm_steps, args.lm_lambdas = 30, [100.0]
  base = ContinualConfig(
      steps_per_task=args.steps_per_task,
      batch_size=32,
      optimizer="adam",
      learning_rate=1e-3,
      gamma=args.gamma,
      fisher_variant=args.fisher_variant,
      fisher_examples=500,
      replay_batch=32,
  ).validate()
  objective = mlp_objective(args.hidden)
  t0 = time.perf_counter()
  result = {
      "benchmark": "continual_learning",
      "machine": machine_info(),
      "config": {
          **{k: v for k, v in vars(args).items()},
          "model": f"MLP 64 -> {args.hidden} (relu) -> 10",
          "continual_config": vars(base),
          "data": "sklearn digits, stratified 60/15/25 train/valid/test per seed",
          "replay": "reservoir capacity 250 (50 per task x 5), 32 replayed rows per batch of 32",
          "lambda_selection": (
              "grid --lambdas; the tuning seed's own split and permutations; best average "
              "accuracy on its validation rows"
          ),
      },
      "protocols": {},
  }
  if args.lm or args.lm_only:
    result["protocols"]["byte_lm_stdlib"] = run_lm_protocol(args)
  if not args.lm_only:
    perm = run_protocol("permuted", permuted_tasks, objective, base, args)
    split = run_protocol("split", split_tasks, objective, base, args)
    result["protocols"]["permuted_digits"] = perm
    result["protocols"]["split_digits_class_incremental"] = split
    acc = lambda proto, m: proto["methods"][m]["average_accuracy"]["mean"]
    result["targets"] = {
        "permuted_ewc_minus_finetune": acc(perm, "ewc") - acc(perm, "finetune"),
        "permuted_ewc_at_least_finetune_plus_0.15": bool(
            acc(perm, "ewc") >= acc(perm, "finetune") + 0.15
        ),
        "split_replay_average_accuracy": acc(split, "replay"),
        "split_replay_at_least_0.85": bool(acc(split, "replay") >= 0.85),
        "split_ewc_average_accuracy": acc(split, "ewc"),
    }
  result["total_seconds"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
