"""PonderNet adaptive depth: one shared-weight step applied up to `max_steps` times, learned halting.

`PonderNet(step=..., max_steps=N)(state, *step_args) -> (y, aux)` (Banino et al. 2021,
"PonderNet: Learning to Ponder"; the halting unit follows ACT in Universal Transformers).

- The step is any Flax module `step(state, *step_args) -> state` (or `-> (state, aux)`, as
  `TransformerBlock` returns): e.g. an MLP or GRU cell on `[B, D]`, or a `TransformerBlock` on
  `[B, T, D]`. It runs N times under `nn.scan` with its params broadcast (one set, shared by every
  step); `step_args` (the input x of a recurrent step, a mask, ...) are broadcast to every step.
- After step n the halting unit gives `lambda_n = sigmoid(w . pool(h_n) + b)`, with a negative
  initial bias (`halt_bias_init`) so the model does not halt at step 1 at init. `halt_per="example"`
  mean-pools a `[B, T, D]` state over T (masked); `"token"` halts every position on its own (the
  Universal-Transformer way to use this as a repeated block in an LM).
- The halting distribution `p_n = lambda_n prod_{j<n} (1 - lambda_j)`, with `lambda_N = 1` so the
  remainder sits on the last step and `sum_n p_n = 1`.
- Per-step outputs `y_n = head(h_n)` (the caller's `head` module, shared over steps) or the states.
- Regulariser: `KL(p || truncated geometric(prior))`, the prior renormalised over n = 1..N, averaged
  over examples (tokens), sown as `beta * KL` into the "aux_loss" collection under "ponder_kl"
  (as layers/moe.py sows its losses; the training loop adds it to the objective).
- Training objective: `expected_loss(per_step_losses, aux["halting_probs"]) + aux loss`.
- Inference halting: `halt_mode="threshold"` halts at the first step whose cumulative halting
  probability is >= `threshold`; `"sample"` draws a Bernoulli(lambda_n) per step (rng "ponder")
  and halts at the first success. `y` is the per-step output at that step. All N steps are always
  computed (fixed shapes under jit); the chosen step is what an early-exit runtime would spend.

Shapes (step axis leading, as `nn.scan` stacks): with `L = [B]` (example halting) or `[B, T]`
(token halting), `aux` holds `per_step [N, B, ...]`, `lambdas [N, *L]`, `halting_probs [N, *L]`,
`halt_step [*L]` (int32, 1-indexed), `expected_steps [*L]` (`sum_n n p_n`), `ponder_kl` (scalar,
unweighted). `y [B, ...]`; with token halting each token's output is taken at its own step.

In an LM: `PonderNet(step=TransformerBlock(..., causal=True), max_steps=N, halt_per="token",
head=None)(x_BTD, None, None, None, mask)` (the block's positional arguments after x are broadcast)
gives per-token depth; train on `expected_loss` of the per-step next-token losses
(`lm_head(aux["per_step"])`), decode from `y`. Tokens that halted keep being updated for the
tokens that still attend to them (PonderNet's formulation has no per-token state freezing).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HALT_MODES = ("threshold", "sample")
HALT_PER = ("example", "token")


def halting_distribution(lambdas_N):
  """`lambdas [N, ...]` -> `p [N, ...]`, `p_n = lambda_n prod_{j<n}(1 - lambda_j)`, `lambda_N := 1`.

  The remainder `prod_{j<N}(1 - lambda_j)` goes to the last step, so p sums to 1 over axis 0.
  """
  lambdas_N = lambdas_N.at[-1].set(1.0)
  survive = jnp.cumprod(1.0 - lambdas_N, axis=0)  # prod_{j<=n}(1 - lambda_j)
  not_halted = jnp.concatenate([jnp.ones_like(survive[:1]), survive[:-1]], axis=0)
  return lambdas_N * not_halted


def truncated_geometric(prior: float, max_steps: int) -> np.ndarray:
  """`q_n ∝ prior (1 - prior)^(n - 1)` for n = 1..max_steps, renormalised to sum to 1 (float64)."""
  n = np.arange(max_steps, dtype=np.float64)
  q = prior * np.power(1.0 - prior, n)  # prior = 1 gives [1, 0, 0, ...] (0 ** 0 = 1)
  return q / q.sum()


def ponder_kl(halting_probs_N, prior: float, mask=None):
  """Mean over examples (valid tokens) of `KL(p || truncated_geometric(prior, N))`; float32 scalar.

  `halting_probs [N, ...]`; `mask` broadcastable to `halting_probs.shape[1:]` (1 = counted).
  Steps where the prior is 0 (prior = 1, n > 1) use log q = log(1e-30), a large finite penalty.
  """
  p = halting_probs_N.astype(jnp.float32)
  q = truncated_geometric(prior, p.shape[0])
  log_q = jnp.asarray(np.log(np.maximum(q, 1e-30)), jnp.float32).reshape(
      (-1,) + (1,) * (p.ndim - 1)
  )
  kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-30)) - log_q), axis=0)  # 0 log 0 = 0
  return _mean(kl, mask)


def expected_loss(per_step_losses_N, halting_probs_N, mask=None):
  """PonderNet's reconstruction loss `mean over examples of sum_n p_n L_n`; float32 scalar.

  `per_step_losses [N, ...]` (the loss of each step's output, per example or token) and
  `halting_probs [N, ...]` of the same shape (`aux["halting_probs"]`); `mask` as in `ponder_kl`.
  """
  loss = jnp.sum(
      halting_probs_N.astype(jnp.float32) * per_step_losses_N.astype(jnp.float32), axis=0
  )
  return _mean(loss, mask)


def _mean(x, mask):
  if mask is None:
    return jnp.mean(x)
  w = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def halt_step_threshold(halting_probs_N, threshold: float):
  """First 1-indexed step whose cumulative halting probability is >= threshold; `[...]` int32."""
  reached = jnp.cumsum(halting_probs_N, axis=0) >= threshold
  reached = reached.at[-1].set(True)  # p sums to 1; guard against rounding below threshold
  return (jnp.argmax(reached, axis=0) + 1).astype(jnp.int32)


def halt_step_sample(lambdas_N, key):
  """First 1-indexed step whose Bernoulli(lambda_n) draw halts (the last step always does)."""
  halt = jax.random.bernoulli(key, lambdas_N.astype(jnp.float32))
  halt = halt.at[-1].set(True)
  return (jnp.argmax(halt, axis=0) + 1).astype(jnp.int32)


class _PonderStep(nn.Module):
  """One scanned step: `h -> (h', (y_n, lambda_n))`; the modules are PonderNet's (shared)."""

  step: nn.Module
  head: nn.Module | None
  halt: nn.Module
  halt_per: str

  def __call__(self, h, mask, *step_args):
    out = self.step(h, *step_args)
    h = out[0] if isinstance(out, tuple) else out
    y = h if self.head is None else self.head(h)
    pooled = h.astype(jnp.float32)
    if pooled.ndim == 3 and self.halt_per == "example":  # masked mean over T
      w = jnp.ones(h.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
      pooled = jnp.einsum("btd,bt->bd", pooled, w) / jnp.maximum(w.sum(1)[:, None], 1.0)
    return h, (y, jax.nn.sigmoid(self.halt(pooled)[..., 0]))


class PonderNet(nn.Module):
  """`state [B, D] | [B, T, D] -> (y at the halting step, aux)`; see the module docstring."""

  step: nn.Module  # shared-weight step: step(state, *step_args) -> state | (state, aux)
  max_steps: int = 10
  head: nn.Module | None = None  # per-step output y_n = head(h_n); None: y_n = h_n
  prior: float = 0.2  # lambda_p of the geometric prior, in (0, 1]; its mean is 1 / prior steps
  beta: float = 0.01  # coefficient of the KL regulariser sown into "aux_loss"
  halt_bias_init: float = -2.0  # initial halting logit: sigmoid(-2) = 0.12 per step
  halt_per: str = "example"  # "example" | "token" (per-position halting on [B, T, D])
  halt_mode: str = "threshold"  # inference halting: "threshold" | "sample" (rng "ponder")
  threshold: float = 0.5  # halt at the first step with cumulative halting probability >= this

  def _check(self, state):
    name = type(self).__name__
    if not isinstance(self.max_steps, (int, np.integer)) or self.max_steps < 1:
      raise ValueError(f"{name}.max_steps must be an integer >= 1; got {self.max_steps!r}.")
    if not 0.0 < self.prior <= 1.0:
      raise ValueError(
          f"{name}.prior (lambda_p of the geometric prior) must be in (0, 1]; got {self.prior!r}."
      )
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"{name}.threshold must be in (0, 1]; got {self.threshold!r}.")
    if self.beta < 0:
      raise ValueError(f"{name}.beta must be >= 0; got {self.beta!r}.")
    if self.halt_mode not in HALT_MODES:
      raise ValueError(f"{name}.halt_mode must be one of {HALT_MODES}; got {self.halt_mode!r}.")
    if self.halt_per not in HALT_PER:
      raise ValueError(f"{name}.halt_per must be one of {HALT_PER}; got {self.halt_per!r}.")
    if state.ndim not in (2, 3):
      raise ValueError(
          f"{name} state must be [batch, dim] or [batch, length, dim]; got {state.shape}."
      )
    if self.halt_per == "token" and state.ndim != 3:
      raise ValueError(
          f"{name}.halt_per='token' needs a [batch, length, dim] state; got {state.shape}."
      )

  @nn.compact
  def __call__(self, state, *step_args, mask=None):
    """`state [B, D]` or `[B, T, D]`; `step_args` go to every step unchanged; `mask [B, T]` marks
    the real tokens for the halting pool and the KL mean. Returns `(y, aux)` (module docstring)."""
    self._check(state)
    halt = nn.Dense(
        1,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.halt_bias_init),
        name="halt",
    )
    scan = nn.scan(
        _PonderStep,
        variable_broadcast="params",
        variable_axes={"aux_loss": 0, "intermediates": 0, "cache": 0},  # a KV cache per step
        split_rngs={"params": False, "dropout": True},
        in_axes=(nn.broadcast,) * (1 + len(step_args)),
        length=self.max_steps,
    )
    steps_fn = scan(self.step, self.head, halt, self.halt_per, name="steps")
    _, (per_step, lambdas) = steps_fn(state, mask, *step_args)
    lambdas = lambdas.at[-1].set(1.0)
    probs = halting_distribution(lambdas)
    kl = ponder_kl(probs, self.prior, mask if self.halt_per == "token" else None)
    if self.beta:
      self.sow("aux_loss", "ponder_kl", self.beta * kl)

    if self.halt_mode == "sample":
      halt_step = halt_step_sample(lambdas, self.make_rng("ponder"))
    else:
      halt_step = halt_step_threshold(probs, self.threshold)
    trailing = (1,) * (per_step.ndim - 1 - halt_step.ndim)
    idx = (halt_step - 1).reshape((1,) + halt_step.shape + trailing)
    y = jnp.take_along_axis(per_step, idx, axis=0)[0]
    n = jnp.arange(1, self.max_steps + 1, dtype=jnp.float32)
    aux = {
        "per_step": per_step,
        "lambdas": lambdas,
        "halting_probs": probs,
        "halt_step": halt_step,
        "expected_steps": jnp.einsum("n,n...->...", n, probs),
        "ponder_kl": kl,
    }
    return y, aux
