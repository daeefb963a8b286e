"""The least lossy optimisation whose params fit a size (`nexusflow optimize --target-size-mb`).

    report = fit_to_size("runs/x/artifact", 0.05e6, "runs/x/small")       # documented order
    report = fit_to_size(..., eval_data="eval_tables/")    # best metric on a labelled folder

Each candidate is written beside `output` and measured on disk (`artifact_optimize.params_bytes`):
the sizes compared are the sizes delivered (see `artifact_optimize` for what they include and
how much they vary between writes; each row also reports the deterministic `array_bytes`).
Candidates, from least to most lossy (`CANDIDATES`): the params as they are ("none", only when no
method is imposed), int8 per channel, int4 with 32, 64 and 128 rows per scale, then magnitude
pruning of 30%, 50%, 70% and 90% of the prunable weights. Without evaluation data the first
candidate in that order that fits is chosen; with labelled `eval_data` (a folder of tables, or the
tables) it is the fitting candidate with the best primary metric on them (`scoring.py`: AUC for
binary, log loss for multiclass, RMSE for regression; ties go to the earlier one), and every
candidate's metrics and change are reported. A candidate the artifact cannot take (e.g. int4 of
params already int8) is reported as skipped. No candidate fitting is an error naming the smallest
size reached.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import pandas as pd

from nexus_jax.inference.quantize import tree_bytes
from nexus_jax.nexusflow.artifact import load_artifact
from nexus_jax.nexusflow.artifact_optimize import (
    Variant,
    extra_files,
    folder_bytes,
    params_bytes,
    save_variant,
)
from nexus_jax.nexusflow.predict_cli import read_tables
from nexus_jax.nexusflow.scoring import (
    PRIMARY_METRIC,
    is_better,
    labelled_arrays,
    score_arrays,
    shared_predict_fn,
)

INT4_GROUPS = (32, 64, 128)
PRUNE_AMOUNTS = (0.3, 0.5, 0.7, 0.9)
CANDIDATES = (
    Variant("none"),
    Variant("int8"),
    *(Variant("int4", group_size=g) for g in INT4_GROUPS),
    *(Variant("prune", amount=a) for a in PRUNE_AMOUNTS),
)
MB = 1_000_000  # --target-size-mb counts decimal megabytes


class SizeTargetError(ValueError):
  """No candidate's stored params fit the size asked for."""


def candidates(methods: Sequence[str] | None = None) -> list[Variant]:
  """`CANDIDATES` restricted to `methods` ("int8" | "int4" | "prune"); all but "none" when given."""
  if not methods:
    return list(CANDIDATES)
  return [v for v in CANDIDATES if v.method in methods]


def fit_to_size(
    source: str | pathlib.Path,
    target_bytes: int,
    output: str | pathlib.Path,
    eval_data: str | pathlib.Path | Mapping[str, pd.DataFrame] | None = None,
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Writes to `output` the least lossy candidate whose params fit `target_bytes` (see the module
  docstring); `source` is left as it was. `output` may hold a previous artifact (replaced).

  Returns:
    {"target_bytes", "chosen", "output", "params_bytes_before", "params_bytes_after",
     "artifact_bytes_after", "chosen_by", "metric", "metrics_before" (with eval data),
     "candidates": [{"label", "method", "group_size", "amount", "params_bytes", "fits",
     "array_bytes", "metrics", "change" | "skipped"}]}.
  Raises:
    SizeTargetError naming the smallest size reached when no candidate fits.
  """
  if not (isinstance(target_bytes, (int, float)) and math.isfinite(target_bytes)) or (
      target_bytes <= 0
  ):
    raise ValueError(f"target size {target_bytes!r} bytes: must be a positive number")
  source, output = pathlib.Path(source), pathlib.Path(output).absolute()
  base = load_artifact(source)
  extras = extra_files(source)
  task = base.task
  metric = PRIMARY_METRIC[task][0]
  arrays = predict_fn = before = None
  if eval_data is not None:
    tables = eval_data if isinstance(eval_data, Mapping) else read_tables(eval_data, base.schema)
    arrays = labelled_arrays(base, tables, where="--eval-data")
    predict_fn = shared_predict_fn(base)
    before = score_arrays(base, arrays, predict_fn)
  output.parent.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.candidates-", dir=output.parent))
  rows, best = [], None
  try:
    for i, variant in enumerate(candidates(methods)):
      row: dict[str, Any] = {
          "label": variant.label,
          "method": variant.method,
          "group_size": variant.group_size,
          "amount": variant.amount,
      }
      folder = work / f"candidate-{i}"
      try:
        copy, report = save_variant(base, variant, folder, extras)
      except ValueError as err:  # e.g. int4 of params already quantised
        rows.append({**row, "skipped": str(err)})
        continue
      row["params_bytes"] = params_bytes(folder)
      row["array_bytes"] = tree_bytes(copy.params_stored)
      row["fits"] = row["params_bytes"] <= target_bytes
      if "fallback" in report:
        row["fallback_leaves"] = len(report["fallback"])
      if arrays is not None:
        row["metrics"] = score_arrays(copy, arrays, predict_fn)
        row["change"] = {k: row["metrics"][k] - before[k] for k in before}
      rows.append(row)
      if row["fits"] and (
          best is None
          or (arrays is not None and is_better(task, row["metrics"][metric], best[0][metric]))
      ):
        best = (row.get("metrics", {}), row, folder)
    measured = [r for r in rows if "params_bytes" in r]
    if best is None:
      if not measured:
        raise SizeTargetError(
            f"no candidate applies to {source}: "
            + "; ".join(f"{r['label']}: {r['skipped']}" for r in rows)
        )
      small = min(measured, key=lambda r: r["params_bytes"])
      raise SizeTargetError(
          f"no method brings the params of {source} to {target_bytes / MB:g} MB; the smallest "
          f"reachable is {small['params_bytes'] / MB:.6g} MB ({small['label']}, "
          f"{small['params_bytes']} bytes) from {params_bytes(source)} bytes"
      )
    _, chosen, folder = best
    _replace(folder, output, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return {
      "source": str(source),
      "target_bytes": int(target_bytes),
      "chosen": chosen["label"],
      "chosen_by": f"best eval {metric}" if arrays is not None else "documented order",
      "output": str(output),
      "params_bytes_before": params_bytes(source),
      "params_bytes_after": params_bytes(output),
      "artifact_bytes_after": folder_bytes(output),
      "metric": metric,
      **({"metrics_before": before} if before is not None else {}),
      "candidates": rows,
  }


def _replace(folder: pathlib.Path, output: pathlib.Path, work: pathlib.Path) -> None:
  """Moves the chosen candidate to `output`, putting a previous `output` back if that fails."""
  old = None
  if output.exists():
    old = work / "previous"
    output.rename(old)
  try:
    folder.rename(output)
  except BaseException:
    if old is not None and not output.exists():
      old.rename(output)
    raise
