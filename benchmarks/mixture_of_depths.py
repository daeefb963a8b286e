"""Mixture-of-Depths byte LM: forward FLOPs vs capacity, and bits/byte at equal training FLOPs.

    python benchmarks/mixture_of_depths.py [--layers 4] [--dim 128] [--seq 128] [--steps 200]
        [--capacities 1.0,0.75,0.5,0.25,0.125] [--train_capacities 0.75,0.5,0.25]

A byte-level `LanguageModel` (dense MLPs, no experts) with every other block routed
(`mod_every=2`) at each capacity c: forward FLOPs from XLA's compiled cost analysis next to an
analytic matmul count (projections, MLP, attention scores and values, router + predictor, head).
Then a dense model trained `--steps` AdamW steps sets the training-FLOPs budget (compiled FLOPs of
one train step x steps); each MoD model in `--train_capacities` trains `budget / its step FLOPs`
steps on the same stream of windows from the standard library's .py sources (the LM experiment's
train split). Test bits/byte are reported two ways: `causal` routes with the predictor (what
decoding does: one prefill call through the KV-cache path, so no token sees the future) and
`top_k` routes with top-k over the window as in training (not causal: whether a byte is routed
depends on later bytes). Prints one JSON object: machine, versions, config and results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from benchmarks.lm_training import lm_optimizer, make_train_step  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.layers.mixture_of_depths import routed_tokens  # noqa: E402
from nexus_jax.models import decoding  # noqa: E402
from nexus_jax.models.lm import LanguageModel, count_params  # noqa: E402
from nexus_jax.models.seq_objectives import token_cross_entropy  # noqa: E402


def make_model(args, capacity: float) -> LanguageModel:
  return LanguageModel(
      vocab_size=256,
      num_layers=args.layers,
      embed_dim=args.dim,
      num_heads=args.heads,
      num_kv_heads=args.kv_heads,
      mlp_dim=4 * args.dim,
      num_experts=0,
      mod_capacity=capacity,
      mod_every=2,
      scan_layers=False,  # XLA's cost analysis counts a scanned (while-loop) body only once
  )


def analytic_forward_flops(model: LanguageModel, batch: int, seq: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of one forward pass; elementwise work is left out."""
  e, h, v = model.embed_dim, model.num_heads, model.vocab_size
  kv, d = model.num_kv_heads or h, model.head_dim or e // h
  proj = 2 * e * h * d + 2 * e * kv * d  # q, out; k, v
  mlp = 3 * e * model.mlp_dim  # swiglu
  block = lambda n: 2 * n * (proj + mlp) + 4 * n * n * h * d  # + scores and values (full square)
  total = 0
  for i in range(1, model.num_layers + 1):
    routed = model.mod_capacity < 1.0 and i % model.mod_every == 0
    n = routed_tokens(model.mod_capacity, seq) if routed else seq
    total += block(n) + (2 * seq * 2 * e if routed else 0)  # router + predictor on every token
  return batch * (total + 2 * seq * e * v)


def compiled_flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def make_step(model, tx):
  def loss_fn(p, tokens):
    logits, state = model.apply({"params": p}, tokens[:, :-1], mutable=["aux_loss"])
    ce = token_cross_entropy(logits[0], tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))[0]
    aux = sum((jnp.sum(a) for a in jax.tree.leaves(state.get("aux_loss", {}))), jnp.zeros(()))
    return ce + aux, ce

  return make_train_step(loss_fn, tx)


def train(model, data, steps, args):
  """AdamW on the seeded window stream; returns (params, step FLOPs, seconds, last losses)."""
  tx = lm_optimizer(steps, lr=args.lr, warmup=20)
  windows = text.random_windows(data, args.seq + 1, steps * args.batch, 0).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(windows[:1, :-1]))["params"]
  opt = tx.init(params)
  step = jax.jit(make_step(model, tx), donate_argnums=(0, 1))
  compiled = step.lower(params, opt, jnp.asarray(windows[: args.batch])).compile()
  flops = float(compiled.cost_analysis()["flops"])
  t0, losses = time.perf_counter(), []
  for i in range(steps):
    params, opt, ce = compiled(
        params, opt, jnp.asarray(windows[i * args.batch : (i + 1) * args.batch])
    )
    losses.append(ce)
  losses = [float(x) for x in losses[-20:]]
  return params, flops, time.perf_counter() - t0, float(np.mean(losses) / math.log(2))


def _routed_layers(tree):
  """The sown intermediates of every MoD block (dicts holding `mod_router_logits`)."""
  if not isinstance(tree, dict):
    return []
  if "mod_router_logits" in tree:
    return [tree]
  return [found for key in sorted(tree) for found in _routed_layers(tree[key])]


