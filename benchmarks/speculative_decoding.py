"""Speculative decoding vs plain sampling with the same target: acceptance rate and speedup.

    python benchmarks/speculative_decoding.py [--steps 120] [--new_tokens 128] [--num_draft 4]

Trains a byte-level target `LanguageModel` and a much smaller draft on the standard library's
.py sources (the LM experiment's training split; `--steps` Adam steps each, so acceptance rates
are those of briefly trained models), then generates `--new_tokens` bytes from test-split
prompts, at temperature 0 (greedy verification) and 1.0, with `speculative_generate` and with
plain cached `generate` on the target alone. Times exclude compilation (median of `--repeats`).
Prints one JSON object: machine, versions, config, training losses and results.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from benchmarks.lm_training import lm_optimizer, make_train_step  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.inference.generate import Sampling, generate  # noqa: E402
from nexus_jax.inference.speculative import speculative_generate  # noqa: E402
from nexus_jax.models.lm import LanguageModel, count_params  # noqa: E402
from nexus_jax.models.seq_objectives import token_cross_entropy  # noqa: E402


def train(model, data, steps, batch, seq, seed):
  """Plain jitted AdamW on random windows; returns (params, final mean loss in bits/byte)."""
  windows = jnp.asarray(text.random_windows(data, seq + 1, steps * batch, seed).astype(np.int32))
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), windows[:1, :-1])["params"]
  tx = lm_optimizer(steps, warmup=20)

  def loss_fn(p, tokens):
    logits, _ = model.apply({"params": p}, tokens[:, :-1])
    loss = token_cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))[0]
    return loss, loss

  step = jax.jit(make_train_step(loss_fn, tx))

  opt, losses = tx.init(params), []
  for i in range(steps):
    params, opt, loss = step(params, opt, windows[i * batch : (i + 1) * batch])
    losses.append(float(loss))
  return params, float(np.mean(losses[-20:]) / np.log(2))


def timed(fn, repeats):
  out = fn()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=120)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--target_dim", type=int, default=192)
  ap.add_argument("--target_layers", type=int, default=4)
  ap.add_argument("--draft_dim", type=int, default=48)
  ap.add_argument("--draft_layers", type=int, default=1)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--num_draft", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=1)
  args = ap.parse_args()

  splits, _ = text.load_text_splits()
  lm = lambda d, layers: LanguageModel(
      vocab_size=256,
      num_layers=layers,
      embed_dim=d,
      num_heads=max(d // 32, 2),
      num_kv_heads=1,
      mlp_dim=4 * d,
      num_experts=0,
  )
  target, draft = lm(args.target_dim, args.target_layers), lm(args.draft_dim, args.draft_layers)
  t0 = time.perf_counter()
  tparams, t_bpb = train(target, splits["train"], args.steps, args.batch, args.seq, 0)
  dparams, d_bpb = train(draft, splits["train"], args.steps, args.batch, args.seq, 1)
  train_seconds = time.perf_counter() - t0

  test = splits["test"]
  starts = np.random.default_rng(0).integers(0, len(test) - 64, args.prompts)
  prompts = [test[s : s + 32].astype(np.int32).tolist() for s in starts]
  cache_len = 32 + args.new_tokens + args.num_draft
  results = []
  for temperature in (0.0, 1.0):
    sampling = Sampling(temperature=temperature)
    acc = prop = 0
    t_spec = t_plain = 0.0
    for i, prompt in enumerate(prompts):
      key = jax.random.PRNGKey(i)
      ts, out = timed(
          lambda: speculative_generate(
              target,
              tparams,
              draft,
              dparams,
              prompt,
              max_new_tokens=args.new_tokens,
              num_draft=args.num_draft,
              rng=key,
              sampling=sampling,
              cache_len=cache_len,
          ),
          args.repeats,
      )
      tp, _ = timed(
          lambda: generate(
              target,
              tparams,
              [prompt],
              max_new_tokens=args.new_tokens,
              rng=key,
              sampling=sampling,
              cache_len=cache_len,
          ),
          args.repeats,
      )
      acc, prop, t_spec, t_plain = (
          acc + out.accepted,
          prop + out.proposed,
          t_spec + ts,
          t_plain + tp,
      )
    n = args.new_tokens * len(prompts)
    results.append(
        {
            "temperature": temperature,
            "acceptance_rate": round(acc / prop, 3),
            "tokens_per_target_pass": round(n / (prop / args.num_draft), 2),
            "speculative_tokens_per_s": round(n / t_spec, 1),
            "plain_tokens_per_s": round(n / t_plain, 1),
            "speedup": round(t_plain / t_spec, 2),
        }
    )
  print(
      json.dumps(
          {
              "benchmark": "speculative_decoding",
              "machine": machine_info(),
              "note": "CPU shared with other jobs; wall times are inflated and noisy",
              "config": {
                  **vars(args),
                  "target_params": count_params(tparams),
                  "draft_params": count_params(dparams),
              },
              "training": {
                  "target_train_bits_per_byte": round(t_bpb, 3),
                  "draft_train_bits_per_byte": round(d_bpb, 3),
                  "seconds": round(train_seconds, 1),
              },
              "results": results,
          }
      )
  )


if __name__ == "__main__":
  main()
