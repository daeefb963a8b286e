"""Attention memory and speed on the host: `xla` vs `chunked`, forward + backward.

For each length it compiles `grad(sum(attention(q, k, v)))` and reports XLA's compiled
temporary-buffer size (`memory_analysis().temp_size_in_bytes`, the peak scratch the program
needs besides its inputs/outputs) and the median wall time of a fwd+bwd step. Runs whose
temporary memory exceeds `--max_run_gib` are compiled (memory reported) but not executed.

  python benchmarks/attention_memory.py                       # lengths 1024 4096 16384
  python benchmarks/attention_memory.py --lengths 512 1024 --repeats 1

Prints one JSON object: machine, versions, config, and one row per (backend, length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nexus_jax.layers import attention_ops  # noqa: E402
from nexus_jax.layers.kernels import chunked_attention  # noqa: E402


def machine_info() -> dict:
  import flax

  dev = jax.devices()[0]
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0],
      "device": f"{dev.platform}:{dev.device_kind}",
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__,
      "flax": flax.__version__,
  }


def fwd_bwd(backend: str, causal: bool, sizes):
  def loss(q, k, v):
    out = attention_ops.dot_product_attention(
        q, k, v, causal=causal, backend=backend, block_sizes=sizes
    )
    return jnp.sum(out.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(backend, length, args):
  shape = (args.batch, length, args.heads, args.head_dim)
  kv_shape = (args.batch, length, args.kv_heads, args.head_dim)
  sizes = chunked_attention.ChunkSizes(args.block, args.block) if backend == "chunked" else None
  fn = fwd_bwd(backend, args.causal, sizes)
  spec = lambda s: jax.ShapeDtypeStruct(s, args.dtype)
  t0 = time.perf_counter()
  compiled = fn.lower(spec(shape), spec(kv_shape), spec(kv_shape)).compile()
  row = {"backend": backend, "length": length, "compile_s": round(time.perf_counter() - t0, 2)}
  mem = compiled.memory_analysis()
  row["temp_bytes"] = int(mem.temp_size_in_bytes)
  row["temp_gib"] = round(mem.temp_size_in_bytes / 2**30, 4)
  if mem.temp_size_in_bytes > args.max_run_gib * 2**30:
    row["time_s"] = None
    row["skipped"] = f"temp memory above --max_run_gib={args.max_run_gib}"
    return row
  key = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(key[0], shape, args.dtype)
  k = jax.random.normal(key[1], kv_shape, args.dtype)
  v = jax.random.normal(key[2], kv_shape, args.dtype)
  jax.block_until_ready(compiled(q, k, v))  # warm-up
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - t0)
  row["time_s"] = round(statistics.median(times), 4)
  flops = 4 * args.batch * args.heads * length * length * args.head_dim * 3.5  # fwd + bwd
  if args.causal:
    flops /= 2
  row["gflops_per_s"] = round(flops / row["time_s"] / 1e9, 2)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--backends", nargs="+", default=["xla", "chunked"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--kv_heads", type=int, default=1)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--block", type=int, default=512, help="chunked block_q = block_k")
  p.add_argument("--causal", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--max_run_gib", type=float, default=4.0)
  args = p.parse_args()
  args.causal = bool(args.causal)
  rows = []
  for length in args.lengths:
    for backend in args.backends:
      rows.append(measure(backend, length, args))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  growth = {}
  for backend in args.backends:
    mem = [r["temp_bytes"] for r in rows if r["backend"] == backend]
    if len(mem) > 1 and mem[0] > 0:
      growth[backend] = [round(b / a, 2) for a, b in zip(mem, mem[1:])]
  config = {k: v for k, v in vars(args).items()}
  print(
      json.dumps(
          {
              "benchmark": "attention_memory",
              "machine": machine_info(),
              "config": config,
              "results": rows,
              "temp_memory_growth_per_length_step": growth,
          }
      )
  )


if __name__ == "__main__":
  main()
