"""NexusFormer from a config + data, through a JSON-able spec (what an artifact stores to rebuild it).

    spec = nexus_former_spec(config.model, data, n_outputs=1)   # plain dict: ints, floats, strings, lists
    model = build_nexus_former(spec, compute_dtype="float32")

The spec holds every constructor argument of `NexusFormer`, including the feature layouts read from
the `RelationalData` (numeric feature counts and categorical cardinalities per context) and each
context's encoder with its hyperparameters (`contexts[i]["encoder_kwargs"]`, the ones of
`config.model.context_encoder_kwargs` that encoder accepts; see `config_encoder_kwargs`), so a model
can be rebuilt without the training data. A deep ensemble's spec adds ``ensemble_size``, ``task`` and
``ensemble_mode`` ("sequential": `MemberEnsemble`, params ``member_i``; "batched": `BatchedEnsemble`,
params ``members`` with a leading member axis; specs written before the field are "sequential"; see
`training.train_nexus_former`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import ml_collections

from nexus_jax.models.tabular.ensemble import BatchedEnsemble, MemberEnsemble
from nexus_jax.models.tabular.nexus_former import NexusFormer, TableFeatures
from nexus_jax.models.tabular.registry import encoder_fields, encoder_for_table, get_encoder
from nexus_jax.nexusflow.config import PRESETS, tabular_config
from nexus_jax.train.config import COMPUTE_DTYPES, compute_dtype  # noqa: F401 (re-exported)

MODEL_FIELDS = (
    "d_model",
    "n_heads",
    "pool_heads",
    "ffn_factor",
    "refine_iterations",
    "max_inference_iterations",
    "convergence_tol",
    "top_k_contexts",
    "share_table_encoders",
    "d_head",
    "dropout",
    "attention_dropout",
    "join_context_rows",
    "linear_head",
)
# Fields added after the first artifacts were written, with the value those artifacts were trained with.
FIELD_DEFAULTS = {"join_context_rows": False, "linear_head": False}
ENSEMBLE_MODES = ("batched", "sequential")


def _plain(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _same(a: Any, b: Any) -> bool:
  norm = lambda v: tuple(_plain(v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
  return norm(a) == norm(b)


def _library_values(path: str) -> list[Any]:
  """Values the library itself gives config field `path` ("model.row.dropout"): its default in
  `tabular_config()` and what each preset sets there."""
  node, values = tabular_config(), []
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      break
    node = node[key]
  else:
    values.append(node)
  return values + [p[path] for p in PRESETS.values() if path in p]


def config_encoder_kwargs(
    section: Mapping[str, Any] | Any, field: str, encoder: str, skip: Iterable[str] = ()
) -> dict[str, Any]:
  """The hyperparameters of `encoder` in config section `field` (e.g. "model.context_encoder_kwargs"),
  as a JSON-able dict (tuples as lists); keys in `skip` belong to someone else and are left out.

  One section serves several encoder kinds, so for a key the encoder does not accept
  (`registry.encoder_fields`): if it still holds a value the library gives it (its default in
  `tabular_config()` or a preset's), it is an untouched default meant for another encoder and is
  left out; any other value was set on purpose and raises ValueError naming `config.<field>.<key>`,
  the encoder and the fields it accepts.
  """
  accepted, skip, out = encoder_fields(encoder), set(skip), {}
  for key, value in dict(section).items():
    if key in skip:
      continue
    if key in accepted:
      out[key] = _plain(value)
    elif not any(_same(value, v) for v in _library_values(f"{field}.{key}")):
      raise ValueError(
          f"config.{field}.{key} = {value!r}, but encoder {encoder!r} has no {key!r}; it accepts: "
          f"{', '.join(accepted)}. Remove the setting or choose an encoder that has it."
      )
  return out


def nexus_former_spec(
    model_config: Any, data: Any, n_outputs: int, context_priors: Mapping[str, float] | None = None
) -> dict[str, Any]:
  """JSON-able constructor arguments of `NexusFormer` for `data` (a `RelationalData`).

  Args:
    model_config: `config.model` (see `nexus_jax/nexusflow/config.py`).
    data: the training `RelationalData` (only feature layouts and context specs are read).
    n_outputs: 1 (binary, regression) or the number of classes.
    context_priors: optional context name -> prior weight (>= 0; 0 removes the context).
  """
  encoders = {k: v for k, v in dict(model_config.encoders).items() if v and k != "target"}
  target_encoder = model_config.encoders.get("target") or encoders.get("default", "mlp")
  get_encoder(target_encoder)  # unknown name -> KeyError listing the known ones
  contexts = []
  for name, ctx in data.contexts.items():
    feats = TableFeatures.from_info(ctx.feature_info)
    encoder = encoder_for_table(encoders, ctx.spec.table)
    contexts.append(
        {
            "name": name,
            "table": ctx.spec.table,
            "num_numeric": feats.num_numeric,
            "cat_cardinalities": list(feats.cat_cardinalities),
            "encoder": encoder,
            "encoder_kwargs": config_encoder_kwargs(
                model_config.context_encoder_kwargs, "model.context_encoder_kwargs", encoder
            ),
        }
    )
  unknown = sorted(set(context_priors or {}) - set(data.contexts))
  if unknown:
    raise ValueError(
        f"context_priors names unknown context(s) {unknown}; contexts: {list(data.contexts)}"
    )
  target = TableFeatures.from_info(data.feature_info)
  return {
      "target_features": {
          "num_numeric": target.num_numeric,
          "cat_cardinalities": list(target.cat_cardinalities),
      },
      "contexts": contexts,
      "target_encoder": target_encoder,
      "target_encoder_kwargs": config_encoder_kwargs(
          model_config.target_encoder_kwargs, "model.target_encoder_kwargs", target_encoder
      ),
      "context_priors": None
      if context_priors is None
      else [float(context_priors.get(c["name"], 1.0)) for c in contexts],
      "n_outputs": int(n_outputs),
      **{k: _plain(model_config[k]) for k in MODEL_FIELDS},
  }


def ensemble_mode(value: Any, field: str = "config.model.ensemble_mode") -> str:
  """`value` checked against `ENSEMBLE_MODES` (ValueError naming `field`)."""
  if value not in ENSEMBLE_MODES:
    raise ValueError(f"{field}={value!r}; choose one of {ENSEMBLE_MODES}")
  return str(value)


def validate_ensemble_config(model_config: Any) -> None:
  """Checks `config.model`'s ensemble fields before any data is read (ValueError naming the field):
  ensemble_size an int >= 1, ensemble_mode one of `ENSEMBLE_MODES`, min_member_epochs finite >= 0,
  min_member_batch an int >= 0."""
  size = model_config.get("ensemble_size", 1)
  if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
    raise ValueError(f"config.model.ensemble_size={size!r}; must be an integer >= 1")
  ensemble_mode(model_config.get("ensemble_mode", "sequential"))
  epochs = model_config.get("min_member_epochs", 0.0)
  if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not 0 <= epochs < math.inf:
    raise ValueError(f"config.model.min_member_epochs={epochs!r}; must be a finite number >= 0")
  floor = model_config.get("min_member_batch", 0)
  if isinstance(floor, bool) or not isinstance(floor, numbers.Integral) or floor < 0:
    raise ValueError(f"config.model.min_member_batch={floor!r}; must be an integer >= 0")


def build_nexus_former(
    spec: Mapping[str, Any], dtype: str = "float32"
) -> NexusFormer | MemberEnsemble | BatchedEnsemble:
  """`NexusFormer` from a spec written by `nexus_former_spec` (e.g. read back from JSON); a spec with
  ``ensemble_size`` M > 1 (and ``task``) gives an ensemble of M such NexusFormers: a
  `BatchedEnsemble` for ``ensemble_mode="batched"``, else a `MemberEnsemble`."""
  size = int(spec.get("ensemble_size", 1))
  if size > 1:
    member = build_nexus_former(
        {k: v for k, v in spec.items() if k not in ("ensemble_size", "ensemble_mode")}, dtype
    )
    mode = ensemble_mode(spec.get("ensemble_mode", "sequential"), "spec ensemble_mode")
    cls = BatchedEnsemble if mode == "batched" else MemberEnsemble
    return cls(member=member, size=size, task=spec["task"])
  contexts = spec["contexts"]
  return NexusFormer(
      target_features=TableFeatures(
          int(spec["target_features"]["num_numeric"]),
          tuple(spec["target_features"]["cat_cardinalities"]),
      ),
      context_features=tuple(
          TableFeatures(int(c["num_numeric"]), tuple(c["cat_cardinalities"])) for c in contexts
      ),
      context_names=tuple(c["name"] for c in contexts),
      context_tables=tuple(c["table"] for c in contexts),
      target_encoder=spec["target_encoder"],
      context_encoders=tuple(c["encoder"] for c in contexts),
      target_encoder_kwargs=dict(spec["target_encoder_kwargs"]),
      context_encoder_kwargs=tuple(dict(c["encoder_kwargs"]) for c in contexts),
      context_priors=None if spec.get("context_priors") is None else tuple(spec["context_priors"]),
      n_outputs=int(spec["n_outputs"]),
      dtype=compute_dtype(dtype),
      **{k: spec[k] if k in spec else FIELD_DEFAULTS[k] for k in MODEL_FIELDS},
  )
