"""A deep ensemble of independently trained models, applied as one Flax module.

    model = MemberEnsemble(member=NexusFormer(...), size=3, task="binary")
    variables = {"params": {"member_0": p0, "member_1": p1, "member_2": p2}}   # each trained on its own
    outputs, aux = model.apply(variables, target=..., contexts=...)

The members share one architecture (`member`, cloned as ``member_0`` ... ``member_{size-1}``) and are
trained separately (different seeds, each with its own early stopping); the ensemble only combines
their predictions (Lakshminarayanan et al. 2017). The output is again in the member's output space, so
everything downstream (the task's `predict`, losses, artifacts, int8 / pruning on the params tree)
treats the ensemble like one model:

- ``binary``: the logit of the mean member probability, ``logit(mean_m sigmoid(z_m))`` `[B, 1]`;
- ``multiclass``: ``log(mean_m softmax(z_m))`` `[B, K]` (its softmax is the mean class probability);
- ``regression``: the mean member output `[B, 1]`.

Aux entries that are arrays `[B, ...]` are averaged over members (floats; integer entries such as
NexusFormer's ``iterations`` become float means); boolean entries are taken from member 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

TASKS = ("binary", "multiclass", "regression")
_EPS = 1e-7


def combine_outputs(outputs: jax.Array, task: str) -> jax.Array:
  """Member outputs `[M, B, K]` -> ensemble output `[B, K]` in the same space (see module docstring)."""
  outputs = outputs.astype(jnp.float32)
  if task == "binary":
    p = jnp.clip(jnp.mean(jax.nn.sigmoid(outputs), axis=0), _EPS, 1.0 - _EPS)
    return jnp.log(p) - jnp.log1p(-p)
  if task == "multiclass":
    return jax.nn.logsumexp(jax.nn.log_softmax(outputs, axis=-1), axis=0) - jnp.log(
        outputs.shape[0]
    )
  return jnp.mean(outputs, axis=0)


def _combine_aux(auxes: list[dict[str, Any]]) -> dict[str, Any]:
  out = {}
  for key, first in auxes[0].items():
    if not isinstance(first, jax.Array) or first.dtype == jnp.bool_:
      out[key] = first
    else:
      out[key] = jnp.mean(jnp.stack([a[key].astype(jnp.float32) for a in auxes]), axis=0)
  return out


class MemberEnsemble(nn.Module):
  """`size` copies of `member` (params ``member_i``); outputs combined for `task`.

  Attributes:
    member: the architecture (an unbound Linen module returning `outputs` or `(outputs, aux)`).
    size: number of members M (>= 1).
    task: "binary" | "multiclass" | "regression".
  """

  member: nn.Module
  size: int
  task: str

  @nn.compact
  def __call__(self, *args, **kwargs):
    if self.task not in TASKS:
      raise ValueError(f"MemberEnsemble.task={self.task!r}; choose one of {TASKS}")
    if self.size < 1:
      raise ValueError(f"MemberEnsemble.size={self.size}; must be >= 1")
    results = [
        self.member.clone(parent=self, name=f"member_{i}")(*args, **kwargs)
        for i in range(self.size)
    ]
    has_aux = isinstance(results[0], tuple)
    outputs = jnp.stack([r[0] if has_aux else r for r in results])
    combined = combine_outputs(outputs, self.task)
    return (combined, _combine_aux([r[1] for r in results])) if has_aux else combined
