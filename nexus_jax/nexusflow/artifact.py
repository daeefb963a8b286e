"""Safe model artifacts: JSON + arrays + Orbax params, integrity-checked, never pickled.

Layout of an artifact folder::

    artifact.json    format version, task, classes, target scale, model spec, columns seen at fit,
                     optimisation reports, training-data summary, parameter fingerprint
    builder/         ContextSetBuilder: schema + per-table preprocessors (JSON + .npz, allow_pickle=False)
    params/          Orbax checkpoint of {"params": ..., **extra collections} (int8 + scales after
                     int8 quantisation, packed int4 + group scales after int4)
    manifest.json    sha256 of every other file

`load_artifact` refuses, with an `ArtifactError` naming the file, an artifact whose files were
changed, removed or added after saving, one written by another format version, or params whose
shapes do not match the model the spec describes. A reloaded predictor predicts exactly like the
saved one.

Format versions: 2 is every artifact without int4 leaves; 3 adds packed int4 params (same layout
otherwise). An artifact is written with the lowest version that holds it, so a reader of version 2
still loads float / int8 / pruned artifacts and names the version of an int4 one; this module reads
both.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from nexus_jax.data.relational import ContextSetBuilder
from nexus_jax.inference import dequantize
from nexus_jax.nexusflow.optimization import QUANTIZED
from nexus_jax.nexusflow.table_predictor import TabularPredictor
from nexus_jax.train.checkpoint import fingerprint
from nexus_jax.train import integrity
from nexus_jax.train.integrity import sha256_file  # noqa: F401 (re-exported)

# 2: the cross-table block uses the shared tabular attention (models/tabular); 1 cannot be read.
# 3: version 2 + packed int4 params (`optimize("int4")`); written only for int4 artifacts.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
ARTIFACT_FILE, MANIFEST_FILE = "artifact.json", "manifest.json"


class ArtifactError(ValueError):
  """The artifact folder cannot be loaded (tampered, incomplete, other format version, wrong params)."""


def json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _is_artifact(path: pathlib.Path) -> bool:
  """Whether folder `path` holds an artifact of this library (any format version)."""
  try:
    meta = json.loads((path / ARTIFACT_FILE).read_text())
  except (OSError, ValueError):
    return False
  return (path / MANIFEST_FILE).is_file() and isinstance(meta, dict) and "format_version" in meta


def check_save_target(path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
  """Where an artifact may be written: a new folder, an empty one, or one holding an artifact.

  Raises:
    ArtifactError naming the folder when it is a file, the working directory (or one of its
    parents), or a folder with other contents (unless `overwrite`); nothing is touched.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not path.is_dir():
    raise ArtifactError(f"{path} is a file, not a folder; choose a new folder for the artifact")
  cwd = pathlib.Path.cwd().absolute()
  if path == cwd or path in cwd.parents:
    raise ArtifactError(
        f"{path} is the working directory (or contains it); save the artifact to a new folder"
    )
  if path.is_dir() and any(path.iterdir()) and not _is_artifact(path) and not overwrite:
    raise ArtifactError(
        f"{path} already exists and does not hold a nexus_jax artifact; it was left untouched. "
        "Choose a new folder, or pass overwrite=True to replace it."
    )
  return path


def save_artifact(
    predictor: TabularPredictor,
    path: str | pathlib.Path,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> pathlib.Path:
  """Writes `predictor` to folder `path` (see `check_save_target` for which folders may be used).

  The artifact is written beside `path` first and renamed into place, so a failed save leaves the
  old folder as it was. `extra_files` ({name: text}) are added and listed in the manifest.
  """
  path = check_save_target(path, overwrite)
  with integrity.atomic_folder(path) as tmp:
    predictor.builder.save(tmp / "builder")
    extra = {k: v for k, v in predictor.variables.items() if k != "params"}
    tree = {"params": predictor.params_stored, **extra}
    integrity.save_tree(tmp / "params", tree)
    version = format_version_for(predictor.optimization)
    meta = {
        "format_version": version,
        "kind": "nexus_former",
        "task": predictor.task,
        "classes": None if predictor.classes is None else list(predictor.classes),
        "target_scale": list(predictor.target_scale),
        "compute_dtype": predictor.compute_dtype,
        "spec": predictor.spec,
        "fit_columns": predictor.fit_columns,
        "optimization": predictor.optimization,
        "training": predictor.training,
        "params_fingerprint": fingerprint(predictor.variables["params"]),
    }
    (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1, default=json_default))
    for name, text in (extra_files or {}).items():
      (tmp / name).write_text(text)
    integrity.write_manifest(tmp, MANIFEST_FILE, format_version=version)
  return path


