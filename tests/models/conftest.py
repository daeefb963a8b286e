"""Puts this folder on sys.path so test modules can import `tabular_testing` (pytest runs with
--import-mode=importlib, which does not do that), and provides the `rows` fixture."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tabular_testing import synthetic_rows  # noqa: E402


@pytest.fixture
def rows():
  """(x_num f32[256, 3], x_cat i32[256, 2], y f32[256]) of the synthetic regression task."""
  return synthetic_rows()
