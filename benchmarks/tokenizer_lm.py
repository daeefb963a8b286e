"""Byte-level vs BPE language models at equal training compute: test bits/byte on the same bytes.

    python benchmarks/tokenizer_lm.py [--steps 300] [--batch 16] [--byte_seq_len 128]
                                      [--vocab_sizes 1024 4096] [--test_bytes 131072]

Runs the `lm` experiment (`python -m experiments.run` in a subprocess, as a user runs it: the
`configs/lm.py` MoE `LanguageModel`, trained on the standard library's .py files, no dense
baseline) once per tokenizer: bytes, then a byte-level
BPE with each of `--vocab_sizes` tokens trained on the training split. Compute is equalised by
training BYTES: every variant takes the same optimizer steps at the same batch size, with
`seq_len = round(byte_seq_len / bytes per token)` tokens (bytes per token of the trained BPE,
measured on the first 2 MB of the training split), so a step reads about `batch * byte_seq_len`
training bytes. The transformer body is the same; only the embedding and the LM head grow with
the vocabulary, so FLOPs per step are not equal: they are reported as an estimate, 6 * tokens *
(active params - the input embedding table, a lookup) + 6 * tokens * layers * seq_len * width
(causal attention scores), next to the measured train seconds. All variants score exactly the
same `--test_bytes` test bytes (bits/byte = test nats / (log 2 * bytes)), as does xz -9e.
Prints one JSON object: machine, settings, xz, and per variant the tokenizer, tokens / bytes per
step, parameters, FLOPs estimate, tokenizer training seconds, train seconds and test bits/byte.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from configs.lm import get_config  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.data.datasets.byte_lm import workdir_tokenizer  # noqa: E402

SAMPLE_BYTES = 2_000_000  # of the training split, to measure bytes per token for seq_len


def variant_overrides(args, kind: str, vocab_size: int, seq_len: int) -> dict:
  """The `--config.<field>` values of one variant (the rest is configs/lm.py's default)."""
  return {
      "data.tokenizer": kind,
      "data.vocab_size": vocab_size,
      "data.seq_len": seq_len,
      "data.test_bytes": args.test_bytes,
      "data.valid_bytes": args.valid_bytes,
      "model.train_dense_baseline": False,
      "train.batch_size": args.batch,
      "train.num_steps": args.steps,
      "train.eval_every_steps": args.steps,
      "train.log_every_steps": max(args.steps // 4, 1),
      "train.progress": False,
      "train.tensorboard": False,
      "sample.num_bytes": 64,
  }


def variant_config(args, kind: str, vocab_size: int, seq_len: int):
  c = get_config()
  for path, value in variant_overrides(args, kind, vocab_size, seq_len).items():
    section, field = path.split(".")
    c[section][field] = value
  return c


def run_lm(overrides: dict, workdir: str) -> dict:
  """`python -m experiments.run --config configs/lm.py` with `overrides` in `workdir` (a separate
  process, as a user runs it); its results.json."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config", os.path.join(root, "configs", "lm.py")]
      + args
      + ["--workdir", workdir],
      cwd=root,
      check=True,
      stdout=subprocess.DEVNULL,
  )
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def flops_per_step(c, params_active: int, vocab: int) -> float:
  """6 * tokens * (active params - input embedding) + causal attention scores (see docstring)."""
  tokens = c.train.batch_size * c.data.seq_len
  dense = params_active - vocab * c.model.embed_dim
  attention = 6 * c.model.num_layers * c.data.seq_len * c.model.embed_dim
  return 6.0 * tokens * dense + tokens * attention


def run_variant(args, root: str, splits, kind: str, vocab_size: int) -> dict:
  workdir = os.path.join(root, f"{kind}_{vocab_size}")
  os.makedirs(workdir)
  seq, tokenizer_seconds = args.byte_seq_len, 0.0
  if kind != "byte":
    probe = variant_config(args, kind, vocab_size, 1)
    tok, tokenizer_seconds = workdir_tokenizer(probe.data, workdir, splits["train"])
    sample = splits["train"][:SAMPLE_BYTES].tobytes()
    seq = max(2, round(args.byte_seq_len * len(tok.encode(sample)) / len(sample)))
  c = variant_config(args, kind, vocab_size, seq)
  t0 = time.perf_counter()
  r = run_lm(variant_overrides(args, kind, vocab_size, seq), workdir)  # reuses tokenizer.json
  bpt = r["tokenizer"]["bytes_per_token"]
  vocab = r["tokenizer"]["vocab_size"]
  active = r["params"]["moe"]["active_per_byte"]
  return {
      "tokenizer": {**r["tokenizer"], "train_seconds": round(tokenizer_seconds, 1)},
      "seq_len_tokens": seq,
      "tokens_per_step": c.train.batch_size * seq,
      "train_bytes_per_step": round(
          c.train.batch_size * seq * r["corpus"]["bytes_per_token"]["train"]
      ),
      "params": {"total": r["params"]["moe"]["total"], "active_per_token": active},
      "approx_gflops_per_step": round(flops_per_step(c, active, vocab) / 1e9, 3),
      "train_seconds": r["train"]["moe"]["train_seconds"],
      "tokens_per_second": r["train"]["moe"]["tokens_per_second"],
      "test_bits_per_byte": round(r["test_bits_per_byte"]["moe"], 4),
      "test_bytes_scored": r["corpus"]["test_bytes_scored"],
      "test_tokens_scored": r["corpus"]["test_tokens_scored"],
      "xz_9e": r["test_bits_per_byte"]["xz_9e"],
      "test_bytes_per_token": bpt,
      "data_seconds": r["corpus"]["data_seconds"],
      "wall_seconds": round(time.perf_counter() - t0 + tokenizer_seconds, 1),
      "sample": r["sample"],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300, help="optimizer steps of every variant")
  p.add_argument("--batch", type=int, default=16, help="windows per step")
  p.add_argument("--byte_seq_len", type=int, default=128, help="bytes per window (byte model)")
  p.add_argument("--vocab_sizes", type=int, nargs="+", default=[1024, 4096])
  p.add_argument("--test_bytes", type=int, default=131_072)
  p.add_argument("--valid_bytes", type=int, default=16_384)
  args = p.parse_args()
  if args.steps < 1 or args.batch < 1 or args.byte_seq_len < 2:
    p.error("--steps and --batch must be >= 1 and --byte_seq_len >= 2.")
  base = get_config()
  splits, _ = text.load_text_splits(
      None, valid_fraction=base.data.valid_fraction, test_fraction=base.data.test_fraction
  )
  out = {"machine": machine_info(), "settings": vars(args), "variants": {}}
  with tempfile.TemporaryDirectory() as root:
    out["variants"]["byte"] = run_variant(args, root, splits, "byte", 0)
    for v in args.vocab_sizes:
      out["variants"][f"bpe_{v}"] = run_variant(args, root, splits, "bpe", v)
  xz = {r.pop("xz_9e") for r in out["variants"].values()}
  scored = {r["test_bytes_scored"] for r in out["variants"].values()}
  assert len(xz) == 1 and len(scored) == 1, "variants scored different test bytes"
  out["xz_9e_bits_per_byte"] = round(xz.pop(), 4)
  out["model"] = {
      k: base.model[k] for k in ("num_layers", "embed_dim", "num_heads", "mlp_dim", "num_experts")
  }
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
