"""Training objectives (`train.steps.Objective`) for the sequence models' heads.

Batch layouts (numpy arrays; `weight [B]` is added by `ArrayDataset`):
- `lm_objective`: `tokens [B, T+1]` int, optional `mask [B, T+1]` (1 = real token). Inputs are
  `tokens[:, :-1]`, targets `tokens[:, 1:]`. Metrics: `bits_per_token`, `accuracy`.
- `classification_objective`: `inputs [B, T] | [B, T, F]`, optional `mask [B, T]`, `label [B]` int.
- `regression_objective`: same inputs, `target [B, num_outputs]`; loss MSE, metric `mae`.
- `seq2seq_objective` (EncoderDecoder): `source`, optional `source_mask [B, S]`, and either
  `targets [B, T+1]` int (teacher forcing on `targets[:, :-1]`, `target_mask [B, T+1]`), for an
  LM head, or `decoder_inputs [B, T, F]` + `targets [B, T, num_outputs]` for token_regression
  (loss MSE, metric `mae`).
- `token_regression_objective` (decoder / encoder with a token_regression head):
  `inputs`, `targets [B, T, num_outputs]`, optional `target_mask [B, T]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from nexus_jax.train.steps import Objective


def _wmean(values, weights):
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def token_cross_entropy(logits_BTV, targets_BT, weights_BT):
  """Weighted mean next-token cross-entropy (nats) and accuracy over `weights > 0` tokens."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  correct = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
  return _wmean(nll, weights_BT), _wmean(correct, weights_BT)


def _row_weights(batch, mask_key, length):
  w = batch["weight"][:, None] * jnp.ones((1, length), jnp.float32)
  if mask_key in batch:
    w = w * batch[mask_key].astype(jnp.float32)
  return w


def _lm_loss(outputs, batch):
  targets = batch["tokens"][:, 1:]
  weights = _row_weights(batch, "mask", batch["tokens"].shape[1])[:, 1:]
  loss, acc = token_cross_entropy(outputs, targets, weights)
  return loss, {"bits_per_token": loss / math.log(2.0), "accuracy": acc}


def lm_objective(model) -> Objective:
  """Next-token prediction for a decoder-only model (see the module docstring)."""

  def inputs(batch, train):
    kw = {"inputs": batch["tokens"][:, :-1], "deterministic": not train}
    if "mask" in batch:
      kw["mask"] = batch["mask"][:, :-1]
    return kw

  return Objective(
      model=model, loss=_lm_loss, inputs=inputs, predict=lambda logits: jnp.argmax(logits, -1)
  )


def _pooled_inputs(batch, train):
  kw = {"inputs": batch["inputs"], "deterministic": not train}
  if "mask" in batch:
    kw["mask"] = batch["mask"]
  return kw


def classification_objective(model) -> Objective:
  """Pooled sequence classification: softmax cross-entropy; metric accuracy."""

  def loss(logits, batch):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    acc = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return _wmean(nll, batch["weight"]), {"accuracy": _wmean(acc, batch["weight"])}

  return Objective(
      model=model,
      loss=loss,
      inputs=_pooled_inputs,
      predict=lambda logits: jax.nn.softmax(logits, -1),
  )


def _mse_mae(pred, target, weights):
  err = pred - target.astype(jnp.float32)
  per = lambda x: jnp.mean(x.reshape(x.shape[: weights.ndim] + (-1,)), axis=-1)
  return _wmean(per(err**2), weights), {"mae": _wmean(per(jnp.abs(err)), weights)}


def regression_objective(model) -> Objective:
  """Pooled sequence regression: MSE loss; metric MAE."""
  return Objective(
      model=model,
      inputs=_pooled_inputs,
      loss=lambda pred, batch: _mse_mae(pred, batch["target"], batch["weight"]),
  )


def token_regression_objective(model) -> Objective:
  """Per-token regression (`targets [B, T, num_outputs]`): MSE loss; metric MAE."""

  def loss(pred, batch):
    return _mse_mae(pred, batch["targets"], _row_weights(batch, "target_mask", pred.shape[1]))

  def inputs(batch, train):
    return {"inputs": batch["inputs"], "deterministic": not train}

  return Objective(model=model, loss=loss, inputs=inputs)


def seq2seq_objective(model) -> Objective:
  """Encoder-decoder teacher forcing; LM head (token targets) or token_regression head."""
  lm = model.head == "lm"

  def inputs(batch, train):
    targets = batch["targets"][:, :-1] if lm else batch["decoder_inputs"]
    kw = {"source": batch["source"], "targets": targets, "deterministic": not train}
    if "source_mask" in batch:
      kw["source_mask"] = batch["source_mask"]
    if lm and "target_mask" in batch:
      kw["target_mask"] = batch["target_mask"][:, :-1]
    return kw

  def loss(outputs, batch):
    if not lm:
      return _mse_mae(
          outputs, batch["targets"], _row_weights(batch, "target_mask", outputs.shape[1])
      )
    weights = _row_weights(batch, "target_mask", batch["targets"].shape[1])[:, 1:]
    nll, acc = token_cross_entropy(outputs, batch["targets"][:, 1:], weights)
    return nll, {"accuracy": acc}

  return Objective(
      model=model,
      loss=loss,
      inputs=inputs,
      predict=(lambda out: jnp.argmax(out, -1)) if lm else (lambda out: out),
  )
