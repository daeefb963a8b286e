"""Optimised copies of an artifact folder (int8 / int4 / pruning), and their size on disk.

    variant = Variant("int4", group_size=64)     # or Variant("int8"), Variant("prune", amount=0.3)
    report = write_optimized("runs/x/artifact", "runs/x/artifact_int4", variant)
    params_bytes("runs/x/artifact")                   # bytes on disk of the stored params (params/)

The input folder is never modified: the copy is a new artifact (`save_artifact`), carrying the
input's extra files (e.g. estimator.json) along.

Size means the bytes on disk of `params/` (the Orbax checkpoint: arrays + its metadata), measured
after writing, so a reported size is the size delivered. Two things to know when reading it:
  * Orbax compresses what it stores, so pruned zeros do shrink the bytes on disk (by less than the
    share pruned), although pruned params are stored dense: their `array_bytes` (the raw bytes of
    the stored arrays, also reported, deterministic) do not change. int8 / int4 shrink both.
  * The checkpoint carries metadata of some tens of kB, and its layout (OCDBT data files) varies
    between two writes of the same arrays: on a model of ~40 kB of float32 params the same tree
    took 93-145 kB on disk in six writes. Small models are dominated by that; for models of
    megabytes it is a few percent.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from nexus_jax.inference.quantize import DEFAULT_INT4_GROUP, tree_bytes
from nexus_jax.nexusflow.artifact import ARTIFACT_FILE, MANIFEST_FILE, save_artifact
from nexus_jax.nexusflow.table_predictor import TabularPredictor

ARTIFACT_PARTS = (ARTIFACT_FILE, MANIFEST_FILE, "builder", "params")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimisation: "int8" (per channel), "int4" (`group_size` rows per scale) or "prune"
  (`amount` of the prunable weights zeroed by global magnitude); "none" keeps the params."""

  method: str
  group_size: int | None = None
  amount: float | None = None

  @property
  def label(self) -> str:
    if self.method == "int4":
      return f"int4 g{self.group_size or DEFAULT_INT4_GROUP}"
    if self.method == "prune":
      return f"pruning {self.amount:g}"
    return self.method

  def apply(self, predictor: TabularPredictor) -> dict[str, Any]:
    """Optimises `predictor` in place; returns the library's report."""
    if self.method == "none":
      return {"method": "none"}
    if self.method == "prune":
      return predictor.optimize("prune", amount=float(self.amount))
    if self.method == "int4":
      return predictor.optimize("int4", group_size=self.group_size or DEFAULT_INT4_GROUP)
    return predictor.optimize(self.method)


def clone(predictor: TabularPredictor) -> TabularPredictor:
  """An independent predictor with the same builder, spec and params (optimising it leaves
  `predictor` as it was)."""
  return TabularPredictor(
      predictor.builder,
      predictor.spec,
      dict(predictor.variables),
      predictor.target_scale,
      predictor.fit_columns,
      predictor.compute_dtype,
      params_stored=predictor.params_stored,
      optimization=[dict(o) for o in predictor.optimization],
      training=dict(predictor.training),
  )


def folder_bytes(path: str | pathlib.Path) -> int:
  """Bytes of the files under `path` (their sizes, as `ls -l` shows them)."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def params_bytes(artifact: str | pathlib.Path) -> int:
  """Bytes on disk of an artifact's stored params (its `params/` folder)."""
  return folder_bytes(pathlib.Path(artifact) / "params")


def extra_files(artifact: str | pathlib.Path) -> dict[str, str]:
  """The artifact's own extra top-level text files (e.g. estimator.json), to carry along."""
  root = pathlib.Path(artifact)
  return {
      p.name: p.read_text()
      for p in sorted(root.iterdir())
      if p.is_file() and p.name not in ARTIFACT_PARTS
  }


def save_variant(
    predictor: TabularPredictor,
    variant: Variant,
    output: str | pathlib.Path,
    extras: dict[str, str] | None = None,
) -> tuple[TabularPredictor, dict[str, Any]]:
  """Saves an optimised copy of `predictor` to `output` (a new folder); returns (copy, report)."""
  copy = clone(predictor)
  report = variant.apply(copy)
  save_artifact(copy, output, extra_files=extras)
  return copy, report


def write_optimized(
    source: str | pathlib.Path,
    output: str | pathlib.Path,
    variant: Variant,
    predictor: TabularPredictor | None = None,
) -> dict[str, Any]:
  """Writes the `variant` of the artifact at `source` to `output`; `source` is left as it was.

  Returns:
    {"method", "label", "output", "params_bytes_before", "params_bytes_after" (on disk),
     "array_bytes_before", "array_bytes_after" (raw stored arrays), "artifact_bytes_before",
     "artifact_bytes_after", "report" (the library's)}.
  """
  from nexus_jax.nexusflow.artifact import load_artifact

  if pathlib.Path(source).absolute() == pathlib.Path(output).absolute():
    raise ValueError(f"{output}: the output is the input artifact; write the copy to a new folder")
  predictor = predictor or load_artifact(source)
  copy, report = save_variant(predictor, variant, output, extra_files(source))
  return {
      "method": variant.method,
      "label": variant.label,
      "output": str(output),
      "params_bytes_before": params_bytes(source),
      "params_bytes_after": params_bytes(output),
      "array_bytes_before": tree_bytes(predictor.params_stored),
      "array_bytes_after": tree_bytes(copy.params_stored),
      "artifact_bytes_before": folder_bytes(source),
      "artifact_bytes_after": folder_bytes(output),
      "report": _compact(report),
  }


def _compact(report: dict[str, Any]) -> dict[str, Any]:
  """The report without per-leaf lists (the count of int8 fallbacks of int4 stays)."""
  out = {k: v for k, v in report.items() if k not in ("fallback", "per_leaf")}
  if "fallback" in report:
    out["fallback_leaves"] = len(report["fallback"])
  return out
