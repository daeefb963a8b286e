"""Start a training run from a saved model folder (`train.init_from`), checking it is the same model.

    model, params = init_from_saved("runs/mixtral/model", lm_from_config(config.model, vocab))
    fit(lm_objective(model), train, valid, config, workdir, init_params=params)

The folder is one `models.saving.save_model` wrote (a trained run's `<workdir>/model`, or an
imported HF checkpoint: `nexus-lm import-hf`). Every architecture field of the configured model
must equal the saved one (a ValueError lists each difference as the config field to set); the
training-only fields in `TRAINING_FIELDS` (compute dtype, dropout, attention backend, MoE loss
coefficients, capacity, remat) are taken from the configured model. The vocabulary must match:
the tokenizer has to be the one the weights were trained with.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn

TRAINING_FIELDS = (
    "dtype",
    "dropout_rate",
    "attention_backend",
    "moe_load_balance_coef",
    "moe_z_loss_coef",
    "moe_router_jitter",
    "moe_capacity_factor",
    "remat_policy",
    "decode",
)


def _fields(model: nn.Module) -> list[str]:
  return [f.name for f in dataclasses.fields(model) if f.init and f.name not in ("parent", "name")]


def init_from_saved(
    path: str | os.PathLike, configured: nn.Module, field: str = "config.train.init_from"
) -> tuple[nn.Module, Any]:
  """`(model, params)`: the saved model with `configured`'s training fields, and its params.

  Raises ValueError (naming `field` and each differing architecture field) when the saved model
  is not the configured one.
  """
  from nexus_jax.models.saving import load_model

  saved = load_model(path, family=("lm", "decoder", "hybrid"))
  if type(saved.model) is not type(configured):
    raise ValueError(
        f"{field}={path}: holds a {type(saved.model).__name__}, the run trains a "
        f"{type(configured).__name__}"
    )
  diffs = []
  for name in _fields(configured):
    ours, theirs = getattr(configured, name), getattr(saved.model, name)
    if name in TRAINING_FIELDS or ours == theirs:
      continue
    if name == "vocab_size":
      diffs.append(
          f"vocab_size: the data's tokenizer has {ours} tokens, the saved model {theirs} (the "
          "tokenizer must be the one the weights were trained with)"
      )
    else:
      diffs.append(f"{name}: configured {ours!r}, saved {theirs!r}")
  if diffs:
    raise ValueError(
        f"{field}={path}: the saved model is not the configured one; set the config.model "
        f"fields to the saved values: {'; '.join(diffs)}"
    )
  model = saved.model.clone(**{f: getattr(configured, f) for f in TRAINING_FIELDS})
  return model, saved.variables["params"]
