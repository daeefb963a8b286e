"""nexus_jax: JAX/Flax building blocks for transformers, and NexusFlow, deep learning over related tables.

    from nexus_jax import NexusFlowClassifier, NexusFlowRegressor, Schema
    clf = NexusFlowClassifier().fit(tables, schema)      # see nexus_jax/nexusflow/estimator.py

The NexusFlow names are imported on first use, so `import nexus_jax.layers` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = ("NexusFlowClassifier", "NexusFlowRegressor", "Schema", "SchemaError", "load_artifact")
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    value = getattr(importlib.import_module("nexus_jax.nexusflow"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'nexus_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
