"""Neuro-symbolic reasoning: soft relations from hidden states, differentiable rules, projection back.

`SymbolicReasoner()(h, mask)` maps entity states `h [B, N, E]` to `(h' [B, N, E], aux)`:
1. Extract soft facts: base relations `R[b, r, i, j] = sigmoid(q_r(h_i) . k_r(h_j) / sqrt(d) + c_r)`
   and unary predicates `P[b, i, p] = sigmoid(W_p h_i + c_p)`, all in [0, 1].
2. Rules, as fuzzy logic with a t-norm `T` (and its dual t-conorm `S`; existential
   quantification is `max`):
   - each derived relation q starts from a soft choice of base relation,
     `Q0 = sum_r softmax(w_q)_r R_r`, and is closed under the chain rule
     `Q(x, z) <- Q(x, y) AND Q(y, z)` for `steps` rounds: `Q <- S(Q, Q o Q)` with the composition
     `(A o B)[x, z] = max_y T(A[x, y], B[y, z])` (`transitive_closure`). Squaring reaches paths of
     length up to 2^steps; on crisp 0/1 input it is the exact transitive closure once
     2^steps >= N - 1, for every t-norm;
   - soft modus ponens derives unary facts `D[x, q, p] = max_y T(Q[x, y], P[y, p])`
     ("x is q-related to some y with property p").
3. Project back: `h' = h + W_o [ sum_j Q[i, j] v_j / (1 + sum_j Q[i, j]) for every q ; D[i] ]`
   with values `v = W_v h`.
t-norms: "product" (T = ab, S = a + b - ab), "godel" (min, max), "lukasiewicz"
(max(0, a + b - 1), min(1, a + b)). Padded entities (`mask` False) hold no facts.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.projection import Projection

Dtype = Any
TNORMS = ("product", "godel", "lukasiewicz")


def tnorm_fns(name: str) -> tuple[Callable, Callable]:
  """`(t_norm, t_conorm)` for a t-norm name in TNORMS."""
  if name == "product":
    return (lambda a, b: a * b), (lambda a, b: a + b - a * b)
  if name == "godel":
    return jnp.minimum, jnp.maximum
  if name == "lukasiewicz":
    return (lambda a, b: jnp.maximum(a + b - 1.0, 0.0)), (lambda a, b: jnp.minimum(a + b, 1.0))
  raise ValueError(f"Unknown t-norm {name!r}; choose one of {TNORMS}.")


def compose(a_XY, b_YZ, tnorm: str = "product"):
  """Fuzzy relational composition `max_y T(a[..., x, y], b[..., y, z])`: `[..., N, N]`."""
  t, _ = tnorm_fns(tnorm)
  return jnp.max(t(a_XY[..., :, :, None], b_YZ[..., None, :, :]), axis=-2)


def transitive_closure(r_NN, steps: int, tnorm: str = "product"):
  """`steps` rounds of `Q <- S(Q, Q o Q)` from `Q = r` over the last two axes `[..., N, N]`.

  Paths of up to 2^steps edges are found; with crisp 0/1 input and 2^steps >= N - 1 the result
  is the exact transitive closure (reachability by a path of >= 1 edge).
  """
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}.")
  _, s = tnorm_fns(tnorm)
  q = r_NN
  for _ in range(steps):
    q = s(q, compose(q, q, tnorm))
  return q


def modus_ponens(q_NN, p_NP, tnorm: str = "product"):
  """`D[..., x, p] = max_y T(q[..., x, y], p[..., y, p])`: from q(x, y) and p(y) infer d_p(x)."""
  t, _ = tnorm_fns(tnorm)
  return jnp.max(t(q_NN[..., :, :, None], p_NP[..., None, :, :]), axis=-2)


class SymbolicReasoner(nn.Module):
  """Soft relation extraction -> fuzzy rules -> projection; see the module docstring.

  `h [B, N, E]`, `mask [B, N]` (optional, True = real entity) -> `(h' [B, N, E], aux)` with aux
  `relations [B, R, N, N]`, `predicates [B, N, P]`, `derived_relations [B, Q, N, N]` (closed),
  `derived_predicates [B, N, Q, P]`, `relation_choice [Q, R]` (softmax weights).
  """

  num_relations: int = 2  # R base relations extracted from h
  num_predicates: int = 4  # P unary predicates
  num_derived: int = 2  # Q derived (closed) relations
  steps: int = 3  # closure rounds: paths up to 2^steps
  tnorm: str = "product"
  relation_dim: int = 32  # d of the bilinear relation scorer
  value_dim: int = 32
  relation_bias_init: float = -2.0  # base relations start sparse (sigmoid(-2) ~ 0.12)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def _check(self, h, mask):
    if h.ndim != 3:
      raise ValueError(f"SymbolicReasoner input must be [batch, entities, embed]; got {h.shape}.")
    if mask is not None and mask.shape != h.shape[:2]:
      raise ValueError(f"mask must be [batch, entities] = {h.shape[:2]}; got {mask.shape}.")
    for name in ("num_relations", "num_predicates", "num_derived", "relation_dim", "value_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"SymbolicReasoner.{name} must be >= 1, got {getattr(self, name)}.")
    if self.steps < 0:
      raise ValueError(f"SymbolicReasoner.steps must be >= 0, got {self.steps}.")
    tnorm_fns(self.tnorm)

  def _dense(self, features, names, name, use_bias=False, bias_init=nn.initializers.zeros):
    return Projection(
        features,
        kernel_axes=names,
        use_bias=use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        bias_init=bias_init,
        name=name,
    )

  @nn.compact
  def __call__(self, h, mask=None):
    self._check(h, mask)
    b, n, e = h.shape
    dtype = self.dtype or h.dtype
    r, d = self.num_relations, self.relation_dim
    q_BNRD = self._dense((r, d), ("embed", "heads", "kv"), "rel_query")(h).astype(jnp.float32)
    k_BNRD = self._dense((r, d), ("embed", "heads", "kv"), "rel_key")(h).astype(jnp.float32)
    rel_bias = self.param(
        "rel_bias",
        nn.with_logical_partitioning(nn.initializers.constant(self.relation_bias_init), ("heads",)),
        (r,),
        self.param_dtype,
    )
    logits = jnp.einsum("bird,bjrd->brij", q_BNRD, k_BNRD) / jnp.sqrt(d)
    relations = nn.sigmoid(logits + rel_bias.astype(jnp.float32)[:, None, None])
    predicates = nn.sigmoid(
        self._dense(self.num_predicates, ("embed", "feature"), "predicates", use_bias=True)(
            h
        ).astype(jnp.float32)
    )
    if mask is not None:
      m = mask.astype(jnp.float32)
      relations = relations * m[:, None, :, None] * m[:, None, None, :]
      predicates = predicates * m[:, :, None]

    choice_logits = self.param(
        "relation_choice",
        nn.with_logical_partitioning(nn.initializers.normal(0.1), (None, "heads")),
        (self.num_derived, r),
        self.param_dtype,
    )
    choice = nn.softmax(choice_logits.astype(jnp.float32), axis=-1)  # [Q, R]
    derived = transitive_closure(
        jnp.einsum("qr,brij->bqij", choice, relations), self.steps, self.tnorm
    )  # [B, Q, N, N]
    derived_predicates = modus_ponens(derived, predicates[:, None], self.tnorm)  # [B, Q, N, P]
    derived_predicates = jnp.moveaxis(derived_predicates, 1, 2)  # [B, N, Q, P]

    v = self._dense(self.value_dim, ("embed", "kv"), "value")(h).astype(jnp.float32)
    messages = jnp.einsum("bqij,bjd->biqd", derived, v) / (1.0 + jnp.sum(derived, -1))[
        ..., None
    ].transpose(0, 2, 1, 3)
    features = jnp.concatenate(
        [messages.reshape(b, n, -1), derived_predicates.reshape(b, n, -1)], -1
    ).astype(dtype)
    out = self._dense(e, (None, "embed"), "out")(features)
    if mask is not None:
      out = out * mask[..., None].astype(out.dtype)
    y = (h.astype(dtype) + out).astype(dtype)
    return nn.with_logical_constraint(y, ("batch", "length", "embed")), {
        "relations": relations,
        "predicates": predicates,
        "derived_relations": derived,
        "derived_predicates": derived_predicates,
        "relation_choice": choice,
    }
