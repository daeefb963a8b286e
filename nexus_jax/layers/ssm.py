"""Selective state-space layer (Mamba-1, Gu & Dao 2023) with three interchangeable scans.

`SelectiveSSM()(x)` maps `x [B, L, E] -> (y [B, L, E], aux)`. Per channel d of the inner width
`Di = expand * E` and state index n, with input-dependent step size, input and output matrices:

    delta_t = softplus(W_dt x_t + b_dt)   B_t = W_B x_t   C_t = W_C x_t
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] x_t[d]
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]

A is diagonal and negative, `A = -exp(A_log)` with the S4D-real init `A_log[d, n] = log(n + 1)`.
Before the SSM the inner stream goes through a short causal depthwise convolution and SiLU; after
it, it is gated by `silu(z)` from a parallel projection (the Mamba block).

The linear recurrence `h_t = a_t h_{t-1} + b_t` is computed by `selective_scan(method=...)`:
- "associative": `jax.lax.associative_scan` over the whole sequence with the combine
  `(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)`. Parallel, but materialises `[B, L, Di, N]`
  several times (and keeps it for the backward pass).
- "chunked" (default): the same associative scan inside chunks of `chunk_size`, a `lax.scan`
  carrying h across chunks, and `jax.checkpoint` per chunk, so only `[B, chunk, Di, N]` is live
  at a time and the backward pass keeps one `[B, Di, N]` state per chunk (bounded memory).
- "sequential": a plain `lax.scan` over time, one `ssm_step` per token (the reference).
All three agree in values and gradients (tests/layers/test_ssm.py). The scan always runs in
float32; see benchmarks/scan_methods.py for speed and memory.

Decoding (`decode=True`) keeps `conv_state [B, conv_width - 1, Di]` (the last inputs of the
convolution) and `ssm_state [B, Di, N]` in the `cache` collection. Initialise with any
`[B, T, E]` input (the cache does not depend on the length), then call with `mutable=["cache"]`
on a prompt `[B, T, E]` (scanned from the cached state) and then one token at a time (`T == 1`
uses the recurrent `ssm_step`), or call `step(x [B, E])`. Decoding equals the full forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nexus_jax.layers.feedforward import default_kernel_init
from nexus_jax.layers.projection import Projection

Dtype = Any
SCAN_METHODS = ("chunked", "associative", "sequential")


def _combine(left, right):
  """Composes two steps of `h -> a h + b` (left first): `(a1 a2, a2 b1 + b2)`."""
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _discretize(x_BLD, delta_BLD, A_DN, B_BLN):
  """Zero-order-hold decay `a = exp(delta A)` and input `b = delta B x`, both `[B, L, D, N]`."""
  a_BLDN = jnp.exp(delta_BLD[..., None] * A_DN)
  b_BLDN = (delta_BLD * x_BLD)[..., None] * B_BLN[:, :, None, :]
  return a_BLDN, b_BLDN


def ssm_step(h_BDN, x_BD, delta_BD, A_DN, B_BN, C_BN):
  """One recurrence step: returns `(h_t [B, D, N], y_t [B, D])` (without the D skip)."""
  h_BDN = jnp.exp(delta_BD[..., None] * A_DN) * h_BDN + (delta_BD * x_BD)[..., None] * B_BN[:, None]
  return h_BDN, jnp.einsum("bdn,bn->bd", h_BDN, C_BN)


def _scan_sequential(x_BLD, delta_BLD, A_DN, B_BLN, C_BLN, h_BDN):
  def body(h, inputs):
    return ssm_step(h, *inputs[:2], A_DN, *inputs[2:])

  time_major = [jnp.swapaxes(t, 0, 1) for t in (x_BLD, delta_BLD, B_BLN, C_BLN)]
  h_BDN, y_LBD = lax.scan(body, h_BDN, time_major)
  return jnp.swapaxes(y_LBD, 0, 1), h_BDN


def _scan_associative(x_BLD, delta_BLD, A_DN, B_BLN, C_BLN, h_BDN):
  a_BLDN, b_BLDN = _discretize(x_BLD, delta_BLD, A_DN, B_BLN)
  b_BLDN = b_BLDN.at[:, 0].add(a_BLDN[:, 0] * h_BDN)  # fold the initial state into step 0
  _, h_BLDN = lax.associative_scan(_combine, (a_BLDN, b_BLDN), axis=1)
  return jnp.einsum("bldn,bln->bld", h_BLDN, C_BLN), h_BLDN[:, -1]


def _scan_chunked(x_BLD, delta_BLD, A_DN, B_BLN, C_BLN, h_BDN, chunk_size):
  b, length, _ = x_BLD.shape
  cs = min(chunk_size, length)
  pad = -length % cs
  # Padded steps have delta = 0, i.e. a = 1 and b = 0: they leave the state unchanged.
  inputs = [jnp.pad(t, ((0, 0), (0, pad), (0, 0))) for t in (x_BLD, delta_BLD, B_BLN, C_BLN)]
  chunks = [t.reshape(b, -1, cs, t.shape[-1]).swapaxes(0, 1) for t in inputs]  # [nc, B, cs, .]

  @jax.checkpoint
  def chunk(h_BDN, inputs):
    x_BCD, delta_BCD, B_BCN, C_BCN = inputs
    y_BCD, h_BDN = _scan_associative(x_BCD, delta_BCD, A_DN, B_BCN, C_BCN, h_BDN)
    return h_BDN, y_BCD

  h_BDN, y_KBCD = lax.scan(chunk, h_BDN, chunks)
  y_BLD = y_KBCD.swapaxes(0, 1).reshape(b, -1, x_BLD.shape[-1])[:, :length]
  return y_BLD, h_BDN


def selective_scan(
    x_BLD,
    delta_BLD,
    A_DN,
    B_BLN,
    C_BLN,
    h0_BDN=None,
    *,
    method: str = "chunked",
    chunk_size: int = 64,
):
  """Runs `h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`, `y_t = C_t . h_t` over L.

  Args: x, delta `[B, L, D]`; A `[D, N]`; B, C `[B, L, N]`; h0 `[B, D, N]` (default zeros);
    method one of SCAN_METHODS; chunk_size for "chunked".
  Returns: `(y [B, L, D], h_L [B, D, N])`, float32.
  """
  if method not in SCAN_METHODS:
    raise ValueError(f"Unknown scan method {method!r}; choose one of {SCAN_METHODS}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  if x_BLD.ndim != 3 or delta_BLD.shape != x_BLD.shape:
    raise ValueError(
        f"x and delta must both be [batch, length, channels]; got {x_BLD.shape} "
        f"and {delta_BLD.shape}."
    )
  b, length, d = x_BLD.shape
  if A_DN.ndim != 2 or A_DN.shape[0] != d:
    raise ValueError(f"A must be [channels={d}, state], got {A_DN.shape}.")
  n = A_DN.shape[1]
  if B_BLN.shape != (b, length, n) or C_BLN.shape != (b, length, n):
    raise ValueError(
        f"B and C must be [batch, length, state] = {(b, length, n)}; got "
        f"{B_BLN.shape} and {C_BLN.shape}."
    )
  if h0_BDN is None:
    h0_BDN = jnp.zeros((b, d, n), jnp.float32)
  elif h0_BDN.shape != (b, d, n):
    raise ValueError(f"h0 must be [batch, channels, state] = {(b, d, n)}, got {h0_BDN.shape}.")
  args = [t.astype(jnp.float32) for t in (x_BLD, delta_BLD, A_DN, B_BLN, C_BLN, h0_BDN)]
  if length == 0:
    return jnp.zeros((b, 0, d), jnp.float32), args[-1]
  if method == "sequential":
    return _scan_sequential(*args)
  if method == "associative":
    return _scan_associative(*args)
  return _scan_chunked(*args, chunk_size)


def causal_depthwise_conv(x_BLD, kernel_WD, prefix_BPD=None):
  """`y_t = sum_k kernel[k] * x_{t - W + 1 + k}` per channel; `prefix [B, W-1, D]` holds the
  inputs before position 0 (zeros if None). Returns `(y [B, L, D], new_prefix [B, W-1, D])`."""
  w = kernel_WD.shape[0]
  b, length, d = x_BLD.shape
  if prefix_BPD is None:
    prefix_BPD = jnp.zeros((b, w - 1, d), x_BLD.dtype)
  full = jnp.concatenate([prefix_BPD.astype(x_BLD.dtype), x_BLD], axis=1)  # [B, W-1+L, D]
  y_BLD = sum(full[:, k : k + length] * kernel_WD[k] for k in range(w))
  return y_BLD, full[:, full.shape[1] - (w - 1) :]


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """Bias with softplus(bias) = dt, dt log-uniform in [dt_min, dt_max] (Mamba's init)."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus

  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A[d, n] = -(n + 1), stored as log(n + 1)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(
      dtype
  )


class SelectiveSSM(nn.Module):
  """Mamba block: `x [B, L, E] -> (y [B, L, E], aux)`.

  aux: `delta [B, L, Di]` (float32 step sizes) and `final_state [B, Di, N]` (h after the last
  position, float32).
  """

  state_dim: int = 16  # N
  expand: int = 2  # Di = expand * E
  conv_width: int = 4  # causal depthwise convolution width (1 disables mixing in time)
  dt_rank: int | None = None  # None: ceil(E / 16)
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  scan_method: str = "chunked"  # one of SCAN_METHODS
  chunk_size: int = 64
  use_bias: bool = False  # on the input/output projections
  decode: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init()

  def _check(self, x):
    if x.ndim != 3:
      raise ValueError(f"SelectiveSSM input must be [batch, length, embed]; got {x.shape}.")
    for name in ("state_dim", "expand", "conv_width", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SelectiveSSM.{name} must be >= 1, got {getattr(self, name)}.")
    if self.dt_rank is not None and self.dt_rank < 1:
      raise ValueError(f"SelectiveSSM.dt_rank must be >= 1 or None, got {self.dt_rank}.")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}.")
    if self.scan_method not in SCAN_METHODS:
      raise ValueError(
          f"SelectiveSSM.scan_method {self.scan_method!r} is not one of {SCAN_METHODS}."
      )

  def _dense(self, features, names, name, use_bias, kernel_init=None, bias_init=None, dtype=None):
    return Projection(
        features,
        kernel_axes=names,
        use_bias=use_bias,
        dtype=dtype or self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=kernel_init or self.kernel_init,
        bias_init=bias_init or nn.initializers.zeros,
        name=name,
    )

  @nn.compact
  def __call__(self, x):
    """`x [B, T, E]` -> `(y [B, T, E], aux)`; see the module docstring for decoding."""
    self._check(x)
    b, t, e = x.shape
    di, n = self.expand * e, self.state_dim
    r = self.dt_rank or math.ceil(e / 16)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)

    xz = self._dense((2, di), ("embed", None, "mlp"), "in_proj", self.use_bias)(x)
    u, z = xz[..., 0, :], xz[..., 1, :]
    u = nn.with_logical_constraint(u, ("batch", "length", "mlp"))

    conv_kernel = self.param(
        "conv_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), (None, "mlp")
        ),
        (self.conv_width, di),
        self.param_dtype,
    )
    conv_bias = self.param(
        "conv_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        (di,),
        self.param_dtype,
    )

    decoding = self.decode and self.has_variable("cache", "ssm_state")
    if self.decode:
      conv_state = self.variable(
          "cache", "conv_state", jnp.zeros, (b, self.conv_width - 1, di), jnp.float32
      )
      ssm_state = self.variable("cache", "ssm_state", jnp.zeros, (b, di, n), jnp.float32)
      if decoding and ssm_state.value.shape[0] != b:
        raise ValueError(
            f"decode batch {b} does not match the cache batch "
            f"{ssm_state.value.shape[0]}; re-initialise the cache."
        )
    prefix = conv_state.value.astype(dtype) if decoding else None
    u, new_prefix = causal_depthwise_conv(u, conv_kernel.astype(dtype), prefix)
    u = nn.silu(u + conv_bias.astype(dtype))

    proj = self._dense(r + 2 * n, ("mlp", None), "x_proj", False)(u).astype(jnp.float32)
    dt_low, B, C = proj[..., :r], proj[..., r : r + n], proj[..., r + n :]
    dt_std = r**-0.5  # Mamba: dt_proj kernel ~ U(-r^-0.5, r^-0.5)
    delta = self._dense(
        di,
        (None, "mlp"),
        "dt_proj",
        True,
        kernel_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -dt_std, dt_std),
        bias_init=_dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
        dtype=jnp.float32,
    )(dt_low)
    delta = nn.softplus(delta.astype(jnp.float32))
    A = -jnp.exp(
        self.param(
            "A_log",
            nn.with_logical_partitioning(_a_log_init, ("mlp", None)),
            (di, n),
            self.param_dtype,
        ).astype(jnp.float32)
    )
    D = self.param(
        "D", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)), (di,), self.param_dtype
    ).astype(jnp.float32)

    u32 = u.astype(jnp.float32)
    h0 = ssm_state.value if decoding else None
    if decoding and t == 1:
      h_last, y = ssm_step(h0, u32[:, 0], delta[:, 0], A, B[:, 0], C[:, 0])
      y = y[:, None]
    else:
      y, h_last = selective_scan(
          u32, delta, A, B, C, h0, method=self.scan_method, chunk_size=self.chunk_size
      )
    if decoding:
      conv_state.value = new_prefix.astype(jnp.float32)
      ssm_state.value = h_last
    y = (y + u32 * D).astype(dtype) * nn.silu(z)
    out = self._dense(e, ("mlp", "embed"), "out_proj", self.use_bias)(y)
    out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
    return out, {"delta": delta, "final_state": h_last}

  def step(self, x_BE):
    """One decoding step `x [B, E] -> (y [B, E], aux)`; needs decode=True and `mutable=["cache"]`."""
    if not self.decode:
      raise ValueError("SelectiveSSM.step needs decode=True (the state lives in the cache).")
    if x_BE.ndim != 2:
      raise ValueError(f"step input must be [batch, embed]; got {x_BE.shape}.")
    y, aux = self(x_BE[:, None])
    return y[:, 0], aux
