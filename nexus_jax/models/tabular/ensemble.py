"""Deep ensembles applied as one Flax module: members trained one after another, or all in one step.

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

`BatchedEnsemble` holds the same M members as one vmapped module (params ``members/...`` with a
leading member axis `[M, ...]`, logical axis "ensemble"), so all of them train in one compiled step:

    model = BatchedEnsemble(member=NexusFormer(...), size=4, task="binary")
    outputs, aux = model.apply(variables, target, contexts)                   # combined [B, K]
    member_out, _ = model.apply(variables, target, contexts, train=True,
                                split_members=True, rngs={"dropout": key})   # [M, B / M, K]

With ``split_members=True`` the batch's B rows are cut into M consecutive blocks of B / M and
member m sees only block m (its own dropout key, its own init): per step the ensemble costs about
what one member costs on the whole batch, and each member is an independent model trained with
batch B / M (`member_loss` averages the members' losses). With ``member_outputs=True`` every
member sees every row and returns its own output `[M, B, K]`: a classic deep ensemble at M times
one member's compute, for batches too small to split (`model.min_member_batch`). Without either
the outputs are combined as above (inference, evaluation, early stopping on the ensemble).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

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


def _combine_stacked_aux(aux: Mapping[str, Any]) -> dict[str, Any]:
  """Aux with a leading member axis `[M, B, ...]` -> `[B, ...]` (the `_combine_aux` rule)."""
  out = {}
  for key, value in aux.items():
    if not isinstance(value, jax.Array):
      out[key] = value
    elif value.dtype == jnp.bool_:
      out[key] = value[0]
    else:
      out[key] = jnp.mean(value.astype(jnp.float32), axis=0)
  return out


def _combine_aux(auxes: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-member aux dicts -> one (the `_combine_stacked_aux` rule; non-arrays from member 0)."""
  return _combine_stacked_aux(
      {
          k: jnp.stack([a[k] for a in auxes]) if isinstance(v, jax.Array) else v
          for k, v in auxes[0].items()
      }
  )


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


def _check_size_task(name: str, size: int, task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"{name}.task={task!r}; choose one of {TASKS}")
  if size < 1:
    raise ValueError(f"{name}.size={size}; must be >= 1")


class BatchedEnsemble(nn.Module):
  """`size` members of `member`'s architecture as one vmapped module (see the module docstring).

  Attributes:
    member: the architecture (an unbound Linen module called as `member(*args, train=...)`,
      returning `outputs [B, K]` or `(outputs, aux)`).
    size: number of members M (>= 1).
    task: "binary" | "multiclass" | "regression" (how `combine_outputs` averages).
  """

  member: nn.Module
  size: int
  task: str

  @nn.compact
  def __call__(
      self,
      *args,
      train: bool = False,
      split_members: bool = False,
      member_outputs: bool = False,
      **kwargs,
  ):
    """`args` / `kwargs` are the member's array inputs (pytrees of `[B, ...]`).

    Returns:
      by default: the combined output `[B, K]` (and combined aux);
      ``split_members=True``: each member's output on its block of rows `[M, B / M, K]` (and the
      members' aux, `[M, B / M, ...]`). B must then be a multiple of M;
      ``member_outputs=True`` (without the split): each member's output on every row `[M, B, K]`
      (and aux `[M, B, ...]`), for training every member on the whole batch.
    """
    _check_size_task("BatchedEnsemble", self.size, self.task)
    inputs = (args, kwargs)
    if split_members:
      batch = jax.tree.leaves(inputs)[0].shape[0]
      if batch % self.size:
        raise ValueError(
            f"BatchedEnsemble(size={self.size}): split_members needs a batch that is a multiple "
            f"of the member count; got {batch} rows"
        )
      inputs = jax.tree.map(
          lambda a: a.reshape(self.size, batch // self.size, *a.shape[1:]), inputs
      )

    def call(module: nn.Module, inputs):
      return module(*inputs[0], **inputs[1], train=train)

    members = nn.vmap(
        call,
        variable_axes={"params": 0, "batch_stats": 0, "aux_loss": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0 if split_members else None,
        out_axes=0,
        axis_size=self.size,
        metadata_params={nn.PARTITION_NAME: "ensemble"},
    )
    result = members(self.member.clone(parent=self, name="members"), inputs)
    if split_members or member_outputs:
      return result
    if isinstance(result, tuple):
      return combine_outputs(result[0], self.task), _combine_stacked_aux(result[1])
    return combine_outputs(result, self.task)


def member_loss(
    loss: Callable[[jax.Array, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]],
) -> Callable[[jax.Array, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]:
  """A per-row task loss `(outputs [B, K], batch) -> (loss, metrics)` made ensemble-aware.

  Outputs `[M, B / M, K]` (`BatchedEnsemble(split_members=True)`) are scored member by member on
  their own rows (the batch's `[B]` entries cut into the same M blocks), outputs `[M, B, K]`
  (``member_outputs=True``) each on every row, and the losses and metrics are averaged over
  members; outputs `[B, K]` (a combined ensemble) go to `loss` unchanged.
  """

  def wrapped(outputs, batch):
    if outputs.ndim != 3:
      return loss(outputs, batch)
    m, rows_each = outputs.shape[:2]
    arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array) and v.ndim >= 1}
    split = {k: v for k, v in arrays.items() if m > 1 and v.shape[0] == m * rows_each}
    if split:  # member m scored on its own block of rows
      rows = {k: v.reshape(m, rows_each, *v.shape[1:]) for k, v in split.items()}
      losses, metrics = jax.vmap(loss)(outputs, rows)
    else:  # every member on every row
      rows = {k: v for k, v in arrays.items() if v.shape[0] == rows_each}
      losses, metrics = jax.vmap(loss, in_axes=(0, None))(outputs, rows)
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

  return wrapped
