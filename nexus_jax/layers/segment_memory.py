"""Two more memories for segment-recurrent attention (`layers/compressive_attention.py`).

Both are written with the EVICTED segment (the previous segment's raw K/V or inputs, once the
current segment has used them) and read by the segments after it, so with the previous segment
kept raw a segment sees: current (causal) + previous (raw) + memory of everything older.

"summary" (`summary_update`): M learned summary queries per KV head, `q_MKD`, attend over the
  old summary slots plus the evicted keys, and each slot becomes the attention-weighted mixture
  (of keys AND values) of what they attend to: `mem_k' = softmax(q k^T / sqrt(D)) [mem_k; k_ev]`,
  `mem_v'` likewise with values. The slots are carried forward from segment to segment and
  trained through the recurrence (BPTT over the segments of a training sequence): k learned
  summary tokens in the spirit of RMT (Bulatov et al. 2022) and AutoCompressors (Chevalier et al.
  2023), kept at the level of one layer's K/V rather than passed through the whole stack.
  Slots start as zeros and are invisible until written. The evicted keys carry their RoPE
  rotation (absolute positions), so a slot's key is a mixture of rotated keys; the learned
  queries themselves are not rotated.

"titans" (`TitansSegmentMemory`): the Titans neural memory (Behrouz et al. 2024,
  `layers/memory.py`: an MLP per KV head whose weights learn inside `apply` with `jax.grad` of
  the associative loss, momentum and forgetting gates, chunked) is written with the evicted
  segment's inputs `x_ev [B, W, E]` and read by every token of later segments: `y_t = out(gate_t
  * RMS(M(unit(q_t))))`, added to the attention output (`out` starts at zero, so an untrained
  memory changes nothing). State: `w1 [B, K, D, hD]`, `w2 [B, K, hD,
  D]` and their momenta, float32; before anything is written it is the learned initial weights.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.memory import memory_forward, run_memory

MEMORIES = ("compressive", "summary", "titans", "none")


def summary_update(q_MKD, mem_k, mem_v, ev_k, ev_v, mem_valid):
  """New summary slots `(mem_k, mem_v) [B, M, K, D]` from the old ones and the evicted K/V.

  q_MKD: the learned queries. ev_k/ev_v: `[B, W, K, D]`. mem_valid: bool scalar, whether the
  old slots hold anything (on the first write they are masked out).
  """
  m, w = mem_k.shape[1], ev_k.shape[1]
  keys = jnp.concatenate([mem_k, ev_k.astype(mem_k.dtype)], axis=1)  # [B, M + W, K, D]
  vals = jnp.concatenate([mem_v, ev_v.astype(mem_v.dtype)], axis=1)
  q = q_MKD.astype(jnp.float32)
  scores = jnp.einsum("mkd,bskd->bkms", q, keys.astype(jnp.float32)) / jnp.sqrt(q.shape[-1])
  visible = jnp.concatenate([jnp.broadcast_to(mem_valid, (m,)), jnp.ones((w,), bool)])
  probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
  mix = lambda a: jnp.einsum("bkms,bskd->bmkd", probs, a.astype(jnp.float32)).astype(a.dtype)
  return mix(keys), mix(vals)


class TitansSegmentMemory(nn.Module):
  """Titans memory per KV head: `read(x [B, T, E], state, segment) -> [B, T, E]` and
  `write(x_ev [B, W, E], state, segment) -> state` (module docstring)."""

  num_heads: int  # memory heads (the attention's KV heads)
  head_dim: int
  embed_dim: int  # E of the read output
  hidden_mult: int = 2  # memory MLP hidden width = hidden_mult * head_dim
  chunk_size: int = 16  # tokens per parallel inner step (memory.run_memory)
  # theta_t = max_lr * sigmoid(.). 1.0 diverged within a few writes; 0.1 held at W = 16 (one
  # chunk per write) but at W = 128 (8 chunks a write, 64 chained inner steps per sequence) the
  # outer gradient blew up to 4e11 by step 5 and went NaN at step 11.
  max_lr: float = 0.02
  # True: the outer gradient goes through the latest write only (the state it starts from is a
  # constant, the learned initial memory too on the first write, so `w1`/`w2` learn from the
  # reads of segments 0-1 only), a truncated BPTT of one segment; the forward is unchanged. At W = 128 the full
  # chain still went NaN within 1,000 steps at max_lr 0.02; truncated, it trains (benchmarks/
  # README.md). False: through every write.
  truncate: bool = True
  lr_bias_init: float = -2.0
  momentum_bias_init: float = 0.0
  forget_bias_init: float = -4.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def setup(self):
    h, d = self.num_heads, self.head_dim
    dense = lambda feats, name, bias=None: nn.DenseGeneral(
        feats,
        use_bias=bias is not None,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.zeros if bias is not None else self.kernel_init,
        bias_init=nn.initializers.constant(bias if bias is not None else 0.0),
        name=name,
    )
    self.query, self.key, self.value = (dense((h, d), n) for n in ("query", "key", "value"))
    self.gate = dense((h, d), "gate")
    self.lr = dense(h, "lr", self.lr_bias_init)
    self.momentum = dense(h, "momentum", self.momentum_bias_init)
    self.forget = dense(h, "forget", self.forget_bias_init)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))
    hid = self.hidden_mult * d
    self.w1 = self.param("w1", init, (h, d, hid), self.param_dtype)
    self.w2 = self.param("w2", init, (h, hid, d), self.param_dtype)
    self.read_scale = self.param("read_norm_scale", nn.initializers.ones, (d,), self.param_dtype)
    self.out = nn.DenseGeneral(
        self.embed_dim,
        axis=(-2, -1),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.zeros,  # the memory starts as a no-op branch
        name="out",
    )

  def initial_state(self, batch: int):
    """`(weights, momentum)` of the learned initial memory, broadcast to `batch` rows."""
    weights = {
        n: jnp.broadcast_to(w.astype(jnp.float32), (batch,) + w.shape)
        for n, w in (("w1", self.w1), ("w2", self.w2))
    }
    return weights, jax.tree.map(jnp.zeros_like, weights)

  def _current(self, state, segment):
    """The state a segment reads / a write starts from: the initial one until written (s < 2)."""
    b = state["w1"].shape[0]
    w0, s0 = self.initial_state(b)
    written = segment >= 2
    pick = lambda init, have: jnp.where(written, have.astype(jnp.float32), init)
    weights = {n: pick(w0[n], state[n]) for n in ("w1", "w2")}
    momentum = {n: pick(s0[n], state[f"{n}_momentum"]) for n in ("w1", "w2")}
    return weights, momentum

  def read(self, x_BTE, state, segment):
    weights, _ = self._current(state, segment)
    q = _unit(self.query(x_BTE))  # [B, T, K, D]
    per_head = jax.vmap(jax.vmap(memory_forward, (None, 0)), (0, 1), 1)  # heads
    y = jax.vmap(per_head)(weights, q)  # [B, T, K, D]
    y = y * lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + 1e-6) * self.read_scale
    return self.out(y.astype(x_BTE.dtype) * nn.silu(self.gate(x_BTE)))  # [B, T, E]

  def write(self, x_ev_BWE, state, segment):
    """Absorbs the evicted segment (only if segment >= 1; else `state` unchanged)."""
    weights, momentum = self._current(state, segment)
    if self.truncate:
      weights, momentum = jax.lax.stop_gradient((weights, momentum))
    heads_first = lambda a: jnp.moveaxis(a.astype(jnp.float32), 2, 1)
    inputs = {
        "k": heads_first(_unit(self.key(x_ev_BWE))),
        "v": heads_first(self.value(x_ev_BWE)),
        "q": heads_first(_unit(self.query(x_ev_BWE))),
        "lr": heads_first(self.max_lr * nn.sigmoid(self.lr(x_ev_BWE))),  # [B, K, W]
        "log_eta": heads_first(nn.log_sigmoid(self.momentum(x_ev_BWE))),
        "log_keep": heads_first(nn.log_sigmoid(-self.forget(x_ev_BWE))),
    }

    def do_write(operands):
      w, s, inp = operands
      (w, s), _ = run_memory(w, s, inp, self.chunk_size, remat=True)
      return w, s

    weights, momentum = lax.cond(
        segment >= 1, do_write, lambda ops: ops[:2], (weights, momentum, inputs)
    )
    return {
        **weights,
        **{f"{n}_momentum": m for n, m in momentum.items()},
    }

  def __call__(self, x_BTE, state, segment):  # init helper: creates every param
    return self.read(x_BTE, state, segment), self.write(x_BTE, state, segment)


def titans_state_shapes(batch: int, heads: int, head_dim: int, hidden_mult: int) -> dict:
  """Shapes of the Titans state dict (weights + momenta), float32."""
  hid = hidden_mult * head_dim
  w1, w2 = (batch, heads, head_dim, hid), (batch, heads, hid, head_dim)
  return {"w1": w1, "w2": w2, "w1_momentum": w1, "w2_momentum": w2}


def _unit(a):
  a = a.astype(jnp.float32)
  return a * lax.rsqrt(jnp.sum(jnp.square(a), -1, keepdims=True) + 1e-6)
