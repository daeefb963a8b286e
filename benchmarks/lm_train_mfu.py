"""LM training throughput and model-FLOP utilisation (MFU) against this machine's matmul peak.

    python benchmarks/lm_train_mfu.py [--embed_dim 512] [--layers 4] [--seq 256] [--batch 8]
        [--rounds 5] [--steps 3] [--compute_dtype float32|bfloat16] [--moe_experts 0]

Times jitted AdamW training steps of a dense byte-level `LanguageModel` (and, with --moe_experts
> 0, the MoE variant with the same active params), interleaved with the matmul peak so that the
load of a shared machine moves both alike: each of --rounds rounds measures the peak (the best
`[n, n] @ [n, n]` throughput over n in --peak_sizes, in --compute_dtype), then --steps steps per
model (their median). MFU per round = model FLOP/s of its steps / its peak; the JSON reports
every round and the medians. The same ratio per second of CPU time this process received
(`mfu_per_cpu_second`) is reported next to it: on a shared CPU it does not depend on how much of
the machine the other jobs leave us.

Model FLOPs per token = 6 * (non-embedding params used per token, output head included) +
12 * layers * seq * embed_dim (attention scores and values, causal not discounted), the PaLM
convention; the compiled step's own FLOP count (XLA cost analysis, unrolled layers) is reported
next to it as a check that nothing is recomputed. Prints one JSON object: machine, versions,
config, results.
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
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.models.lm import LanguageModel, active_params  # noqa: E402
from nexus_jax.models.seq_objectives import token_cross_entropy  # noqa: E402


def peak_fns(sizes, dtype):
  """Jitted, warmed-up `x @ x` per size: `{n: (fn, x)}`."""
  fns = {}
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    fns[n] = (f, a)
  return fns


def matmul_peak(fns, repeats=5) -> dict:
  """Best FLOP/s over sizes and repeats (one measurement of the peak), per wall second and per
  second of CPU time used by this process (all threads)."""
  best, best_cpu = {}, {}
  for n, (f, a) in fns.items():
    times, cpu = [], []
    for _ in range(repeats):
      t, c = time.perf_counter(), time.process_time()
      f(a).block_until_ready()
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    best[n] = 2 * n**3 / min(times)
    best_cpu[n] = 2 * n**3 / max(min(cpu), 1e-9)
  return {
      "flops_per_s": max(best.values()),
      "flops_per_cpu_s": max(best_cpu.values()),
      "by_size_gflops": {str(k): round(v / 1e9, 2) for k, v in best.items()},
  }


def make_step(model, batch, seq):
  """(jitted AdamW step, params, opt state, active params, compiled GFLOP of the unrolled step)."""
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq + 1), 0, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:, :-1])["params"]
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  def step_fn(model):
    def step(params, opt):
      def loss_fn(p):
        logits, _ = model.apply({"params": p}, tokens[:, :-1])
        return token_cross_entropy(logits, tokens[:, 1:], jnp.ones((batch, seq)))[0]

      grads = jax.grad(loss_fn)(params)
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt

    return step

  # XLA's cost analysis counts a scanned layer once, so count FLOPs on the unrolled model.
  unrolled = model.clone(scan_layers=False)
  unrolled_params = jax.jit(unrolled.init)(jax.random.PRNGKey(1), tokens[:, :-1])["params"]
  cost = jax.jit(step_fn(unrolled)).lower(unrolled_params, tx.init(unrolled_params)).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  step = jax.jit(step_fn(model), donate_argnums=(0, 1))
  params, opt = step(params, opt)  # compile
  jax.block_until_ready(params)
  return step, params, opt, active_params(model, params), cost["flops"] / 1e9


def time_steps(state, steps) -> tuple[float, float]:
  """Median wall seconds and CPU seconds (this process, all threads) of `steps` training steps;
  updates `state` (step, params, opt) in place."""
  step, params, opt = state["step"], state["params"], state["opt"]
  times, cpu = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    params, opt = step(params, opt)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  state["params"], state["opt"] = params, opt
  return statistics.median(times), statistics.median(cpu)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--embed_dim", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=5, help="peak + steps rounds (interleaved)")
  ap.add_argument("--steps", type=int, default=3, help="timed training steps per round")
  ap.add_argument(
      "--compute_dtype",
      default="float32",
      choices=["float32", "bfloat16"],
      help="activation/matmul dtype of the model and of the peak (params float32)",
  )
  ap.add_argument("--moe_experts", type=int, default=0)
  ap.add_argument("--peak_sizes", type=int, nargs="+", default=[512, 1024, 2048])
  args = ap.parse_args()

  dtype = jnp.dtype(args.compute_dtype)
  d = args.embed_dim
  kw = dict(
      vocab_size=256,
      num_layers=args.layers,
      embed_dim=d,
      num_heads=args.heads,
      num_kv_heads=args.heads,
      dtype=dtype,
  )
  models = {"dense": LanguageModel(**kw, num_experts=0, mlp_dim=4 * d)}
  if args.moe_experts:  # top-2 of experts of width 2d: the dense model's active params
    models["moe"] = LanguageModel(**kw, num_experts=args.moe_experts, moe_top_k=2, mlp_dim=2 * d)
  load_start = os.getloadavg()
  peaks = peak_fns(args.peak_sizes, dtype)
  states, info = {}, {}
  for name, model in models.items():
    step, params, opt, active, compiled_gflop = make_step(model, args.batch, args.seq)
    states[name] = {"step": step, "params": params, "opt": opt}
    flops_per_token = 6 * (active - 256 * d) + 12 * args.layers * args.seq * d
    info[name] = {
        "active_params": active,
        "model_gflop_per_step": flops_per_token * args.batch * args.seq / 1e9,
        "compiled_gflop_per_step": round(compiled_gflop, 2),
    }

  rounds = []
  for _ in range(args.rounds):
    row = {"peak": matmul_peak(peaks)}
    for name in models:
      row[name] = time_steps(states[name], args.steps)
    rounds.append(row)

  tokens = args.batch * args.seq
  peak_gflops = [r["peak"]["flops_per_s"] / 1e9 for r in rounds]
  results = {}
  peak_cpu = [r["peak"]["flops_per_cpu_s"] / 1e9 for r in rounds]
  for name in models:
    gflop = info[name]["model_gflop_per_step"]
    seconds = [r[name][0] for r in rounds]
    cpu_seconds = [r[name][1] for r in rounds]
    mfu = [gflop / s / p for s, p in zip(seconds, peak_gflops)]
    # The same ratio per CPU-second this process got: insensitive to its share of a shared CPU.
    mfu_cpu = [gflop / c / p for c, p in zip(cpu_seconds, peak_cpu)]
    results[name] = {
        **info[name],
        "model_gflop_per_step": round(gflop, 2),
        "step_seconds_median": round(statistics.median(seconds), 4),
        "tokens_per_s_median": round(tokens / statistics.median(seconds), 1),
        "model_gflops_median": round(gflop / statistics.median(seconds), 2),
        "mfu_median": round(statistics.median(mfu), 4),
        "mfu_per_round": [round(m, 4) for m in mfu],
        "step_seconds_per_round": [round(s, 4) for s in seconds],
        "step_cpu_seconds_per_round": [round(c, 3) for c in cpu_seconds],
        "mfu_per_cpu_second_median": round(statistics.median(mfu_cpu), 4),
        "mfu_per_cpu_second_per_round": [round(m, 4) for m in mfu_cpu],
    }
  print(
      json.dumps(
          {
              "benchmark": "lm_train_mfu",
              "machine": machine_info(),
              "load_avg_start_end": [list(load_start), list(os.getloadavg())],
              "note": "peak and training steps measured in alternating rounds under the same load",
              "config": vars(args),
              "matmul_peak_gflops_median": round(statistics.median(peak_gflops), 2),
              "matmul_peak_gflops_per_round": [round(p, 2) for p in peak_gflops],
              "matmul_peak_by_size_gflops_per_round": [r["peak"]["by_size_gflops"] for r in rounds],
              "matmul_peak_gflop_per_cpu_second_per_round": [round(p, 2) for p in peak_cpu],
              "results": results,
          }
      )
  )


if __name__ == "__main__":
  main()
