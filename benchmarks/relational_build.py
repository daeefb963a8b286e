"""Build time and peak memory of the nycflights13 context sets at K copies; prints ONE JSON object.

    python benchmarks/relational_build.py                                 # 1x: 327,346 flights
    python benchmarks/relational_build.py --copies 5 --train_epochs 1     # build + one epoch, 1.64 M
    python benchmarks/relational_build.py --copies 100 --engine duckdb    # out-of-core indexes, 32.7 M
    python benchmarks/relational_build.py --max_target_rows 20000 --tracemalloc

K synthetic copies of the task: flights, planes, airports and weather repeated K times with tail
numbers and airport codes renamed per copy (``N14228_3``, ``EWR_3``), so every plane and airport keeps
a real history and every history has the original's length; the airlines are shared.

Engines:
- ``numpy`` (mode ``builder``): the whole `ContextSetBuilder` (fit + transform) in memory; the
  result keeps int32 row indexes and one feature table per table, gathered per batch. With
  ``--train_epochs N`` it then trains the quick NexusFormer for N epochs on the training split
  (validation evaluated at the end) and reports the epochs' seconds and the peak RSS after them.
- ``duckdb`` (mode ``index``): the out-of-core engine (`nexus_jax/data/duckdb_index.py`) builds
  the history indexes (with their 1 / 3 / 24 h window counts) Parquet to Parquet under
  ``--memory_limit``; a child process writes the K-copy Parquet inputs first (not timed, not in
  this process's RSS). ``--mode builder`` runs the whole builder with ``engine="duckdb"`` instead.

Keys: ``copies``, ``engine``, ``mode``, ``build_seconds``, ``peak_rss_gib`` (peak resident memory of
the process: Python, the raw tables and everything built), ``rows`` (target rows), with training
``train_seconds`` / ``train_peak_rss_gib``, plus the machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import pandas as pd
import sklearn

from nexus_jax.data.datasets import nycflights13
from nexus_jax.data.relational import ContextSetBuilder

# The out-of-core benchmark's histories: name -> (target key column, candidate file, M, strict).
INDEX_HISTORIES = {
    "flights.tailnum=tailnum": ("tailnum", "flights_tailnum", 8, True),
    "weather.origin=origin": ("origin", "weather", 24, False),
    "flights.origin=origin": ("origin", "flights_origin", 16, True),
}


def _peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _gib(n: float) -> float:
  return round(n / 2**30, 3)


def _renamed(values: pd.Series, suffix: str) -> pd.Series:
  return values.where(values.isna(), values.astype(str) + suffix)


def copy_tables(tables: dict[str, pd.DataFrame], k: int) -> dict[str, pd.DataFrame]:
  """K copies of the nycflights13 tables, planes and airports renamed per copy (copy 0 keeps the
  original names); flight ids stay unique and flights stay ordered by time."""
  if k == 1:
    return tables
  parts = {name: [] for name in ("flights", "planes", "airports", "weather")}
  n = len(tables["flights"])
  for c in range(k):
    s = "" if c == 0 else f"_{c}"
    f = tables["flights"].copy()
    f["id"] = f["id"] + c * n
    for col in ("tailnum", "origin", "dest"):
      f[col] = _renamed(f[col], s)
    parts["flights"].append(f)
    planes, airports, weather = (tables[t].copy() for t in ("planes", "airports", "weather"))
    planes["tailnum"], airports["faa"] = _renamed(planes["tailnum"], s), _renamed(
        airports["faa"], s
    )
    weather["origin"] = _renamed(weather["origin"], s)
    parts["planes"].append(planes)
    parts["airports"].append(airports)
    parts["weather"].append(weather)
  out = {name: pd.concat(p, ignore_index=True) for name, p in parts.items()}
  out["flights"] = out["flights"].sort_values("time_hour", kind="stable", ignore_index=True)
  out["airlines"] = tables["airlines"]
  return out


# ---------------------------------------------------------------------------------- builder mode
def run_builder(args, result: dict) -> None:
  t0 = time.perf_counter()
  tables = copy_tables(nycflights13.load_tables(max_target_rows=args.max_target_rows), args.copies)
  result["load_seconds"] = round(time.perf_counter() - t0, 3)
  result["load_peak_rss_gib"] = _gib(_peak_rss_bytes())
  kwargs = dict(nycflights13.BUILDER_KWARGS)
  if args.max_history is not None:
    kwargs["max_history"] = args.max_history
  options = {"memory_limit": args.memory_limit} if args.engine == "duckdb" else None
  t0 = time.perf_counter()
  builder = ContextSetBuilder(
      nycflights13.schema(), engine=args.engine, engine_options=options, **kwargs
  ).fit(tables)
  result["fit_seconds"] = round(time.perf_counter() - t0, 3)
  t1 = time.perf_counter()
  data = builder.transform(tables)
  result["transform_seconds"] = round(time.perf_counter() - t1, 3)
  result["build_seconds"] = round(time.perf_counter() - t0, 3)
  result["peak_rss_gib"] = _gib(_peak_rss_bytes())
  result["rows"] = int(data.num_rows)
  result["config"] = {"max_target_rows": args.max_target_rows, **kwargs}
  result["data"] = data.summary()
  if args.train_epochs:  # like `pipeline.prepare`: the splits' indexes, the full set dropped
    splits = {s: data.subset(s) for s in ("train", "valid")}
    del data
    result.update(train_epochs(splits["train"], splits["valid"], args))


def train_epochs(train, valid, args) -> dict:
  """Trains the quick NexusFormer (configs/tabular.py) for `args.train_epochs` epochs on the
  lazily gathered training split; returns seconds, steps and the peak RSS after training."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from configs.tabular import get_config
  from nexus_jax.nexusflow.training import train_nexus_former

  config = get_config()
  with config.unlocked():
    config.train.num_epochs = int(args.train_epochs)
    config.train.num_steps = int(args.train_max_steps)  # 0: the whole epochs
    config.train.batch_size = int(args.batch_size)
    config.train.log_every_steps = 100
    config.train.early_stopping.patience = 0
    config.optim.warmup_steps = 100
    if args.model == "tiny":  # the data pipeline's memory, not the model's quality
      config.model.d_model, config.model.d_head, config.model.refine_iterations = 16, 32, 1
      config.model.target_encoder_kwargs.d_layers = (32,)
      config.model.context_encoder_kwargs.d_layers = (16,)
  if args.valid_rows:
    valid = valid.take(np.arange(min(args.valid_rows, valid.num_rows)))
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    result = train_nexus_former(train, valid, config, workdir)
    seconds = time.perf_counter() - t0
  return {
      "train_model": args.model,
      "train_epoch_steps": max(train.num_rows // int(args.batch_size), 1),
      "valid_rows": int(valid.num_rows),
      "train_seconds": round(seconds, 2),
      "train_steps": int(result.fit.steps_run),
      "train_batch_size": int(args.batch_size),
      "train_rows_per_second": round(result.fit.rows_per_second, 1),
      "valid_auc": round(float((result.fit.best_metrics or {}).get("auc", float("nan"))), 4),
      "train_peak_rss_gib": _gib(_peak_rss_bytes()),
  }


# ---------------------------------------------------------------------------------- index mode
def write_inputs(folder: pathlib.Path, copies: int, memory_limit: str) -> None:
  """The K-copy Parquet inputs (row, key, t) of `INDEX_HISTORIES`, written by DuckDB from the 1x
  tables (t: epoch nanoseconds of ``time_hour``)."""
  from nexus_jax.data import duckdb_index

  tables = nycflights13.load_tables()
  con = duckdb_index.connect(memory_limit)
  n_f, n_w = len(tables["flights"]), len(tables["weather"])
  flights = tables["flights"][["tailnum", "origin", "time_hour"]].astype(object)
  weather = tables["weather"][["origin", "time_hour"]].astype(object)
  con.register("f1", flights.assign(row=np.arange(n_f)))
  con.register("w1", weather.assign(row=np.arange(n_w)))
  suffix = "CASE WHEN c = 0 THEN '' ELSE '_' || c END"
  t = "epoch_ns(CAST(time_hour AS TIMESTAMPTZ))"
  for name, source, column, n in (
      ("flights_tailnum", "f1", "tailnum", n_f),
      ("flights_origin", "f1", "origin", n_f),
      ("weather", "w1", "origin", n_w),
  ):
    con.execute(
        f"COPY (SELECT c * {n} + row AS row, {column} || {suffix} AS key, {t} AS t "
        f"FROM {source} CROSS JOIN range({copies}) r(c)) "
        f"TO '{folder / name}.parquet' (FORMAT parquet)"
    )
  con.close()


def run_index(args, result: dict) -> None:
  from nexus_jax.data import duckdb_index

  with tempfile.TemporaryDirectory(dir=args.temp_dir) as tmp:
    folder = pathlib.Path(tmp)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--write_inputs", str(folder), "--copies", str(args.copies)],
        check=True,
    )
    result["data_seconds"] = round(time.perf_counter() - t0, 3)
    con = duckdb_index.connect(args.memory_limit, temp_directory=str(folder / "spill"))
    hours = nycflights13.COUNT_WINDOWS
    hours = () if args.no_window_counts else hours
    spans = [int(h * 3_600_000_000_000) for h in hours]
    names = [n for n in args.histories.split(",") if n]
    per_history = {}
    t0 = time.perf_counter()
    for name in names:
      column, candidates, m, strict = INDEX_HISTORIES[name]
      t1 = time.perf_counter()
      out = folder / f"index_{len(per_history)}.parquet"
      duckdb_index.history_parquet(
          con,
          folder / f"flights_{column}.parquet",
          folder / f"{candidates}.parquet",
          out,
          m,
          strict,
          windows=spans,
      )
      per_history[name] = {
          "seconds": round(time.perf_counter() - t1, 2),
          "max_rows": m,
          "index_parquet_gib": _gib(out.stat().st_size),
          "peak_rss_gib_so_far": _gib(_peak_rss_bytes()),
      }
      print(json.dumps({"history": name, **per_history[name]}), file=sys.stderr, flush=True)
    result["build_seconds"] = round(time.perf_counter() - t0, 3)
    result["peak_rss_gib"] = _gib(_peak_rss_bytes())
    result["rows"] = int(
        con.execute(f"SELECT count(*) FROM '{folder / 'flights_tailnum.parquet'}'").fetchone()[0]
    )
    result["histories"] = per_history
    result["config"] = {"memory_limit": args.memory_limit, "count_windows_hours": list(hours)}
    con.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--copies", type=int, default=1, help="K synthetic copies of the task")
  parser.add_argument("--engine", choices=("numpy", "duckdb"), default="numpy")
  parser.add_argument(
      "--mode", choices=("builder", "index"), default=None, help="numpy: builder; duckdb: index"
  )
  parser.add_argument("--train_epochs", type=int, default=0, help="builder mode: train N epochs")
  parser.add_argument("--batch_size", type=int, default=512, help="training batch size")
  parser.add_argument(
      "--train_max_steps", type=int, default=0, help="cap the training steps (0: whole epochs)"
  )
  parser.add_argument("--valid_rows", type=int, default=0, help="evaluate this many (0: all)")
  parser.add_argument(
      "--model", choices=("quick", "tiny"), default="quick", help="NexusFormer size"
  )
  parser.add_argument("--memory_limit", default="1GB", help="DuckDB SET memory_limit")
  parser.add_argument("--temp_dir", default=None, help="index mode: Parquet and spill folder")
  parser.add_argument(
      "--histories",
      default="flights.tailnum=tailnum,weather.origin=origin",
      help="index mode: comma-separated names of " + ", ".join(INDEX_HISTORIES),
  )
  parser.add_argument(
      "--no_window_counts", action="store_true", help="index mode: the row indexes only"
  )
  parser.add_argument(
      "--max_target_rows", type=int, default=None, help="subsample flights (default: all)"
  )
  parser.add_argument(
      "--max_history", type=int, default=None, help="one M for every history context"
  )
  parser.add_argument("--tracemalloc", action="store_true", help="also trace allocations (slower)")
  parser.add_argument("--write_inputs", default=None, help=argparse.SUPPRESS)  # child process
  args = parser.parse_args()
  if args.write_inputs:
    write_inputs(pathlib.Path(args.write_inputs), args.copies, args.memory_limit)
    return
  mode = args.mode or ("builder" if args.engine == "numpy" else "index")
  if mode == "index" and args.engine != "duckdb":
    parser.error("--mode index needs --engine duckdb")
  if args.tracemalloc:
    tracemalloc.start()
  result = {"benchmark": "relational_build", "task": "nycflights13"}
  result |= {"copies": args.copies, "engine": args.engine, "mode": mode}
  start = time.perf_counter()
  (run_builder if mode == "builder" else run_index)(args, result)
  result["total_seconds"] = round(time.perf_counter() - start, 3)
  result["machine"] = {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
  }
  result["versions"] = {
      "python": platform.python_version(),
      "numpy": np.__version__,
      "pandas": pd.__version__,
      "scikit-learn": sklearn.__version__,
  }
  try:
    import duckdb

    result["versions"]["duckdb"] = duckdb.__version__
  except ImportError:
    pass
  if args.tracemalloc:
    result["tracemalloc_peak_gib"] = _gib(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
  print(json.dumps(result, default=str))


if __name__ == "__main__":
  main()
