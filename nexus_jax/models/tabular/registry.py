"""Registry of table encoders and the per-table choice from the config.

Every registered class is a Flax Linen module constructed as
`cls(num_numeric=Fn, cat_cardinalities=(...), d_out=d, **hyperparameters)` and called as
`(x_num [..., Fn], x_cat [..., Fc], num_missing=None, row_mask=None, *, deterministic)`.
Its class attribute `pools_rows` says what it returns:

- False (row encoders: "ft_transformer", "tabnet", "tabm", "mlp", "resnet", "lean_mlp"): one
  representation per row, `(out [..., d_out], aux)`; leading dims are [batch] or [batch, rows].
- True ("standard"): one representation per context, `(pooled [batch, d_out], aux)` from inputs
  [batch, rows, F]; it also takes `ages=[batch, rows]`, and `aux["rows"]` is [batch, rows, d_out].

The config names an encoder per table, e.g. `encoders.default = "ft_transformer"`,
`encoders.planes = "tabnet"`; `encoder_for_table` resolves it. The other hyperparameters of an
encoder are its dataclass fields (`encoder_fields`); `encoder_kwargs` checks a dict of them, so a
misspelt key fails instead of being dropped. Every built-in encoder is registered at the bottom of
this module (encoder modules never import the registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from nexus_jax.models.tabular.ft_transformer import FTTransformer
from nexus_jax.models.tabular.lean_mlp import LeanMLP
from nexus_jax.models.tabular.mlp import MLP, ResNetMLP, TabM
from nexus_jax.models.tabular.set_encoder import StandardEncoder
from nexus_jax.models.tabular.tabnet import TabNet

_ENCODERS: dict[str, type[nn.Module]] = {}
DEFAULT_KEY = "default"
# Fields the caller of an encoder sets itself (feature layout, width, dtypes, Flax bookkeeping).
CALLER_FIELDS = (
    "num_numeric",
    "cat_cardinalities",
    "d_out",
    "dtype",
    "param_dtype",
    "name",
    "parent",
)


def register_encoder(
    name: str, cls: type[nn.Module], *, overwrite: bool = False
) -> type[nn.Module]:
  """Registers `cls` under `name` (returns cls). Re-registering a name needs `overwrite=True`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"encoder name must be a non-empty string, got {name!r}.")
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise TypeError(
        f"register_encoder({name!r}, ...): expected a flax.linen.Module subclass, got {cls!r}."
    )
  if name in _ENCODERS and _ENCODERS[name] is not cls and not overwrite:
    raise ValueError(
        f"encoder {name!r} is already registered to {_ENCODERS[name].__name__}; "
        f"pass overwrite=True to replace it."
    )
  _ENCODERS[name] = cls
  return cls


def get_encoder(name: str) -> type[nn.Module]:
  """The encoder class registered under `name`; unknown names raise KeyError listing the known ones."""
  try:
    return _ENCODERS[name]
  except (KeyError, TypeError):
    raise KeyError(
        f"unknown encoder {name!r}; known encoders: {', '.join(sorted(_ENCODERS))}. "
        f"Register new ones with register_encoder(name, cls)."
    ) from None


def encoder_names() -> list[str]:
  """Sorted names of all registered encoders."""
  return sorted(_ENCODERS)


def encoder_fields(name: str) -> tuple[str, ...]:
  """Hyperparameters the encoder `name` accepts: its dataclass fields less `CALLER_FIELDS`, sorted."""
  cls = get_encoder(name)
  return tuple(sorted(f.name for f in dataclasses.fields(cls) if f.name not in CALLER_FIELDS))


def encoder_kwargs(name: str, kwargs: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
  """`kwargs` checked against `encoder_fields(name)`: a plain dict, lists turned into tuples.

  Raises ValueError naming every key the encoder does not accept, the encoder and its accepted
  fields; `where` (e.g. "NexusFormer.target_encoder_kwargs") starts the message.
  """
  accepted = encoder_fields(name)
  kwargs = dict(kwargs or {})
  unknown = sorted(k for k in kwargs if k not in accepted)
  if unknown:
    raise ValueError(
        f"{where + ': ' if where else ''}encoder {name!r} ({get_encoder(name).__name__}) has no "
        f"hyperparameter(s) {unknown}; it accepts: {', '.join(accepted)}."
    )
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def encoder_for_table(encoders_config: Mapping[str, str] | Any, table: str) -> str:
  """Encoder name for `table`: `encoders_config[table]` if set, else `encoders_config["default"]`.

  `encoders_config` is a Mapping or an ml_collections.ConfigDict. Raises KeyError when neither key
  is set, or when the chosen name is not registered (naming the table and the config field).
  """
  if table in encoders_config:
    name, field = encoders_config[table], f"encoders.{table}"
  elif DEFAULT_KEY in encoders_config:
    name, field = encoders_config[DEFAULT_KEY], f"encoders.{DEFAULT_KEY}"
  else:
    raise KeyError(
        f"no encoder configured for table {table!r}: set encoders.{table} or encoders.{DEFAULT_KEY} "
        f"(one of {', '.join(sorted(_ENCODERS))})."
    )
  if name not in _ENCODERS:
    raise KeyError(
        f"{field} = {name!r} (table {table!r}) is not a known encoder; "
        f"known encoders: {', '.join(sorted(_ENCODERS))}."
    )
  return name


for _name, _cls in (
    ("ft_transformer", FTTransformer),
    ("tabnet", TabNet),
    ("tabm", TabM),
    ("mlp", MLP),
    ("resnet", ResNetMLP),
    ("standard", StandardEncoder),
    ("lean_mlp", LeanMLP),
):
  register_encoder(_name, _cls)