def format_version_for(optimization: list[dict[str, Any]]) -> int:
  """The lowest format version holding params optimised by `optimization` (3 with int4, else 2)."""
  return 3 if any(o.get("method") == "int4" for o in optimization) else 2


def verify_artifact(path: str | pathlib.Path) -> dict[str, Any]:
  """Checks the manifest against the files; returns artifact.json. Raises ArtifactError naming the file."""
  path = pathlib.Path(path)
  integrity.verify_manifest(path, ArtifactError, "artifact", MANIFEST_FILE)
  meta = json.loads((path / ARTIFACT_FILE).read_text())
  version = meta.get("format_version")
  if version not in READABLE_VERSIONS or isinstance(version, bool):
    newer = isinstance(version, int) and version > FORMAT_VERSION
    raise ArtifactError(
        f"{path / ARTIFACT_FILE}: artifact format version {version!r}, this nexus_jax reads "
        f"version {' or '.join(map(str, READABLE_VERSIONS))}; "
        + ("upgrade nexus_jax to load it" if newer else "re-train or re-save it with this version")
    )
  return meta


def load_artifact(path: str | pathlib.Path) -> TabularPredictor:
  """Verifies and loads an artifact written by `save_artifact` (no unpickling anywhere)."""
  path = pathlib.Path(path).absolute()
  meta = verify_artifact(path)
  if meta.get("kind") != "nexus_former":
    raise ArtifactError(f"{path / ARTIFACT_FILE}: kind {meta.get('kind')!r} is not 'nexus_former'")
  builder = ContextSetBuilder.load(path / "builder")
  tree = integrity.restore_tree(path / "params")
  stored = tree.pop("params")
  params = (
      dequantize(stored) if any(o["method"] in QUANTIZED for o in meta["optimization"]) else stored
  )
  if fingerprint(params) != meta["params_fingerprint"]:
    raise ArtifactError(
        f"{path / 'params'}: parameter shapes differ from {ARTIFACT_FILE}'s fingerprint"
    )
  predictor = TabularPredictor(
      builder,
      meta["spec"],
      {"params": params, **tree},
      tuple(meta["target_scale"]),
      meta["fit_columns"],
      meta["compute_dtype"],
      params_stored=stored,
      optimization=meta["optimization"],
      training=meta.get("training"),
  )
  expected = jax.eval_shape(
      lambda: nn.unbox(predictor.model.init(jax.random.key(0), *_example(predictor)))["params"]
  )
  if fingerprint(expected) != meta["params_fingerprint"]:
    raise ArtifactError(
        f"{path / ARTIFACT_FILE}: the stored params do not fit the model its spec describes"
    )
  return predictor


def _example(predictor: TabularPredictor) -> tuple[dict, dict]:
  """Zero inputs of batch size 1 with the spec's feature layout (for shape checks)."""
  spec = predictor.spec

  def rows(lead, fn, cards):
    return {
        "numeric": np.zeros(lead + (fn,), np.float32),
        "numeric_missing": np.zeros(lead + (fn,), bool),
        "categorical": np.zeros(lead + (len(cards),), np.int32),
    }

  tf = spec["target_features"]
  target = rows((1,), tf["num_numeric"], tf["cat_cardinalities"])
  m = {s.name: s.max_rows for s in predictor.builder.contexts}
  contexts = {}
  for c in spec["contexts"]:
    lead = (1, m[c["name"]])
    contexts[c["name"]] = {
        **rows(lead, c["num_numeric"], c["cat_cardinalities"]),
        "mask": np.zeros(lead, bool),
        "ages": np.zeros(lead, np.float32),
    }
  return target, contexts
