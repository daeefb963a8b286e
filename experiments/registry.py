"""Name -> experiment module. Each module exposes `run(config, workdir) -> dict` (its results).

`config.experiment` picks the entry. Modules are imported lazily so that one experiment's
dependencies never slow down or break another's start-up.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "tabular": "experiments.tabular",
    "lm": "experiments.lm",
    "timeseries": "experiments.timeseries",
    "seq2seq": "experiments.seq2seq",
    "hybrid": "experiments.hybrid",
}


def get_experiment(name: str) -> ModuleType:
  """The module of experiment `name`; a clear error lists the known names."""
  if name not in EXPERIMENTS:
    raise ValueError(
        f"config.experiment={name!r} is not a known experiment; choose one of "
        f"{sorted(EXPERIMENTS)}."
    )
  return importlib.import_module(EXPERIMENTS[name])
