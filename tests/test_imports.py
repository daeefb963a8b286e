"""The public names import from the top-level package, lazily."""

import subprocess
import sys


def test_estimators_and_schema_from_the_top_level():
  from nexus_jax import NexusFlowClassifier, NexusFlowRegressor, Schema
  from nexus_jax.nexusflow import NexusFlowClassifier as same
  from nexus_jax.nexusflow.estimator import NexusFlowClassifier as original

  assert NexusFlowClassifier is same is original
  assert NexusFlowRegressor.__name__ == "NexusFlowRegressor" and Schema.__name__ == "Schema"


def test_layers_import_without_the_product():
  code = "import sys, nexus_jax.layers; print('nexus_jax.nexusflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_nothing_in_the_library_imports_experiments():
  """The library never depends on the experiments; only the console scripts (`nexus_jax/cli/`,
  the application layer over `experiments.run`) may import them."""
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1]
  offenders = [
      str(p.relative_to(root))
      for folder in ("nexus_jax", "benchmarks")
      for p in (root / folder).rglob("*.py")
      if ("from experiments" in p.read_text() or "import experiments" in p.read_text())
      and "cli" not in p.relative_to(root).parts
  ]
  assert offenders == []
