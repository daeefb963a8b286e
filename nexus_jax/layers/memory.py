"""Titans neural long-term memory (Behrouz et al., 2024): an MLP whose weights learn at test time.

`NeuralMemory(num_heads=4)(x)` maps `x [B, L, E] -> (y [B, L, E], aux)`. Per head, the memory is a
small MLP `M(k) = gelu(k W1) W2` (`depth=2`) or `M(k) = k W1` (`depth=1`) on `[head_dim]`
vectors. Its weights are explicit arrays, one copy per sequence, trained inside `apply` by
gradient descent on the associative loss of every token,

    l_t(M) = 0.5 * ||M(k_t) - v_t||^2,    g_t = grad_M l_t  (jax.value_and_grad of a pure function)
    S_t = eta_t S_{t-1} - theta_t g_t                       momentum ("past surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                        forgetting gate

with data-dependent `theta_t = max_lr * sigmoid(.)` (learning rate), `eta_t = sigmoid(.)` and
`alpha_t = sigmoid(.)`, one scalar per token and head from linear maps of x. Keys and queries
are L2-normalised per head.

Chunked parallel update (the paper's mini-batch form): the sequence is cut into chunks of
`chunk_size`; inside a chunk every g_t is taken at the chunk's starting weights (in parallel,
`vmap` over tokens), and the momentum / forgetting recurrence is solved in closed form with
`[C, C]` decay matrices, giving every intermediate M_t at once. A `lax.scan` carries (M, S)
across chunks, with `jax.checkpoint` per chunk, and everything is `vmap`ped over batch and
heads (the layout of test-time-training/ttt-lm-jax). `chunk_size=1` is exact per-token SGD.

Retrieval reads before it writes: the output at position t is `M_{t-1}(q_t)` (the memory after
all earlier tokens), so a query cannot overwrite the fact it asks for before reading it. The
retrieved vectors are RMS-normalised per head, gated by `silu(x W_g)` and projected back to E.

State: the `memory` collection holds `weights` and `momentum` (each `{"w1", ["w2"]}` with shapes
`[B, H, ...]`). A call starts from the stored state when `memory` is passed in the variables,
otherwise from the learned initial weights (params `w1`, `w2`) with zero momentum; with
`mutable=["memory"]` the state after the last token is written back, so facts given in one call
can be recalled in a later call (test-time learning). `init` does not create the collection.
`update_memory=False` only reads (no gradient steps, state unchanged). Splitting a sequence
into calls at chunk boundaries gives exactly the single-call result.

Everything is differentiable end to end: the outer loss trains the projections, gates and
initial weights through the inner gradient steps (second-order gradients).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.projection import Projection

Dtype = Any


def memory_forward(weights, k_D):
  """The memory MLP on one vector: `k [D] -> [D]`; weights `w1 [D, M]` (+ `w2 [M, D]`)."""
  h = k_D @ weights["w1"]
  if "w2" in weights:
    h = nn.gelu(h) @ weights["w2"]
  return h


def inner_loss(weights, k_D, v_D):
  """Associative loss `0.5 * ||M(k) - v||^2` of one key/value pair (a pure function)."""
  return 0.5 * jnp.sum(jnp.square(memory_forward(weights, k_D) - v_D))


def _segsum(log_C):
  """`out[t, s] = sum_{r=s+1..t} log[r]` for s <= t, -inf above the diagonal: `[C] -> [C, C]`."""
  c = log_C.shape[0]
  lower = jnp.tril(jnp.ones((c, c), bool), -1)
  cum = jnp.cumsum(jnp.where(lower, log_C[:, None], 0.0), axis=0)
  return jnp.where(jnp.tril(jnp.ones((c, c), bool)), cum, -jnp.inf)


def memory_chunk(carry, chunk):
  """Reads and updates one memory on one chunk. Unbatched; `vmap` over batch and heads.

  carry: `(weights, momentum)`, matching pytrees. chunk: `k, v, q [C, D]`, `lr [C]` (theta),
  `log_eta [C]` (log momentum gate), `log_keep [C]` (log(1 - alpha)), `valid [C]` (bool; padded
  tokens neither write nor advance the state).
  Returns `(new_carry, (y [C, D], grad_norm [C], loss_before [C], loss_after [C]))`.
  """
  w0, s0 = carry
  valid = chunk["valid"]
  per_token = jax.vmap(jax.value_and_grad(inner_loss), in_axes=(None, 0, 0))
  loss_before, grads = per_token(w0, chunk["k"], chunk["v"])  # grads: leaves [C, ...]
  lr = jnp.where(valid, chunk["lr"], 0.0)
  log_eta = jnp.where(valid, chunk["log_eta"], 0.0)
  log_keep = jnp.where(valid, chunk["log_keep"], 0.0)
  # S_t = sum_s E[t,s] (-lr_s g_s) + E[t,0] S_0,  E[t,s] = prod_{r=s+1..t} eta_r
  # M_t = F[t,0] M_0 + sum_u F[t,u] valid_u S_u,  F[t,u] = prod_{r=u+1..t} (1 - alpha_r)
  e_ts = jnp.exp(_segsum(log_eta))
  f_ts = jnp.exp(_segsum(log_keep)) * valid[None, :]
  e_t0, f_t0 = jnp.exp(jnp.cumsum(log_eta)), jnp.exp(jnp.cumsum(log_keep))
  grad_coef = f_ts @ (e_ts * -lr[None, :])  # [C, C]: weight of g_s in M_t
  s0_coef = f_ts @ e_t0  # [C]: weight of S_0 in M_t

  def states(m0, s0_leaf, g):  # one leaf: M_1..M_C [C, ...] and S_C [...]
    col = lambda coef: coef.reshape((-1,) + (1,) * m0.ndim)
    m_t = col(f_t0) * m0 + col(s0_coef) * s0_leaf + jnp.tensordot(grad_coef, g, axes=1)
    s_last = e_t0[-1] * s0_leaf + jnp.tensordot(e_ts[-1] * -lr, g, axes=1)
    return m_t, s_last

  m_all, s_last = {}, {}
  for name in w0:
    m_all[name], s_last[name] = states(w0[name], s0[name], grads[name])
  m_prev = {n: jnp.concatenate([w0[n][None], m[:-1]]) for n, m in m_all.items()}
  w_last = {n: m[-1] for n, m in m_all.items()}
  y = jax.vmap(memory_forward)(m_prev, chunk["q"])
  loss_after = jax.vmap(inner_loss, in_axes=(None, 0, 0))(w_last, chunk["k"], chunk["v"])
  grad_norm = jnp.sqrt(
      sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), -1) for g in grads.values())
  )
  return (w_last, s_last), (y, grad_norm, loss_before, loss_after)


def run_memory(weights, momentum, inputs, chunk_size: int, remat: bool = True):
  """Scans `memory_chunk` over chunks, vmapped over batch and heads.

  weights/momentum: pytrees with leaves `[B, H, ...]`. inputs: `k, v, q [B, H, L, D]`,
  `lr, log_eta, log_keep [B, H, L]`. Returns `((weights, momentum), (y [B, H, L, D],
  grad_norm, loss_before, loss_after [B, H, L]))`.
  """
  b, h, length, _ = inputs["k"].shape
  cs = min(chunk_size, length)
  pad = -length % cs
  inputs = dict(inputs, valid=jnp.ones((b, h, length), bool))

  def to_chunks(a):  # [B, H, L, ...] -> [nc, B, H, cs, ...]
    a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
    return jnp.moveaxis(a.reshape((b, h, -1, cs) + a.shape[3:]), 2, 0)

  step = jax.vmap(jax.vmap(memory_chunk))
  if remat:
    step = jax.checkpoint(step)
  carry, outs = lax.scan(step, (weights, momentum), jax.tree.map(to_chunks, inputs))
  from_chunks = lambda a: jnp.moveaxis(a, 0, 2).reshape((b, h, -1) + a.shape[4:])[:, :, :length]
  return carry, jax.tree.map(from_chunks, outs)


class NeuralMemory(nn.Module):
  """Titans neural memory layer: `x [B, L, E] -> (y [B, L, E], aux)`.

  aux (float32, `[B, L, H]`): `grad_norm` (surprise ||g_t||), `loss_before` (l_t at the chunk's
  starting weights), `loss_after` (l_t at the weights after the chunk's update), `lr`, `forget`
  (alpha_t), `momentum_gate` (eta_t). With `update_memory=False` only `loss_before` is given.
  """

  num_heads: int = 4
  head_dim: int | None = None  # None: E // num_heads
  depth: int = 2  # 1: linear memory, 2: two-layer MLP
  hidden_mult: int = 2  # memory MLP hidden width = hidden_mult * head_dim (depth 2)
  chunk_size: int = 16
  max_lr: float = 1.0  # theta_t = max_lr * sigmoid(.)
  lr_bias_init: float = -2.0  # sigmoid(-2) * max_lr ~ 0.12 at init
  momentum_bias_init: float = 0.0  # eta ~ 0.5 at init
  forget_bias_init: float = -4.0  # alpha ~ 0.02 at init
  remat: bool = True  # jax.checkpoint per chunk
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def _check(self, x):
    if x.ndim != 3:
      raise ValueError(f"NeuralMemory input must be [batch, length, embed]; got {x.shape}.")
    if self.num_heads < 1 or self.chunk_size < 1 or self.hidden_mult < 1:
      raise ValueError(
          "NeuralMemory num_heads, chunk_size and hidden_mult must be >= 1; got "
          f"{self.num_heads}, {self.chunk_size}, {self.hidden_mult}."
      )
    if self.depth not in (1, 2):
      raise ValueError(f"NeuralMemory.depth must be 1 (linear) or 2 (MLP), got {self.depth}.")
    if self.max_lr <= 0:
      raise ValueError(f"NeuralMemory.max_lr must be > 0, got {self.max_lr}.")
    if self.head_dim is None and x.shape[-1] % self.num_heads:
      raise ValueError(
          f"embed dim {x.shape[-1]} is not divisible by num_heads "
          f"({self.num_heads}); set head_dim explicitly."
      )

  def _proj(self, x, features, names, name, bias_init=None, kernel_init=None):
    return Projection(
        features,
        kernel_axes=names,
        use_bias=bias_init is not None,
        dtype=self.dtype or x.dtype,
        param_dtype=self.param_dtype,
        kernel_init=kernel_init or self.kernel_init,
        bias_init=bias_init or nn.initializers.zeros,
        name=name,
    )(x)

  def _initial_weights(self, d: int):
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))
    h, m = self.num_heads, self.hidden_mult * d
    shapes = {"w1": ((h, d, d if self.depth == 1 else m), ("heads", "kv", "mlp"))}
    if self.depth == 2:
      shapes["w2"] = ((h, m, d), ("heads", "mlp", "kv"))
    return {
        n: self.param(n, nn.with_logical_partitioning(init, names), shape, self.param_dtype)
        for n, (shape, names) in shapes.items()
    }

  @nn.compact
  def __call__(self, x, *, update_memory: bool = True):
    """`x [B, L, E]` -> `(y [B, L, E], aux)`; state in the `memory` collection (module doc)."""
    self._check(x)
    b, length, e = x.shape
    h, d = self.num_heads, self.head_dim or e // self.num_heads
    dtype = self.dtype or x.dtype
    fdt = jnp.promote_types(dtype, jnp.float32)  # inner loop: float32 (float64 under x64)
    x = x.astype(dtype)

    def unit(a):  # L2-normalise per head
      a = a.astype(fdt)
      return a * lax.rsqrt(jnp.sum(jnp.square(a), -1, keepdims=True) + 1e-6)

    q = unit(self._proj(x, (h, d), ("embed", "heads", "kv"), "query"))
    k = unit(self._proj(x, (h, d), ("embed", "heads", "kv"), "key"))
    v = self._proj(x, (h, d), ("embed", "heads", "kv"), "value").astype(fdt)
    # Gate kernels start at zero, so every gate starts at its configured bias for all tokens.
    gate_logit = lambda name, bias: self._proj(
        x, h, ("embed", "heads"), name, nn.initializers.constant(bias), nn.initializers.zeros
    ).astype(fdt)
    lr = self.max_lr * nn.sigmoid(gate_logit("lr", self.lr_bias_init))
    eta_logit = gate_logit("momentum", self.momentum_bias_init)
    alpha_logit = gate_logit("forget", self.forget_bias_init)

    initial = self._initial_weights(d)
    if self.has_variable("memory", "weights"):
      weights = self.get_variable("memory", "weights")
      momentum = self.get_variable("memory", "momentum")
      stored = jax.tree.leaves(weights)[0].shape
      if stored[:2] != (b, h) or set(weights) != set(initial):
        raise ValueError(
            f"stored memory has batch/heads {stored[:2]} and weights "
            f"{sorted(weights)}, but the input needs {(b, h)} and {sorted(initial)}; "
            "start without the `memory` collection to reset it."
        )
    else:
      weights = {n: jnp.broadcast_to(w.astype(fdt), (b,) + w.shape) for n, w in initial.items()}
      momentum = jax.tree.map(jnp.zeros_like, weights)
    weights, momentum = (jax.tree.map(lambda a: a.astype(fdt), t) for t in (weights, momentum))

    heads_first = lambda a: jnp.moveaxis(a, 2, 1)  # [B, L, H, ...] -> [B, H, L, ...]
    if update_memory:
      inputs = {
          "k": k,
          "v": v,
          "q": q,
          "lr": lr,
          "log_eta": nn.log_sigmoid(eta_logit),
          "log_keep": nn.log_sigmoid(-alpha_logit),
      }
      (weights, momentum), (y, grad_norm, before, after) = run_memory(
          weights, momentum, jax.tree.map(heads_first, inputs), self.chunk_size, self.remat
      )
      tokens_first = lambda a: jnp.moveaxis(a, 1, 2)
      aux = {
          "grad_norm": tokens_first(grad_norm),
          "loss_before": tokens_first(before),
          "loss_after": tokens_first(after),
          "lr": lr,
          "forget": nn.sigmoid(alpha_logit),
          "momentum_gate": nn.sigmoid(eta_logit),
      }
      y = tokens_first(y)
    else:
      read = jax.vmap(jax.vmap(jax.vmap(memory_forward, (None, 0)), (0, 0)), (0, 0))
      y = jnp.moveaxis(read(weights, heads_first(q)), 1, 2)
      score = jax.vmap(jax.vmap(jax.vmap(inner_loss, (None, 0, 0)), (0, 0, 0)), (0, 0, 0))
      aux = {"loss_before": jnp.moveaxis(score(weights, heads_first(k), heads_first(v)), 1, 2)}

    if self.is_mutable_collection("memory") and not self.is_initializing():
      self.put_variable("memory", "weights", weights)
      self.put_variable("memory", "momentum", momentum)

    # RMS norm per head in the inner precision (norms.RMSNorm would round float64 to float32).
    scale = self.param(
        "read_norm_scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("kv",)),
        (d,),
        self.param_dtype,
    )
    y = (y * lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + 1e-6) * scale).astype(dtype)
    y = y * nn.silu(self._proj(x, (h, d), ("embed", "heads", "kv"), "gate"))
    out = Projection(
        e,
        kernel_axes=("heads", "kv", "embed"),
        axis=(-2, -1),
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name="out",
    )(y)
    return nn.with_logical_constraint(out, ("batch", "length", "embed")), aux
