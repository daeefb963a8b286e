"""MoE throughput and load balance on the host.

1. Training-step throughput (fwd + bwd, tokens/s) of: the dropless MoE (sort + grouped matmul,
   `gmm_impl` auto = tiled on CPU, plus the raw `ragged_dot` lowering for reference), the
   capacity-factor MoE, and a dense SwiGLU MLP with the same active parameters per token
   (hidden width = top_k * expert width).
2. Load balance after a short training run: a dropless MoE layer learns a random teacher on
   clustered inputs with Adam and the sown aux losses; reports max expert load / mean before and
   after training on held-out tokens.

  python benchmarks/moe_throughput.py
  python benchmarks/moe_throughput.py --batch 4 --length 128 --train_steps 50   # quick

Prints one JSON object: machine, versions, config and results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from nexus_jax.layers.feedforward import MLP  # noqa: E402
from nexus_jax.layers.moe import MoE  # noqa: E402


class Dense(nn.Module):
  """The dense baseline, with the MoE's `(y, aux)` interface."""

  hidden: int

  @nn.compact
  def __call__(self, x, deterministic=True):
    return MLP(self.hidden, activation="swiglu")(x), {}


def step_time(layer, x, repeats: int) -> float:
  params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)["params"]

  def loss(p, x):
    (y, _), aux_losses = layer.apply({"params": p}, x, mutable=["aux_loss"])
    return jnp.mean(jnp.square(y)) + sum(jnp.sum(v) for v in jax.tree.leaves(aux_losses))

  fn = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
  jax.block_until_ready(fn(params, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def clustered_tokens(key, n, d, centers):
  """Tokens around random cluster centres, RMS-normalised like a pre-norm block's MoE input."""
  k1, k2 = jax.random.split(key)
  idx = jax.random.randint(k1, (n,), 0, centers.shape[0])
  x = centers[idx] + 0.5 * jax.random.normal(k2, (n, d))
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def load_balance_run(args) -> dict:
  d = args.embed
  layer = MoE(
      num_experts=args.experts,
      mlp_dim=args.expert_mlp,
      top_k=args.top_k,
      load_balance_coef=args.load_balance_coef,
      z_loss_coef=1e-3,
  )
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  centers = jax.random.normal(keys[0], (16, d))
  w1 = jax.random.normal(keys[1], (d, 4 * d)) / jnp.sqrt(d)
  w2 = jax.random.normal(keys[2], (4 * d, d)) / jnp.sqrt(4 * d)
  teacher = lambda x: jnp.tanh(x @ w1) @ w2
  shape = (args.batch, args.length, d)
  held_out = clustered_tokens(keys[3], args.batch * args.length, d, centers).reshape(shape)
  params = jax.jit(layer.init)(keys[4], held_out)["params"]
  opt = optax.adam(args.lr)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, key):
    x = clustered_tokens(key, args.batch * args.length, d, centers).reshape(shape)

    def loss(p):
      (y, aux), aux_losses = layer.apply({"params": p}, x, mutable=["aux_loss"])
      task = jnp.mean(jnp.square(y - teacher(x)))
      return task + sum(jnp.sum(v) for v in jax.tree.leaves(aux_losses)), (task, aux)

    (_, (task, aux)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, task, aux["max_load_ratio"]

  evaluate = jax.jit(lambda p: layer.apply({"params": p}, held_out)[1])
  before = evaluate(params)
  first_task = None
  for i, key in enumerate(jax.random.split(jax.random.PRNGKey(2), args.train_steps)):
    params, opt_state, task, _ = train_step(params, opt_state, key)
    if i == 0:
      first_task = float(task)
  after = evaluate(params)
  return {
      "train_steps": args.train_steps,
      "task_loss_first": round(first_task, 4),
      "task_loss_last": round(float(task), 4),
      "max_load_ratio_before": round(float(before["max_load_ratio"]), 3),
      "max_load_ratio_after": round(float(after["max_load_ratio"]), 3),
      "expert_load_after": [round(float(v), 4) for v in after["expert_load"]],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--embed", type=int, default=256)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--expert_mlp", type=int, default=512)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--train_steps", type=int, default=200)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--load_balance_coef", type=float, default=1e-2)
  p.add_argument("--skip_ragged_dot", action="store_true")
  p.add_argument("--skip_throughput", action="store_true")
  args = p.parse_args()

  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.length, args.embed))
  tokens = args.batch * args.length
  moe = lambda **kw: MoE(num_experts=args.experts, mlp_dim=args.expert_mlp, top_k=args.top_k, **kw)
  layers = {
      "dense_same_active_params": Dense(args.top_k * args.expert_mlp),
      "dropless": moe(),
      "capacity": moe(capacity_factor=args.capacity_factor),
  }
  if not args.skip_ragged_dot:
    layers["dropless_ragged_dot"] = moe(gmm_impl="ragged_dot")
  throughput = {}
  for name, layer in ({} if args.skip_throughput else layers).items():
    t = step_time(layer, x, args.repeats)
    throughput[name] = {"step_s": round(t, 4), "tokens_per_s": round(tokens / t, 1)}
    print(name, throughput[name], file=sys.stderr, flush=True)
  ratios = {}
  if throughput:
    dense = throughput["dense_same_active_params"]["tokens_per_s"]
    ratios = {
        f"{k}_vs_dense": round(v["tokens_per_s"] / dense, 3)
        for k, v in throughput.items()
        if k != "dense_same_active_params"
    }
  balance = load_balance_run(args)
  print(
      json.dumps(
          {
              "benchmark": "moe_throughput",
              "machine": machine_info(),
              "config": vars(args),
              "throughput_fwd_bwd": throughput,
              "ratios": ratios,
              "load_balance": balance,
          }
      )
  )


if __name__ == "__main__":
  main()
