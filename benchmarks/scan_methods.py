"""Selective-scan methods: forward and forward+backward time and compiled memory; ONE JSON object.

    python benchmarks/scan_methods.py                                  # lengths 1k, 4k, 16k
    python benchmarks/scan_methods.py --lengths 1024 --channels 64 --repeats 5

For each length and method of `nexus_jax.layers.ssm.selective_scan` ("associative", "chunked",
"sequential") on inputs `x, delta [B, L, D]`, `A [D, N]`, `B, C [B, L, N]`, it reports:
- `fwd_ms` / `fwd_bwd_ms`: median wall time of the jitted forward (y) and of the gradient of
  `sum(y)` with respect to every input, after one warm-up call;
- `*_temp_bytes` / `*_peak_bytes`: from `jax.jit(f).lower(...).compile().memory_analysis()`,
  the temporary buffers and temp + arguments + outputs - aliased (the compiled peak);
- `compile_s` for the forward+backward program.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.layers import ssm


def _inputs(b: int, length: int, d: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  return dict(
      x_BLD=f32(b, length, d),
      delta_BLD=jax.nn.softplus(f32(b, length, d) - 3.0),
      A_DN=-jnp.exp(f32(d, n, scale=0.5)),
      B_BLN=f32(b, length, n),
      C_BLN=f32(b, length, n),
  )


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  peak = (
      m.temp_size_in_bytes
      + m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
  )
  return {"temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak)}


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def run_one(method: str, inputs, chunk_size: int, repeats: int) -> dict:
  fwd = lambda kw: ssm.selective_scan(**kw, method=method, chunk_size=chunk_size)[0]
  fwd_bwd = jax.grad(lambda kw: jnp.sum(fwd(kw)))
  out = {}
  for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
    start = time.perf_counter()
    compiled = jax.jit(f).lower(inputs).compile()
    out[f"{name}_compile_s"] = round(time.perf_counter() - start, 2)
    out.update({f"{name}_{k}": v for k, v in _memory(compiled).items()})
    out[f"{name}_ms"] = round(_time(compiled, inputs, repeats), 2)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="1024,4096,16384")
  parser.add_argument("--methods", default=",".join(ssm.SCAN_METHODS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--channels", type=int, default=128, help="D (the SSM inner width)")
  parser.add_argument("--state", type=int, default=16, help="N")
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  lengths = [int(v) for v in args.lengths.split(",")]
  results = []
  for length in lengths:
    inputs = _inputs(args.batch, length, args.channels, args.state)
    reference = None
    for method in args.methods.split(","):
      row = {
          "length": length,
          "method": method,
          **run_one(method, inputs, args.chunk_size, args.repeats),
      }
      y = ssm.selective_scan(**inputs, method=method, chunk_size=args.chunk_size)[0]
      if reference is None:
        reference = y
      row["max_abs_diff_vs_first"] = float(jnp.max(jnp.abs(y - reference)))
      results.append(row)
  state_bytes = 4 * args.batch * args.channels * args.state
  print(
      json.dumps(
          {
              "benchmark": "scan_methods",
              "machine": {
                  "platform": platform.platform(),
                  "processor": platform.processor() or None,
                  "cpu_count": os.cpu_count(),
                  "device": str(jax.devices()[0]),
                  "note": "shared CPU, about one effective core",
              },
              "versions": {
                  "jax": jax.__version__,
                  "jaxlib": jax.lib.__version__,
                  "flax": flax.__version__,
                  "numpy": np.__version__,
              },
              "config": {
                  **vars(args),
                  "dtype": "float32",
                  "state_bytes_per_position": state_bytes,
                  "default_method": ssm.SelectiveSSM.scan_method,
              },
              "results": results,
          }
      )
  )


if __name__ == "__main__":
  main()
