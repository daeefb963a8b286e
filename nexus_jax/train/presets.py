"""Named presets for experiment configs: `--config.preset=full` replaces a few fields at run time.

    PRESETS = {"default": {}, "full": {"train.num_steps": 3000, "model.embed_dim": 128}}
    config = apply_preset(config, PRESETS)   # a resolved copy; the input is not changed
    get_path(config, "model.embed_dim"); set_path(config, "train.num_steps", 10)  # dotted access

A preset's fields replace the config's values (dotted paths into the ConfigDict). Presets are
resolved at run time because command-line overrides are applied after `get_config()`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def get_path(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at dotted `path` ("model.embed_dim"); KeyError naming the path if it is absent."""
  node = config
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise KeyError(f"config.{path} does not exist")
    node = node[key]
  return node


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """Sets the existing field at dotted `path` (the config must be unlocked for new types);
  KeyError naming the path if it is absent (a preset or override never adds fields)."""
  *parents, last = path.split(".")
  node = get_path(config, ".".join(parents)) if parents else config
  if not isinstance(node, ml_collections.ConfigDict) or last not in node:
    raise KeyError(f"config.{path} does not exist")
  node[last] = value


def apply_preset(
    config: ml_collections.ConfigDict, presets: Mapping[str, Mapping[str, Any]]
) -> ml_collections.ConfigDict:
  """A copy of `config` with `presets[config.preset]` applied.

  Raises:
    ValueError naming `config.preset` (unknown preset) or the dotted path a preset sets that the
    config lacks.
  """
  name = config.get("preset", "default")
  if name not in presets:
    raise ValueError(f"config.preset={name!r} is unknown; choose one of {sorted(presets)}.")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for path, value in presets[name].items():
      try:
        set_path(config, path, value)
      except KeyError:
        raise ValueError(
            f"preset {name!r} sets config.{path}, which this config does not have."
        ) from None
  return config
