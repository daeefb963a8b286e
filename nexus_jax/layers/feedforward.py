"""Position-wise feed-forward: plain MLP (gelu / relu / swish) or gated GLU (SwiGLU / GEGLU).

`[..., E] -> [..., out_dim or E]`. Gated variants compute `act(x W_gate) * (x W_up)` (Shazeer,
2020). Kernels are `[embed, mlp]` / `[mlp, embed]` with those logical axis names.

The matmuls run on the tokens flattened to `[tokens, E]`: with a `[B, T, E]` input the weight
gradients would contract over two axes (B, T), which XLA:CPU lowers to a transposing copy of the
`[B, T, mlp]` activation gradients fused with their elementwise math (strided reads from every
input); on 2-D operands it is one plain transposed-lhs matmul (`benchmarks/lm_train_mfu.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# name -> (activation, gated)
ACTIVATIONS: dict[str, tuple[Callable, bool]] = {
    "gelu": (nn.gelu, False),
    "relu": (nn.relu, False),
    "swish": (nn.swish, False),
    "silu": (nn.swish, False),
    "swiglu": (nn.swish, True),
    "geglu": (nn.gelu, True),
    "reglu": (nn.relu, True),
}


def get_activation(name: str) -> tuple[Callable, bool]:
  """`(fn, gated)` for an activation name; raises with the valid names otherwise."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def default_kernel_init():
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class MLP(nn.Module):
  """Feed-forward block. `x [..., E] -> [..., out_dim or E]`; hidden width `hidden_dim`."""

  hidden_dim: int
  activation: str = "gelu"
  out_dim: int | None = None
  dropout_rate: float = 0.0  # on the hidden activations
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    act, gated = get_activation(self.activation)
    dtype = self.dtype or x.dtype

    def dense(features, names, name):
      return nn.Dense(
          features,
          use_bias=self.use_bias,
          dtype=dtype,
          param_dtype=self.param_dtype,
          name=name,
          kernel_init=nn.with_logical_partitioning(self.kernel_init, names),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
      )

    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])  # [tokens, E] (see the module docstring)
    if gated:
      h = act(dense(self.hidden_dim, ("embed", "mlp"), "wi_gate")(x))
      h = h * dense(self.hidden_dim, ("embed", "mlp"), "wi_up")(x)
    else:
      h = act(dense(self.hidden_dim, ("embed", "mlp"), "wi")(x))
    h = h.reshape(*lead, self.hidden_dim)
    if h.ndim == 3:
      h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    out = dense(self.out_dim or x.shape[-1], ("mlp", "embed"), "wo")
    out = out(h.reshape(-1, self.hidden_dim))
    return out.reshape(*lead, out.shape[-1])
