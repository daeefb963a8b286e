"""LM training throughput and model-FLOP utilisation (MFU) against this machine's matmul peak.

    python benchmarks/lm_train_mfu.py [--embed_dim 512] [--layers 4] [--seq 256] [--batch 8]

Measures the peak first, in the same run: the best float32 `[n, n] @ [n, n]` matmul throughput
(jitted, n in --peak_sizes). Then times jitted AdamW training steps of a dense byte-level
`LanguageModel` (and, with --moe_experts > 0, the MoE variant with the same active params).
Model FLOPs per token = 6 * (non-embedding params used per token + output head) + 12 * layers *
seq * embed_dim (attention scores and values, causal not discounted), the PaLM convention; MFU =
achieved model FLOP/s / measured peak. Prints one JSON object: machine, versions, config, results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.models.lm import LanguageModel, active_params  # noqa: E402
from nexus_jax.models.seq_objectives import token_cross_entropy  # noqa: E402


def matmul_peak(sizes, repeats=5) -> dict:
  best = {}
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      times.append(time.perf_counter() - t)
    best[n] = 2 * n ** 3 / min(times)
  return {"flops_per_s": max(best.values()), "by_size": {str(k): round(v / 1e9, 2)
                                                          for k, v in best.items()}}


def train_step_time(model, batch, seq, steps) -> tuple[float, int]:
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq + 1), 0, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:, :-1])["params"]
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, tokens[:, :-1])
      return token_cross_entropy(logits, tokens[:, 1:], jnp.ones((batch, seq)))[0]
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  params, opt = step(params, opt)  # compile
  jax.block_until_ready(params)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, opt = step(params, opt)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
  return statistics.median(times), active_params(model, params)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--embed_dim", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--moe_experts", type=int, default=0)
  ap.add_argument("--peak_sizes", type=int, nargs="+", default=[512, 1024, 2048])
  args = ap.parse_args()

  peak = matmul_peak(args.peak_sizes)
  d = args.embed_dim
  kw = dict(vocab_size=256, num_layers=args.layers, embed_dim=d, num_heads=args.heads,
            num_kv_heads=args.heads)
  models = {"dense": LanguageModel(**kw, num_experts=0, mlp_dim=4 * d)}
  if args.moe_experts:  # top-2 of experts of width 2d: the dense model's active params
    models["moe"] = LanguageModel(**kw, num_experts=args.moe_experts, moe_top_k=2, mlp_dim=2 * d)
  results = {}
  for name, model in models.items():
    seconds, active = train_step_time(model, args.batch, args.seq, args.steps)
    embed = 256 * d
    flops_per_token = 6 * (active - embed) + 12 * args.layers * args.seq * d
    tokens = args.batch * args.seq
    achieved = flops_per_token * tokens / seconds
    results[name] = {"step_seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                     "active_params": active, "model_tflops_per_s": round(achieved / 1e12, 4),
                     "mfu": round(achieved / peak["flops_per_s"], 4)}
  print(json.dumps({
      "benchmark": "lm_train_mfu", "machine": machine_info(),
      "note": "CPU shared with other jobs; peak and step times measured under the same load",
      "config": vars(args), "matmul_peak_gflops": round(peak["flops_per_s"] / 1e9, 2),
      "matmul_peak_by_size_gflops": peak["by_size"], "results": results}))


if __name__ == "__main__":
  main()
