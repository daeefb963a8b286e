"""`Projection`: a linear map over one or more trailing axes whose kernel carries logical names.

`Projection(features=(heads, head_dim), kernel_axes=("embed", "heads", "kv"))(x)` maps
`x [..., E] -> [..., heads, head_dim]`; with `axis=(-2, -1)` it contracts two trailing axes
(`[..., heads, head_dim] -> [..., E]`, the attention output). Params: `kernel [*in, *features]`
named `kernel_axes` and (with `use_bias`) `bias [*features]` named `kernel_axes[-len(features):]`.

Why not `nn.DenseGeneral`: it draws the kernel flat (`[prod(in), prod(features)]`) and reshapes
it, and the logical names of the N-d kernel then annotate the flat 2-d draw; under a mesh
(`train.loop.fit` always sets one) that sharding constraint fails at init and in the shape check
flax traces on every apply. Here the param is created directly in its N-d shape and boxed with
names of that rank, so its sharding constraint and every activation constraint stay live. Names,
shapes and initial values are those of `nn.DenseGeneral` (the initializer still sees the flat
`[prod(in), prod(features)]` shape, so fan-in scaling is unchanged), and so is the forward
(`lax.dot_general` contracting `axis` against the leading kernel dims): checkpoints, the
pretrained-weight key maps and quantisation read the same tree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any


def _tuple(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class Projection(nn.Module):
  """`x [..., *in] -> [..., *features]`, contracting the input axes `axis` (see module doc)."""

  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]  # logical names of the kernel `[*in, *features]`
  axis: int | tuple[int, ...] = -1
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()  # sees the flat 2-d shape
  bias_init: Callable = nn.initializers.zeros  # sees the flat 1-d shape

  @nn.compact
  def __call__(self, x):
    features = _tuple(self.features)
    axis = tuple(sorted(a % x.ndim for a in _tuple(self.axis)))
    shape = tuple(x.shape[a] for a in axis) + features
    if len(self.kernel_axes) != len(shape):
      raise ValueError(
          f"Projection {self.name!r}: kernel_axes {self.kernel_axes} name {len(self.kernel_axes)} "
          f"dims but the kernel {shape} has {len(shape)}."
      )
    n_in = len(axis)

    def flat_init(init, flat_shape):
      return lambda rng, shape, dtype=jnp.float32: jnp.reshape(init(rng, flat_shape, dtype), shape)

    fan = (math.prod(shape[:n_in]), math.prod(features))
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(flat_init(self.kernel_init, fan), self.kernel_axes),
        shape,
        self.param_dtype,
    )
    bias = None
    if self.use_bias:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(
              flat_init(self.bias_init, (fan[1],)), self.kernel_axes[n_in:]
          ),
          features,
          self.param_dtype,
      )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    out = lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
    if bias is not None:
      out = out + bias
    return out
