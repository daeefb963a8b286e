"""PonderNet adaptive depth in a decoder LM (`Decoder(ponder_steps=N)`, `configs/lm.py`).

After the layer stack, one more causal `TransformerBlock` is applied up to N times with shared
weights (`layers/pondernet.PonderNet`, `halt_per="token"`): every token gets its own halting
distribution over the N steps, and every step's state goes through a shared norm + the LM head.

    model = LanguageModel(..., ponder_steps=4, ponder_prior=0.5)
    logits, aux = model.apply(params, tokens)   # logits [B, T, V] at each token's halting step
    aux["ponder"]["per_step_logits"]            # [N, B, T, V]
    aux["ponder"]["halting_probs"]              # [N, B, T], sums to 1 over N
    aux["ponder"]["halt_step"]                  # [B, T] int32, 1-indexed (threshold halting)
    aux["ponder"]["expected_steps"]             # [B, T]
    fit(ponder_lm_objective(model), ...)        # expected loss + the sown KL to the prior

Training: `ponder_lm_objective` minimises PonderNet's expected next-token loss
`sum_n p_n CE_n` (plus `ponder_beta * KL(p || geometric(ponder_prior))`, sown by the layer and
added by the training loop). Decoding with the KV cache runs all N steps, each with its own cache
(`nn.scan` over steps with a `"cache"` axis), and reads the logits at the first step whose
cumulative halting probability reaches `ponder_threshold` — exactly what the full forward returns,
so `generate` works unchanged. Halted tokens keep being updated for the tokens that still attend
to them (PonderNet's formulation), so all N steps are computed; `halt_step` is the depth a
token asked for. Not supported (ValueError): cross-attention, adaptive norms, non-LM heads.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

from nexus_jax.layers.blocks import TransformerBlock
from nexus_jax.layers.norms import apply_norm, make_norm
from nexus_jax.layers.pondernet import PonderNet, expected_loss
from nexus_jax.models.seq_objectives import _row_weights
from nexus_jax.train.steps import Objective


def check_ponder(model) -> None:
  """ValueError naming the field for settings the ponder head cannot take."""
  steps = model.ponder_steps
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(f"ponder_steps must be an integer >= 0 (0 = off); got {steps!r}.")
  if not 0.0 < model.ponder_prior <= 1.0:
    raise ValueError(f"ponder_prior (lambda_p) must be in (0, 1]; got {model.ponder_prior!r}.")
  if not 0.0 < model.ponder_threshold <= 1.0:
    raise ValueError(f"ponder_threshold must be in (0, 1]; got {model.ponder_threshold!r}.")
  if model.ponder_beta < 0:
    raise ValueError(f"ponder_beta must be >= 0; got {model.ponder_beta!r}.")
  if steps and (model.cross_attention or model.adaptive_norm or model.head != "lm"):
    raise ValueError(
        "ponder_steps > 0 needs a decoder-only LM (head='lm', no cross-attention, no adaptive "
        f"norm); got head={model.head!r}, cross_attention={model.cross_attention}, "
        f"norm={model.norm!r}."
    )


def ponder_outputs(model, x_BTD, embed, positions, mask, deterministic: bool, aux: dict):
  """Called inside `Decoder.__call__` after the stack: `(logits [B, T, V], aux + "ponder")`."""
  check_ponder(model)
  # parent=None: an unbound template that PonderNet adopts (its params live under "ponder").
  block = TransformerBlock(**model.block_kwargs(causal=True, cross=False), parent=None)
  net = PonderNet(
      step=block,
      max_steps=model.ponder_steps,
      prior=model.ponder_prior,
      beta=model.ponder_beta,
      threshold=model.ponder_threshold,
      halt_per="token",
      name="ponder",
  )
  token_mask = None if (model.decode or mask is None) else mask  # decoding: mask = cache slots
  # TransformerBlock(x, context, segment_ids, positions, mask, context_mask, deterministic)
  _, paux = net(x_BTD, None, None, positions, mask, None, deterministic, mask=token_mask)
  norm = make_norm(
      model.norm,
      epsilon=model.norm_epsilon,
      dtype=model.dtype,
      param_dtype=model.param_dtype,
      name="ponder_norm",
  )
  per_step = model.apply_head(apply_norm(norm, paux["per_step"]), embed)  # [N, B, T, V]
  idx = (paux["halt_step"] - 1)[None, ..., None]
  logits = jnp.take_along_axis(per_step, idx, axis=0)[0]
  aux = {
      **aux,
      "ponder": {
          "per_step_logits": per_step,
          "halting_probs": paux["halting_probs"],
          "halt_step": paux["halt_step"],
          "expected_steps": paux["expected_steps"],
      },
  }
  return logits, aux


@dataclasses.dataclass(frozen=True, eq=False)
class PonderTrainView:
  """The training loop's view of a ponder LM: same `init` / params; `apply` returns
  `((per_step_logits [N, B, T, V], halting_probs [N, B, T], logits [B, T, V]), aux)`."""

  model: object

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, mutable=False, **kwargs):
    out = self.model.apply(variables, *args, mutable=mutable, **kwargs)
    (logits, aux), updates = out if mutable is not False else (out, None)
    ponder = aux["ponder"]
    outputs = (ponder["per_step_logits"], ponder["halting_probs"], logits)
    return ((outputs, aux), updates) if mutable is not False else (outputs, aux)


def ponder_lm_objective(model) -> Objective:
  """`seq_objectives.lm_objective`'s batches with PonderNet's expected loss. Metrics:
  `bits_per_token` / `accuracy` / `halt_loss` (nats) at each token's halting step (what
  generation uses), `expected_steps` and `halt_steps` (means over real tokens)."""
  if not model.ponder_steps:
    raise ValueError("ponder_lm_objective needs a model with ponder_steps > 0.")
  check_ponder(model)

  def inputs(batch, train):
    kw = {"inputs": batch["tokens"][:, :-1], "deterministic": not train}
    if "mask" in batch:
      kw["mask"] = batch["mask"][:, :-1]
    return kw

  def loss(outputs, batch):
    per_step, probs, logits = outputs
    targets = batch["tokens"][:, 1:]
    w = _row_weights(batch, "mask", batch["tokens"].shape[1])[:, 1:]
    nll_N = optax.softmax_cross_entropy_with_integer_labels(per_step, targets[None])  # [N, B, T]
    total = expected_loss(nll_N, probs, w)
    mean = lambda v: jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1e-9)  # noqa: E731
    halt_nll = mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    steps = jnp.arange(1, probs.shape[0] + 1, dtype=jnp.float32)[:, None, None]
    metrics = {
        "bits_per_token": halt_nll / math.log(2.0),
        "halt_loss": halt_nll,
        "accuracy": mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32)),
        "expected_steps": mean(jnp.sum(steps * probs, axis=0)),
    }
    return total, metrics

  return Objective(
      model=PonderTrainView(model),
      loss=loss,
      inputs=inputs,
      predict=lambda outputs: jnp.argmax(outputs[2], -1),
  )


__all__ = ["PonderTrainView", "check_ponder", "ponder_lm_objective", "ponder_outputs"]