def evaluate(model, params, test_windows):
  """Test bits/byte with top-k routing (training forward) and causal predictor routing (one
  prefill through the decoding path), and how often the predictor agrees with top-k."""
  inputs, targets = test_windows[:, :-1], test_windows[:, 1:]
  ones = jnp.ones(targets.shape)
  (logits, _), state = jax.jit(
      lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])
  )(params, inputs)
  top_k = float(token_cross_entropy(logits, targets, ones)[0]) / math.log(2)
  if model.mod_capacity == 1.0:
    return {"bits_per_byte_causal": top_k, "bits_per_byte_top_k": top_k}
  cache = decoding.init_cache(model, inputs.shape[0], inputs.shape[1])
  causal_logits, _ = jax.jit(lambda p, c, x: decoding.decode_step(model, p, c, x))(
      params, cache, inputs
  )
  causal = float(token_cross_entropy(causal_logits, targets, ones)[0]) / math.log(2)
  agree, routed = [], []
  for found in _routed_layers(state["intermediates"]):
    r, p = (np.asarray(found[k][0]) for k in ("mod_router_logits", "mod_predictor_logits"))
    k = routed_tokens(model.mod_capacity, inputs.shape[1])
    kth = -np.sort(-r, axis=-1)[..., k - 1 : k]
    agree.append(float(np.mean((r >= kth) == (p > 0))))
    routed.append(float(np.mean(p > 0)))
  return {
      "bits_per_byte_causal": causal,
      "bits_per_byte_top_k": top_k,
      "predictor_agreement": float(np.mean(agree)),
      "predictor_routed_fraction": float(np.mean(routed)),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=200, help="dense model's steps (the FLOPs budget)")
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--capacities", default="1.0,0.75,0.5,0.25,0.125")
  ap.add_argument("--train_capacities", default="0.75,0.5,0.25")
  ap.add_argument("--test_windows", type=int, default=64)
  args = ap.parse_args()
  t_start = time.perf_counter()

  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  dense = make_model(args, 1.0)
  flops_curve = []
  for c in [float(x) for x in args.capacities.split(",")]:
    model = make_model(args, c)
    params = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), tokens)
    flops_curve.append(
        {
            "capacity": c,
            "routed_tokens": routed_tokens(c, args.seq),
            "compiled_flops": compiled_flops(lambda p, x, m=model: m.apply(p, x), params, tokens),
            "analytic_flops": analytic_forward_flops(model, args.batch, args.seq),
        }
    )
  base = flops_curve[0] if flops_curve[0]["capacity"] == 1.0 else None
  for row in flops_curve:
    if base:
      row["compiled_vs_dense"] = row["compiled_flops"] / base["compiled_flops"]
      row["analytic_vs_dense"] = row["analytic_flops"] / base["analytic_flops"]

  splits, _ = text.load_text_splits()
  test = text.random_windows(splits["test"], args.seq + 1, args.test_windows, 1).astype(np.int32)
  test = jnp.asarray(test)
  params, step_flops, seconds, train_bpb = train(dense, splits["train"], args.steps, args)
  budget = step_flops * args.steps
  quality = [
      {
          "capacity": 1.0,
          "steps": args.steps,
          "train_step_flops": step_flops,
          "train_flops": budget,
          "train_seconds": seconds,
          "train_bits_per_byte_last20": train_bpb,
          "params": count_params(params),
          **evaluate(dense, params, test),
      }
  ]
  for c in [float(x) for x in args.train_capacities.split(",")]:
    model = make_model(args, c)
    probe = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), tokens)["params"]
    tx = optax.adamw(1e-3)
    opt = jax.eval_shape(tx.init, probe)
    windows = jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)
    per_step = compiled_flops(make_step(model, tx), probe, opt, windows)
    steps = int(round(budget / per_step))
    params, step_flops, seconds, train_bpb = train(model, splits["train"], steps, args)
    quality.append(
        {
            "capacity": c,
            "steps": steps,
            "train_step_flops": step_flops,
            "train_flops": step_flops * steps,
            "train_seconds": seconds,
            "train_bits_per_byte_last20": train_bpb,
            "params": count_params(params),
            **evaluate(model, params, test),
        }
    )

  print(
      json.dumps(
          {
              "benchmark": "mixture_of_depths",
              "machine": machine_info(),
              "config": {**vars(args), "mod_every": 2, "mlp_dim": 4 * args.dim},
              "forward_flops_vs_capacity": flops_curve,
              "equal_training_flops": quality,
              "seconds": time.perf_counter() - t_start,
          },
          indent=2,
      )
  )


if __name__ == "__main__":
  main()
