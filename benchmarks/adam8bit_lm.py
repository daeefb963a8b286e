"""8-bit AdamW vs float32 AdamW on a byte-level LM: valid/test bits per byte and optimizer-state bytes.

    python benchmarks/adam8bit_lm.py [--steps 400] [--batch_size 32] [--workdir DIR]

Trains the `configs/lm.py` model (byte-level MoE `LanguageModel` on the standard library's .py
files) three times from the same seed on the same batches: `optim.name="adamw"`, `"adamw8bit"`
(`nexus_jax/train/adam8bit.py`: both moments as block-wise uint8 codes; the default exclusion
keeps the MoE routers float32) and `"adamw8bit"` that also keeps the embeddings float32. Reports per optimizer the final (last-step) valid and test bits/byte, the optimizer-state
bytes from the state's dtypes and from `jax.jit(tx.init).lower(params).compile().memory_analysis()`,
the training seconds, and the differences 8-bit minus float32. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from configs.lm import get_config  # noqa: E402
from nexus_jax.data.datasets.byte_lm import load_byte_lm_data  # noqa: E402
from nexus_jax.models.lm import count_params, lm_from_config  # noqa: E402
from nexus_jax.models.seq_objectives import lm_objective  # noqa: E402
from nexus_jax.train.adam8bit import state_bytes  # noqa: E402
from nexus_jax.train.loop import fit  # noqa: E402
from nexus_jax.train.optim import build_optimizer  # noqa: E402


def run(steps: int, batch_size: int, workdir: str) -> dict:
  config = get_config()
  config.train.num_steps = steps
  config.train.batch_size = batch_size
  config.train.eval_every_steps = max(steps // 4, 1)
  config.train.progress = False
  config.train.tensorboard = False
  config.model.train_dense_baseline = False
  _, _, train, valid, test, test_bytes, _ = load_byte_lm_data(config)
  model = lm_from_config(config.model)
  out = {}
  variants = {
      "adamw": ("adamw", ()),
      "adamw8bit": ("adamw8bit", tuple(config.optim.adam8bit.exclude)),
      "adamw8bit_embeddings_float32": ("adamw8bit", ("embed", "router")),
  }
  for name, (optimizer, exclude) in variants.items():
    config.optim.name = optimizer
    config.optim.adam8bit.exclude = exclude
    result = fit(lm_objective(model), train, valid, config, os.path.join(workdir, name))
    state = result.state
    tx, _ = build_optimizer(config.optim, steps)
    compiled = jax.jit(tx.init).lower(state.params).compile().memory_analysis()
    bpb = lambda data: result.trainer.evaluate(state, data)[0]["loss"] / math.log(2.0)
    out[name] = {
        "valid_bits_per_byte": round(bpb(valid), 4),
        "test_bits_per_byte": round(bpb(test), 4),
        "state_bytes": state_bytes(state.opt_state),
        "state_bytes_compiled": int(compiled.output_size_in_bytes),
        "train_seconds": round(result.train_seconds, 1),
    }
  params = count_params(state.params)
  a = out["adamw"]
  change = lambda b, k: round(b[k] - a[k], 4)
  for name in ("adamw8bit", "adamw8bit_embeddings_float32"):
    b = out[name]
    b["valid_bits_per_byte_change"] = change(b, "valid_bits_per_byte")
    b["test_bits_per_byte_change"] = change(b, "test_bits_per_byte")
    b["state_bytes_ratio"] = round(b["state_bytes"] / a["state_bytes"], 4)
    b["state_bytes_ratio_compiled"] = round(
        b["state_bytes_compiled"] / a["state_bytes_compiled"], 4
    )
    b["train_seconds_ratio"] = round(b["train_seconds"] / a["train_seconds"], 3)
  return {
      "benchmark": "adam8bit_lm",
      "machine": machine_info(),
      "steps": steps,
      "batch_size": batch_size,
      "seq_len": int(config.data.seq_len),
      "params": params,
      "float32_param_bytes": 4 * params,
      "test_bytes_scored": len(test_bytes) - 1,
      **out,
      "valid_bits_per_byte_change": round(b["valid_bits_per_byte"] - a["valid_bits_per_byte"], 4),
      "test_bits_per_byte_change": round(b["test_bits_per_byte"] - a["test_bits_per_byte"], 4),
      "state_bytes_ratio": round(b["state_bytes"] / a["state_bytes"], 4),
      "state_bytes_ratio_compiled": round(b["state_bytes_compiled"] / a["state_bytes_compiled"], 4),
      "train_seconds_ratio": round(b["train_seconds"] / a["train_seconds"], 3),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--workdir", default="", help="output folder (default: a temporary one)")
  args = parser.parse_args()
  if args.workdir:
    print(json.dumps(run(args.steps, args.batch_size, args.workdir), indent=2))
  else:
    with tempfile.TemporaryDirectory() as workdir:
      print(json.dumps(run(args.steps, args.batch_size, workdir), indent=2))


if __name__ == "__main__":
  main()
