"""Puts this folder on sys.path (pytest runs with --import-mode=importlib) for the shared
hypothesis strategies of `relational_strategies`."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
