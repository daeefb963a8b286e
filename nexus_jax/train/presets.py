"""The one preset mechanism of every experiment: `--config.preset=full` changes a few fields at run time.

Each config file holds its presets beside `get_config()`::

    PRESETS = {"default": {}, "full": {"train.num_steps": 3000, "model.embed_dim": 128}}

and the runner (`experiments/run.py`) or the estimator resolves the chosen one::

    changed = resolve_preset(config, PRESETS, defaults=get_config(), explicit={"train.num_steps"})

Rule: a preset sets a field only while the user has not set it -- the field is not in `explicit`
(the dotted paths given on the command line or as estimator arguments) and still holds its value in
`defaults` (the config file's own defaults). So a command-line override always wins over the preset:
`--config.preset=full --config.train.num_steps=10` runs 10 steps. Presets are resolved at run time
because command-line overrides are applied after `get_config()`.

`get_path` / `set_path` are the dotted-path walkers every caller shares.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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


def _same(a: Any, b: Any) -> bool:
  """Equality that treats lists and tuples alike (ConfigDict may hold either)."""
  norm = lambda v: tuple(v) if isinstance(v, list) else v
  return norm(a) == norm(b)


def resolve_preset(
    config: ml_collections.ConfigDict,
    presets: Mapping[str, Mapping[str, Any]],
    defaults: ml_collections.ConfigDict,
    explicit: Iterable[str] = (),
) -> dict[str, Any]:
  """Applies `presets[config.preset]` to `config` in place, under the module docstring's rule.

  Args:
    config: the config to resolve (its `preset` field names the preset).
    presets: preset name -> {dotted path: value}.
    defaults: the config file's defaults (`get_config()`), to tell untouched fields from set ones.
    explicit: dotted paths the user set (command-line overrides, estimator arguments); kept as given.
  Returns:
    {dotted path: value} of what the preset changed (for results and logs).
  Raises:
    ValueError naming `config.preset` when the preset is unknown, or the path a preset sets that the
    config lacks.
  """
  name = config.get("preset")
  if name not in presets:
    raise ValueError(f"config.preset={name!r} is unknown; choose one of {sorted(presets)}.")
  explicit = set(explicit)
  changed = {}
  with config.unlocked():
    for path, value in presets[name].items():
      try:
        current, default = get_path(config, path), get_path(defaults, path)
      except KeyError:
        raise ValueError(
            f"preset {name!r} sets config.{path}, which this config does not have."
        ) from None
      if path in explicit or not _same(current, default):
        continue
      set_path(config, path, value)
      changed[path] = value
  return changed
