"""The PyTorch side of `benchmarks/tabular_vs_rtdl.py`: rtdl-revisiting-models' FT-Transformer on CPU.

Run by `tabular_vs_rtdl.py` in the torch interpreter (`--torch-python`, a separate venv with
`torch==2.13.0 rtdl-revisiting-models numpy scikit-learn`); imports neither jax nor nexus_jax.

    python benchmarks/tabular_vs_rtdl_torch.py --data DIR --config JSON

It reads the arrays the driver saved in DIR (`{train,valid,test}_{x_num,x_cat}.npy`, `train_y.npy`),
prints one JSON line {"ready": ...} (or {"error": ...} and exits 2 when torch/rtdl is missing), then
answers one JSON command per stdin line with one JSON line on stdout:

    {"cmd": "train", "start": s, "steps": k}  -> {"seconds", "cpu_seconds" (of this process) of the k steps, "loss": mean}
    {"cmd": "predict", "split": "test"}       -> {"path": DIR/rtdl_test_proba.npy, "seconds": ...}
    {"cmd": "quit"}

Batches are those of `nexus_jax.train.data.ArrayDataset.train_batch` (epoch e uses
`np.random.default_rng([seed, e]).permutation(n)`), so both models see the same rows in the same order.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def reply(obj: dict) -> None:
  sys.stdout.write(json.dumps(obj) + "\n")
  sys.stdout.flush()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="folder with the .npy arrays")
  parser.add_argument(
      "--config",
      required=True,
      help="JSON: n_blocks, d_block, n_heads, attention_dropout, "
      "ffn_dropout, batch_size, learning_rate, weight_decay, seed, threads",
  )
  args = parser.parse_args()
  cfg = json.loads(args.config)
  try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from rtdl_revisiting_models import FTTransformer
  except ImportError as e:
    reply({"error": f"{type(e).__name__}: {e}", "python": sys.executable})
    sys.exit(2)
  import rtdl_revisiting_models

  data = pathlib.Path(args.data)
  load = lambda name: np.load(data / f"{name}.npy")  # noqa: E731
  train_num, train_cat, train_y = (
      load("train_x_num"),
      load("train_x_cat"),
      load("train_y").astype(np.float32),
  )
  if cfg.get("threads"):
    torch.set_num_threads(int(cfg["threads"]))
  torch.manual_seed(int(cfg["seed"]))
  cards = [int(c) for c in cfg["cat_cardinalities"]]
  model = FTTransformer(
      n_cont_features=train_num.shape[1],
      cat_cardinalities=cards,
      d_out=1,
      n_blocks=int(cfg["n_blocks"]),
      d_block=int(cfg["d_block"]),
      attention_n_heads=int(cfg["n_heads"]),
      attention_dropout=float(cfg["attention_dropout"]),
      ffn_d_hidden=None,
      ffn_d_hidden_multiplier=4 / 3,
      ffn_dropout=float(cfg["ffn_dropout"]),
      residual_dropout=0.0,
  )
  optimizer = torch.optim.AdamW(
      model.make_parameter_groups(),
      lr=float(cfg["learning_rate"]),
      weight_decay=float(cfg["weight_decay"]),
  )
  n, bs, seed = len(train_y), int(cfg["batch_size"]), int(cfg["seed"])
  steps_per_epoch = max(n // bs, 1)
  perms: dict[int, np.ndarray] = {}

  def batch_index(step: int) -> np.ndarray:
    epoch, offset = divmod(step, steps_per_epoch)
    if epoch not in perms:
      perms.clear()
      perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    return perms[epoch][offset * bs : (offset + 1) * bs]

  reply(
      {
          "ready": True,
          "torch": torch.__version__,
          "rtdl_revisiting_models": getattr(rtdl_revisiting_models, "__version__", "?"),
          "threads": torch.get_num_threads(),
          "tokens": 1 + train_num.shape[1] + len(cards),
          "parameters": sum(p.numel() for p in model.parameters()),
      }
  )
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      break
    if cmd["cmd"] == "train":
      model.train()
      losses = []
      t0, c0 = time.perf_counter(), time.process_time()
      for step in range(int(cmd["start"]), int(cmd["start"]) + int(cmd["steps"])):
        idx = batch_index(step)
        x_num, x_cat = torch.from_numpy(train_num[idx]), torch.from_numpy(
            train_cat[idx].astype(np.int64)
        )
        y = torch.from_numpy(train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x_num, x_cat).squeeze(-1), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
      reply(
          {
              "seconds": time.perf_counter() - t0,
              "cpu_seconds": time.process_time() - c0,
              "loss": float(np.mean(losses)),
          }
      )
    elif cmd["cmd"] == "predict":
      split = cmd["split"]
      x_num, x_cat = load(f"{split}_x_num"), load(f"{split}_x_cat").astype(np.int64)
      model.eval()
      t0 = time.perf_counter()
      out = []
      with torch.inference_mode():
        for s in range(0, len(x_num), 4096):
          logits = model(
              torch.from_numpy(x_num[s : s + 4096]), torch.from_numpy(x_cat[s : s + 4096])
          )
          out.append(torch.sigmoid(logits.squeeze(-1)).numpy())
      path = data / f"rtdl_{split}_proba.npy"
      np.save(path, np.concatenate(out).astype(np.float64))
      reply({"path": str(path), "seconds": time.perf_counter() - t0})
    else:
      reply({"error": f"unknown command {cmd!r}"})


if __name__ == "__main__":
  main()
