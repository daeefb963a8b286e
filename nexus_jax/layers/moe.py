"""Mixture-of-Experts feed-forward layer: top-k softmax router, aux losses, two dispatch paths.

`MoE(num_experts=8, mlp_dim=256, top_k=2)(x) -> (y, aux)` with `x, y [B, T, D]`.

- Router: float32 logits `x W_r`, optional multiplicative input jitter in training (Switch),
  softmax over experts, top-k; the kept weights are renormalised to sum to 1 (`renormalize`)
  whenever a token keeps more than one expert. A token routed to a single expert (always with
  `top_k=1`) keeps its router probability as the gate (Switch): renormalising one weight gives a
  constant 1.0 and cuts the router off from the task loss.
- Dynamic experts (`top_p`, Huang et al. 2024, "Harder tasks need more experts"): a token takes
  experts in descending router probability until their mass reaches `top_p`, at most `top_k` of
  them (`top_k=num_experts`: no cap), on the dropless path. The router-entropy loss of that paper
  (`mean(-sum_e p_e log p_e)`, times `entropy_coef`) is sown so the router learns to be confident
  where it can; aux `experts_per_token` is the mean number of experts a valid token used.
- Aux losses, in float32, are `sow`n into the "aux_loss" collection already multiplied by their
  coefficients (the training loop adds them to the objective and logs them; they are not part of
  the reported main loss): Switch load balancing `E * sum_e f_e * P_e` (f_e: fraction of the
  token->expert assignments routed to e, P_e: mean router probability of e) and the ST-MoE
  router z-loss `mean(logsumexp(logits)^2)`.
- Dispatch: `capacity_factor=None` -> dropless sort + grouped matmul (`jax.lax.ragged_dot`);
  a float -> capacity-limited einsum dispatch per batch row, dropping overflow assignments.
- aux: `expert_load [E]` (f_e), `max_load_ratio` (max f_e / mean f_e), `load_balance_loss`,
  `router_z_loss` (unweighted), `dropped_fraction` (0 for dropless).
A `mask [B, T]` excludes padding tokens from routing statistics, capacity and the output (0).

Decoding (`decode=True`, set by the blocks when the model decodes with a KV cache) always runs
the dropless path, whatever `capacity_factor`: each token's output then depends on that token
alone, so a prompt decodes to the same tokens alone or batched with other (padded, different
length) prompts. Under a capacity limit the padding and the other rows' tokens would compete
for expert slots. (A full forward pass with `capacity_factor` set still drops overflow tokens.)

Expert weights are `[expert, embed, mlp]` / `[expert, mlp, embed]`, shardable on the `expert`
mesh axis. The capacity path's einsums are partitioned by GSPMD (all-to-alls inserted by XLA).
The dropless path has no tensor with an expert dimension to constrain: its rows `[N*K, D]` are
sorted by expert into ragged, data-dependent groups and every row picks its expert's weights
inside the grouped matmul, so GSPMD all-gathers the expert weights to every device (seen in the
compiled gradient on a (data 2, expert 4) mesh: all-gathers of the full `[E, D, F]` / `[E, F, D]`
weights, none on the capacity path). Stored params and Adam moments stay expert-sharded; for
expert-parallel compute set `capacity_factor` (a shard_map dispatch with a ragged all-to-all, as
MaxText's megablox path does, is the dropless alternative; not built here).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nexus_jax.layers import moe_dispatch
from nexus_jax.layers.feedforward import get_activation

Dtype = Any


def router_statistics(logits_NE, expert_idx_NK, valid_N=None, kept_NK=None):
  """Float32 `(load_balance_loss, z_loss, expert_load [E])` over the valid tokens.

  `kept_NK` (bool) marks the assignments a token really uses (top-p routing keeps a prefix of its
  top-k); the expert load is then the fraction of the kept assignments routed to each expert.
  """
  n, e = logits_NE.shape
  k = expert_idx_NK.shape[1]
  logits = logits_NE.astype(jnp.float32)
  valid = jnp.ones((n,), jnp.float32) if valid_N is None else valid_N.astype(jnp.float32)
  count = jnp.maximum(valid.sum(), 1.0)
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(expert_idx_NK, e, dtype=jnp.float32)  # [N, K, E]
  if kept_NK is None:
    assignments = count * k
  else:
    onehot = onehot * kept_NK[..., None].astype(jnp.float32)
    assignments = jnp.maximum(jnp.einsum("nk,n->", kept_NK.astype(jnp.float32), valid), 1.0)
  load = jnp.einsum("ne,n->e", onehot.sum(1), valid) / assignments
  mean_prob = jnp.einsum("ne,n->e", probs, valid) / count
  load_balance = e * jnp.sum(load * mean_prob)
  z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * valid) / count
  return load_balance, z_loss, load


def routed_prefix(top_w_NK, top_p: float | None):
  """Top-p routing: `[N, K]` bool keeping each token's experts (probabilities descending) until
  their mass reaches `top_p`; the first expert is always kept. None (top-k routing) -> None."""
  if top_p is None:
    return None
  mass_before = jnp.cumsum(top_w_NK, axis=-1) - top_w_NK
  return mass_before < top_p


def gate_weights(top_w_NK, kept_NK, renormalize: bool):
  """The routing weights `[N, K]`: kept probabilities, renormalised to sum to 1 when
  `renormalize` and the token keeps more than one expert. A lone expert's gate stays its router
  probability (Switch) so the task loss reaches the router (renormalised it would be 1.0)."""
  if kept_NK is not None:
    top_w_NK = jnp.where(kept_NK, top_w_NK, 0.0)
  if not renormalize:
    return top_w_NK
  count = top_w_NK.shape[-1] if kept_NK is None else jnp.sum(kept_NK, -1, keepdims=True)
  total = jnp.sum(top_w_NK, axis=-1, keepdims=True)
  return jnp.where(count > 1, top_w_NK / total, top_w_NK)


def _next_pow2(n: int) -> int:
  """The smallest power of two >= n (n >= 1)."""
  return 1 << max(0, int(n) - 1).bit_length()


def expert_init():
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
  )


class MoE(nn.Module):
  """Top-k routed experts; `x [B, T, D] -> (y [B, T, D], aux)`."""

  num_experts: int
  mlp_dim: int  # hidden width of each expert
  top_k: int = 2  # experts per token (with top_p: the most a token may take)
  top_p: float | None = None  # dynamic routing: experts until their probability mass reaches p
  entropy_coef: float = 1e-4  # router-entropy loss weight (top_p routing only)
  activation: str = "swiglu"
  capacity_factor: float | None = None  # None: dropless
  renormalize: bool = True
  router_jitter: float = 0.0  # multiplicative uniform noise on router inputs in training
  load_balance_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  gmm_impl: str = "auto"  # dropless grouped matmul: auto | ragged_dot | tiled
  gmm_tile: int = 128
  decode: bool = False  # True: dropless whatever capacity_factor (batch-independent decoding)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = expert_init()

  def _check(self, x):
    if x.ndim != 3:
      raise ValueError(f"MoE input must be [batch, length, embed]; got {x.shape}.")
    if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
      raise ValueError(
          f"MoE needs num_experts >= 1 and 1 <= top_k <= num_experts; got "
          f"num_experts={self.num_experts}, top_k={self.top_k}."
      )
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"capacity_factor must be > 0 or None; got {self.capacity_factor}.")
    if self.top_p is not None:
      if not 0 < self.top_p <= 1:
        raise ValueError(f"MoE top_p must be in (0, 1] (or None: top-k); got {self.top_p}.")
      if self.capacity_factor is not None:
        raise ValueError(
            "MoE top_p routing runs on the dropless path: set capacity_factor=None (got "
            f"capacity_factor={self.capacity_factor} with top_p={self.top_p})."
        )
    if self.gmm_impl not in moe_dispatch.GMM_IMPLS:
      raise ValueError(
          f"Unknown gmm_impl {self.gmm_impl!r}; choose one of " f"{moe_dispatch.GMM_IMPLS}."
      )

  def _expert_params(self, d: int):
    _, gated = get_activation(self.activation)
    p = lambda name, shape, names: self.param(
        name, nn.with_logical_partitioning(self.kernel_init, names), shape, self.param_dtype
    )
    e, f = self.num_experts, self.mlp_dim
    names = ["wi_gate", "wi_up"] if gated else ["wi"]
    wi = [p(n, (e, d, f), ("expert", "embed", "mlp")) for n in names]
    return wi, p("wo", (e, f, d), ("expert", "mlp", "embed"))

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    self._check(x)
    b, t, d = x.shape
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    valid = None if mask is None else mask.reshape(b * t).astype(bool)

    # Router (float32 throughout).
    router_in = x.astype(jnp.float32)
    if self.router_jitter > 0 and not deterministic:
      noise = jax.random.uniform(
          self.make_rng("dropout"),
          router_in.shape,
          jnp.float32,
          1.0 - self.router_jitter,
          1.0 + self.router_jitter,
      )
      router_in = router_in * noise
    w_router = self.param(
        "router",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
        (d, self.num_experts),
        self.param_dtype,
    )
    logits = router_in.reshape(b * t, d) @ w_router.astype(jnp.float32)  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_idx = jax.lax.top_k(probs, self.top_k)  # [N, K], descending
    kept = routed_prefix(top_w, self.top_p)  # [N, K] bool, or None: all K
    top_w = gate_weights(top_w, kept, self.renormalize)
    if valid is not None:
      top_w = top_w * valid[:, None]

    load_balance, z_loss, load = router_statistics(logits, top_idx, valid, kept)
    if self.load_balance_coef:
      self.sow("aux_loss", "load_balance", self.load_balance_coef * load_balance)
    if self.z_loss_coef:
      self.sow("aux_loss", "router_z", self.z_loss_coef * z_loss)
    token_weight = jnp.ones((b * t,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    tokens = jnp.maximum(token_weight.sum(), 1.0)
    if self.top_p is not None and self.entropy_coef:
      entropy = -jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
      self.sow("aux_loss", "router_entropy", self.entropy_coef * (entropy @ token_weight) / tokens)
    used = jnp.full((b * t,), self.top_k, jnp.float32) if kept is None else kept.sum(-1)
    experts_per_token = (used.astype(jnp.float32) @ token_weight) / tokens

    wi, wo = self._expert_params(d)
    if self.capacity_factor is None or self.decode:
      assignment_valid = (
          kept if valid is None else (valid if kept is None else kept & valid[:, None])
      )
      y = self._dropless(x.reshape(b * t, d), top_idx, top_w, assignment_valid, wi, wo)
      dropped = 0.0
    else:
      y, dropped = self._capacity(
          x,
          top_idx.reshape(b, t, -1),
          top_w.reshape(b, t, -1),
          None if valid is None else valid.reshape(b, t),
          wi,
          wo,
      )
    aux = {
        "expert_load": load,
        "max_load_ratio": self.num_experts * jnp.max(load),
        "load_balance_loss": load_balance,
        "router_z_loss": z_loss,
        "dropped_fraction": jnp.asarray(dropped, jnp.float32),
        "experts_per_token": experts_per_token,
    }
    y = nn.with_logical_constraint(y.reshape(b, t, d), ("batch", "length", "embed"))
    return y, aux

  def _hidden(self, h_parts):
    act, gated = get_activation(self.activation)
    return act(h_parts[0]) * h_parts[1] if gated else act(h_parts[0])

  def _dropless(self, x_ND, idx_NK, w_NK, valid, wi, wo):
    """Sort assignments by expert, grouped matmuls, unsort, weight and sum over k.

    `valid` is None, `[N]` (token mask) or `[N, K]` (assignment mask); invalid assignments are
    sorted last and take no expert rows.
    """
    n, k = idx_NK.shape
    order, group_sizes = moe_dispatch.sort_assignments(idx_NK, self.num_experts, valid)
    xs = jnp.take(x_ND, order // k, axis=0)  # [N*K, D], expert-major
    # A decode step routes few rows: smaller tiles waste less of the (E + rows/tile) tiles.
    tile = min(self.gmm_tile, max(8, _next_pow2(n * k))) if self.decode else self.gmm_tile
    gmm = lambda a, w: moe_dispatch.grouped_matmul(
        a, w.astype(a.dtype), group_sizes, impl=self.gmm_impl, tile=tile
    )
    h = self._hidden([gmm(xs, w) for w in wi])
    ys = gmm(h, wo)  # [N*K, D]
    y_NKD = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y_NKD, w_NK.astype(ys.dtype))

  def _capacity(self, x_GND, idx_GNK, w_GNK, valid_GN, wi, wo):
    """Capacity-limited one-hot dispatch/combine einsums; returns (y, dropped fraction)."""
    g, n, _ = x_GND.shape
    cap = moe_dispatch.expert_capacity(n, self.num_experts, self.top_k, self.capacity_factor)
    dispatch, combine, kept = moe_dispatch.capacity_masks(
        idx_GNK, w_GNK, self.num_experts, cap, valid_GN
    )
    dtype = x_GND.dtype
    xin = jnp.einsum("gnec,gnd->egcd", dispatch.astype(dtype), x_GND)
    xin = nn.with_logical_constraint(xin, ("expert", "batch", None, "embed"))
    h = self._hidden([jnp.einsum("egcd,edf->egcf", xin, w.astype(dtype)) for w in wi])
    h = nn.with_logical_constraint(h, ("expert", "batch", None, "mlp"))
    out = jnp.einsum("egcf,efd->egcd", h, wo.astype(dtype))
    out = nn.with_logical_constraint(out, ("expert", "batch", None, "embed"))
    y = jnp.einsum("gnec,egcd->gnd", combine.astype(dtype), out)
    total = g * n * self.top_k if valid_GN is None else jnp.sum(valid_GN) * self.top_k
    dropped = (total - jnp.sum(kept)) / jnp.maximum(total, 1)
    return y, dropped
