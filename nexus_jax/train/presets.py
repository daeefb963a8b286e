"""Named presets for experiment configs: `--config.preset=full` replaces a few fields at run time.

    PRESETS = {"default": {}, "full": {"train.num_steps": 3000, "model.embed_dim": 128}}
    config = apply_preset(config, PRESETS)   # a resolved copy; the input is not changed

A preset's fields replace the config's values (dotted paths into the ConfigDict). Presets are
resolved at run time because command-line overrides are applied after `get_config()`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def apply_preset(config: ml_collections.ConfigDict,
                 presets: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
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
      *parents, last = path.split(".")
      node = config
      for key in parents:
        node = node.get(key)
        if not isinstance(node, ml_collections.ConfigDict):
          raise ValueError(f"preset {name!r} sets config.{path}, which this config does not have.")
      if last not in node:
        raise ValueError(f"preset {name!r} sets config.{path}, which this config does not have.")
      node[last] = value
  return config
