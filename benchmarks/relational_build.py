"""Build time and peak memory of the nycflights13 context sets; prints ONE JSON object.

    python benchmarks/relational_build.py                       # full task: 327,346 flights
    python benchmarks/relational_build.py --max_target_rows 20000 --tracemalloc

Reports load / fit / transform seconds, peak resident memory of the process (``resource``; includes
the Python runtime and the raw tables) and, with ``--tracemalloc``, the peak of traced Python+numpy
allocations (slower), every context's size, the machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
import sklearn

from nexus_jax.data.datasets import nycflights13
from nexus_jax.data.relational import ContextSetBuilder


def _peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--max_target_rows", type=int, default=None, help="subsample flights (default: all)"
  )
  parser.add_argument(
      "--max_history", type=int, default=None, help="one M for every history context"
  )
  parser.add_argument("--tracemalloc", action="store_true", help="also trace allocations (slower)")
  args = parser.parse_args()
  if args.tracemalloc:
    tracemalloc.start()
  timings = {}
  start = time.perf_counter()
  tables = nycflights13.load_tables(max_target_rows=args.max_target_rows)
  timings["load_s"] = time.perf_counter() - start
  kwargs = dict(nycflights13.BUILDER_KWARGS)
  if args.max_history is not None:
    kwargs["max_history"] = args.max_history
  t0 = time.perf_counter()
  builder = ContextSetBuilder(nycflights13.schema(), **kwargs).fit(tables)
  timings["fit_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  data = builder.transform(tables)
  timings["transform_s"] = time.perf_counter() - t0
  timings["build_s"] = timings["fit_s"] + timings["transform_s"]
  timings["total_s"] = time.perf_counter() - start
  result = {
      "benchmark": "relational_build",
      "task": "nycflights13",
      "config": {"max_target_rows": args.max_target_rows, **{k: v for k, v in kwargs.items()}},
      **{k: round(v, 3) for k, v in timings.items()},
      "peak_rss_gb": round(_peak_rss_bytes() / 2**30, 3),
      "orphan_foreign_keys": builder.report.orphan_foreign_keys if builder.report else None,
      "data": data.summary(),
      "machine": {
          "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(),
          "sched_affinity": len(os.sched_getaffinity(0))
          if hasattr(os, "sched_getaffinity")
          else None,
      },
      "versions": {
          "python": platform.python_version(),
          "numpy": np.__version__,
          "pandas": pd.__version__,
          "scikit-learn": sklearn.__version__,
      },
  }
  if args.tracemalloc:
    result["tracemalloc_peak_gb"] = round(tracemalloc.get_traced_memory()[1] / 2**30, 3)
    tracemalloc.stop()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
