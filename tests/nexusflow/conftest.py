"""Puts this folder on sys.path (pytest runs with --import-mode=importlib) and shares one fitted
classifier on the tiny task of `relational_testing` across the tests (compiling dominates on CPU).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from relational_testing import SCHEMA, TINY, make_tables  # noqa: E402

from nexus_jax.nexusflow.estimator import NexusFlowClassifier  # noqa: E402


@pytest.fixture(scope="session")
def tables():
  return make_tables()


@pytest.fixture(scope="session")
def fitted(tables):
  """A NexusFlowClassifier fitted on the tiny task."""
  return NexusFlowClassifier(**TINY).fit(tables, SCHEMA)
