"""Greedy decode throughput: KV cache vs recomputing the whole prefix at every step.

    python benchmarks/decode_kv_cache.py [--new_tokens 128 512] [--embed_dim 128] [--layers 2]

Both paths are one jitted `lax.while_loop` over the generated tokens with a random-weight dense
`LanguageModel` (byte vocabulary). Cached: `inference.generate.generate` (prefill once, then one
token per step against a static cache of prompt + new tokens). Recompute: every step runs the
full causal forward pass over a static buffer of prompt + new tokens (masked by causality, as a
cache-free jitted decoder must) and reads the logits at the current position. Both produce the
same tokens (checked). Times exclude compilation (each path is run once to compile, then timed
`--repeats` times, median). Prints one JSON object: machine, versions, config, results.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.inference.generate import generate  # noqa: E402
from nexus_jax.models.lm import LanguageModel, count_params  # noqa: E402


@functools.partial(jax.jit, static_argnums=(0, 3))
def recompute_greedy(model, params, prompt_BP, new_tokens: int):
  """Greedy decoding without a cache: full forward over the buffer at every step."""
  b, p = prompt_BP.shape
  buf = jnp.concatenate([prompt_BP, jnp.zeros((b, new_tokens), prompt_BP.dtype)], 1)

  def body(i, buf):
    logits, _ = model.apply({"params": params}, buf)
    nxt = jnp.argmax(logits[:, p + i - 1], -1).astype(buf.dtype)
    return buf.at[:, p + i].set(nxt)

  return jax.lax.fori_loop(0, new_tokens, body, buf)[:, p:]


def timed(fn, repeats):
  fn()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--new_tokens", type=int, nargs="+", default=[128, 512])
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--embed_dim", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()

  model = LanguageModel(
      vocab_size=256,
      num_layers=args.layers,
      embed_dim=args.embed_dim,
      num_heads=args.heads,
      num_kv_heads=max(args.heads // 2, 1),
      mlp_dim=4 * args.embed_dim,
      num_experts=0,
  )
  prompt = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.prompt_len), 0, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), prompt)["params"]
  results = []
  for n in args.new_tokens:
    cached = lambda: jnp.asarray(
        generate(model, params, np.asarray(prompt), max_new_tokens=n).tokens
    )
    recompute = lambda: recompute_greedy(model, params, prompt, n)
    same = bool(np.array_equal(np.asarray(cached()), np.asarray(recompute())))
    t_cache, t_full = timed(cached, args.repeats), timed(recompute, args.repeats)
    tokens = n * args.batch
    results.append(
        {
            "new_tokens": n,
            "same_tokens": same,
            "kv_cache_tokens_per_s": round(tokens / t_cache, 1),
            "recompute_tokens_per_s": round(tokens / t_full, 1),
            "speedup": round(t_full / t_cache, 2),
            "kv_cache_seconds": round(t_cache, 3),
            "recompute_seconds": round(t_full, 3),
        }
    )
  print(
      json.dumps(
          {
              "benchmark": "decode_kv_cache",
              "machine": machine_info(),
              "note": "CPU shared with other jobs; wall times are inflated and noisy",
              "config": {**vars(args), "params": count_params(params), "dtype": "float32"},
              "results": results,
          }
      )
  )


if __name__ == "__main__":
  main()
