"""Shared helpers for the tabular encoder tests: a tiny synthetic regression task and a fit loop.

Imported by the test modules (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

CARDS = (5, 4)
# Per-compile XLA options for the tests: the tiny test models spend far more time in LLVM than in
# running (each random initialiser alone costs ~0.3 s of compile at the default level), so tests
# compile at -O0. Local to these calls; nothing global changes.
FAST_XLA = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
  """Like jax.jit(fn) (no static args) but compiled with FAST_XLA; compiled once per input signature."""
  jitted = jax.jit(fn)
  cache = {}

  def call(*args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in cache:
      cache[key] = jitted.lower(*args).compile(compiler_options=FAST_XLA)
    return cache[key](*args)

  return call  # codes per categorical feature, reserved codes 0 (missing) and 1 (unknown) included


def synthetic_rows(n: int = 256, seed: int = 0):
  """x_num f32[n, 3], x_cat i32[n, 2] (codes 2..card-1), y f32[n] ~ unit variance, nonlinear."""
  rng = np.random.default_rng(seed)
  x_num = rng.normal(size=(n, 3)).astype(np.float32)
  x_cat = np.stack([rng.integers(2, c, size=n) for c in CARDS], axis=1).astype(np.int32)
  effect = np.array([0.0, 0.0, -1.0, 0.5, 1.5])
  y = x_num[:, 0] * x_num[:, 1] + np.sin(2 * x_num[:, 2]) + effect[x_cat[:, 0]]
  y = (y - y.mean()) / y.std()
  return jnp.asarray(x_num), jnp.asarray(x_cat), jnp.asarray(y, jnp.float32)


class WithHead(nn.Module):
  """encoder -> Dense(1); returns (prediction [...], aux)."""

  encoder: nn.Module

  @nn.compact
  def __call__(self, *args, deterministic: bool = True, **kwargs):
    h, aux = self.encoder(*args, deterministic=deterministic, **kwargs)
    return nn.Dense(1)(h)[..., 0], aux


def init_variables(model: nn.Module, *args, **kwargs) -> dict:
  """`model.init` compiled with FAST_XLA (much faster than eager on CPU), without the transient `aux_loss` collection."""
  variables = fast_jit(lambda key: model.init(key, *args, **kwargs))(jax.random.key(0))
  return {k: v for k, v in variables.items() if k != "aux_loss"}


def fit(
    encoder: nn.Module, args: tuple, y: jax.Array, steps: int = 150, lr: float = 3e-3, kwargs=None
):
  """Full-batch Adam on MSE (+ sown aux losses) in training mode, from init to the last step in one
  compiled function (the encoder must have no dropout: the fit configs switch it off).

  Returns (MSE at the first step, mean MSE over the last 10 steps), both in training mode.
  """
  kwargs = kwargs or {}
  model = WithHead(encoder)
  opt = optax.adam(lr)

  def loss_fn(params, extra):
    (pred, _), upd = model.apply(
        {"params": params, **extra},
        *args,
        deterministic=False,
        mutable=[*extra, "aux_loss"],
        **kwargs,
    )
    mse = jnp.mean((pred - y) ** 2)
    aux = sum((jnp.sum(x) for x in jax.tree_util.tree_leaves(upd.get("aux_loss", {}))), 0.0)
    return mse + aux, (mse, {k: upd[k] for k in extra})

  def step(carry, _):
    params, extra, opt_state = carry
    grads, (mse, extra) = jax.grad(loss_fn, has_aux=True)(params, extra)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), extra, opt_state), mse

  @fast_jit
  def train(key):
    variables = dict(model.init(key, *args, **kwargs))
    variables.pop("aux_loss", None)
    params = variables.pop("params")
    _, mses = jax.lax.scan(step, (params, variables, opt.init(params)), None, length=steps)
    return mses

  mses = np.asarray(train(jax.random.key(0)))
  return float(mses[0]), float(mses[-10:].mean())


def randomize(params, seed: int = 0, scale: float = 0.5):
  """Every leaf of a param tree replaced by scale * N(0, 1) (so zero biases and unit norms count)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten(
      [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def reference_layer_norm(p, x, eps: float = 1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def reference_transformer_block(p, x, kv_mask, n_heads: int, attention_norm: bool = True):
  """Plain-jnp pre-norm block on `TransformerBlock`'s params: x + MHA(LN(x)), then x + ReGLU-FFN(LN(x)).

  x [B, T, d], kv_mask bool [B, T] (masked keys get -inf logits) -> (x [B, T, d], probs [B, H, T, T]).
  """
  d = x.shape[-1]
  hd = d // n_heads
  h = reference_layer_norm(p["attention_norm"], x) if attention_norm else x
  att = p["attention"]
  q, k, v = (
      jnp.einsum("btd,dhk->bthk", h, att[n]["kernel"]) + att[n]["bias"]
      for n in ("query", "key", "value")
  )
  logits = jnp.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(hd)
  probs = jax.nn.softmax(jnp.where(kv_mask[:, None, None, :], logits, -jnp.inf), axis=-1)
  a = jnp.einsum("bhqt,bthk->bqhk", probs, v)
  x = x + jnp.einsum("bqhk,hkd->bqd", a, att["out"]["kernel"]) + att["out"]["bias"]
  h = reference_layer_norm(p["ffn_norm"], x)
  f = h @ p["ffn"]["wi"]["kernel"] + p["ffn"]["wi"]["bias"]
  f1, f2 = jnp.split(f, 2, axis=-1)
  f = (f1 * jax.nn.relu(f2)) @ p["ffn"]["wo"]["kernel"] + p["ffn"]["wo"]["bias"]
  return x + f, probs
