"""GPU attention throughput: our Pallas kernel vs cuDNN vs jax's Pallas `mha`, fwd and fwd+bwd.

TFLOP/s counts 4*B*H*T*S*D for the forward pass and 2.5x that for the backward pass (halved
when causal). The target is our kernel >= 0.8x cuDNN.

  python benchmarks/attention_gpu.py                          # needs a GPU
  python benchmarks/attention_gpu.py --allow_cpu --lengths 64 --batch 1 --heads 2 --head_dim 16
      # CPU smoke test of the script itself: Pallas in interpret mode, XLA in place of cuDNN

Prints one JSON object: machine, versions, config and one row per (impl, length, pass).
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
from jax.experimental.pallas.ops.gpu import attention as jax_mha

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.layers.kernels import flash_attention  # noqa: E402


def implementations(args, on_gpu: bool):
  scale = args.head_dim**-0.5
  causal = bool(args.causal)
  ours = flash_attention.BlockSizes(
      args.block_q,
      args.block_k,
      args.block_bwd,
      args.block_bwd,
      args.block_bwd,
      args.block_bwd,
      num_warps=args.num_warps or None,
      num_stages=args.num_stages,
  )
  theirs = jax_mha.BlockSizes(
      block_q=args.block_q,
      block_k=args.block_k,
      block_q_dkv=args.block_bwd,
      block_kv_dkv=args.block_bwd,
      block_q_dq=args.block_bwd,
      block_kv_dq=args.block_bwd,
  )
  impls = {
      "nexus_pallas": lambda q, k, v: flash_attention.flash_attention(
          q, k, v, causal=causal, scale=scale, block_sizes=ours, interpret=not on_gpu
      ),
      "jax_pallas_mha": lambda q, k, v: jax_mha.mha(
          q, k, v, None, sm_scale=scale, causal=causal, block_sizes=theirs, interpret=not on_gpu
      ),
      ("cudnn" if on_gpu else "xla"): lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, scale=scale, is_causal=causal, implementation="cudnn" if on_gpu else "xla"
      ),
  }
  wanted = [i for i in args.impls.split(",") if i]
  if wanted:
    impls = {k: v for k, v in impls.items() if k in wanted or (k == "xla" and "cudnn" in wanted)}
  return impls


def timed(fn, *xs, repeats: int) -> float:
  jax.block_until_ready(fn(*xs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--causal", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument(
      "--block_q", type=int, default=128
  )  # defaults: the tuned GPU tiles (default_block_sizes)
  p.add_argument("--block_k", type=int, default=64)
  p.add_argument("--block_bwd", type=int, default=64)
  p.add_argument(
      "--num_warps", type=int, default=4, help="our kernel; 0 = 4 if head_dim <= 64 else 8"
  )
  p.add_argument("--num_stages", type=int, default=3, help="our kernel's pipeline stages")
  p.add_argument(
      "--impls", default="", help="comma-separated subset of nexus_pallas,jax_pallas_mha,cudnn"
  )
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--allow_cpu", action="store_true")
  args = p.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.allow_cpu:
    print(
        json.dumps(
            {
                "benchmark": "attention_gpu",
                "machine": machine_info(),
                "skipped": "no GPU (pass --allow_cpu for an interpret-mode smoke test)",
            }
        )
    )
    return
  rows = []
  for length in args.lengths:
    shape = (args.batch, length, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, shape, args.dtype) for kk in keys)
    flops_fwd = 4 * args.batch * args.heads * length * length * args.head_dim
    flops_fwd /= 2 if args.causal else 1
    for name, fn in implementations(args, on_gpu).items():
      fwd = jax.jit(fn)
      loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))
      fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      for pass_name, f, flops in (("fwd", fwd, flops_fwd), ("fwd_bwd", fwd_bwd, 3.5 * flops_fwd)):
        try:
          t = timed(f, q, k, v, repeats=args.repeats)
          rows.append(
              {
                  "impl": name,
                  "length": length,
                  "pass": pass_name,
                  "time_ms": round(1e3 * t, 3),
                  "tflops_per_s": round(flops / t / 1e12, 3),
              }
          )
        except Exception as e:  # an impl that rejects this configuration is reported, not fatal
          rows.append(
              {
                  "impl": name,
                  "length": length,
                  "pass": pass_name,
                  "error": f"{type(e).__name__}: {str(e)[:200]}",
              }
          )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  baseline = "cudnn" if on_gpu else "xla"
  ratio = {}
  for r in rows:
    if r["impl"] == "nexus_pallas" and "time_ms" in r:
      base = [
          b
          for b in rows
          if b["impl"] == baseline
          and b["length"] == r["length"]
          and b["pass"] == r["pass"]
          and "time_ms" in b
      ]
      if base:
        ratio[f"{r['pass']}@{r['length']}"] = round(base[0]["time_ms"] / r["time_ms"], 3)
  print(
      json.dumps(
          {
              "benchmark": "attention_gpu",
              "machine": machine_info(),
              "config": vars(args),
              "results": rows,
              f"nexus_pallas_speed_vs_{baseline}": ratio,
          }
      )
  )


if __name__ == "__main__":
  main()
