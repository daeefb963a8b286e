"""Suite-wide test settings.

Hypothesis runs derandomized by default so CI on a clean clone sees the same examples as a
developer's machine; `pytest --hypothesis-profile=explore` searches fresh random examples.

Compiled XLA programs go to a persistent cache shared by the run's pytest-xdist workers: a test
that compiles what another test (or another ensemble member) already compiled loads it instead.
The cache is a fresh temporary folder, removed when the run ends; set
``NEXUS_TEST_COMPILATION_CACHE=/some/dir`` to keep one across runs.
"""

import atexit
import os
import shutil
import tempfile

import jax
from hypothesis import settings

if (
    "NEXUS_TEST_COMPILATION_CACHE" in os.environ
):  # set by the user, or by the xdist controller for its workers
  _CACHE = os.environ["NEXUS_TEST_COMPILATION_CACHE"]
else:
  _CACHE = os.environ["NEXUS_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(
      prefix="nexus-jax-test-cache-"
  )
  atexit.register(shutil.rmtree, _CACHE, True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile("default")
