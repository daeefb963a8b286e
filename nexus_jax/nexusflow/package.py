"""One self-contained, integrity-checked folder (and optionally a .zip) that ships a trained model.

    report = package_artifact("runs/x/artifact", "dist/orders_model", target="production", zip=True)
    card = verify_package("dist/orders_model")    # or "dist/orders_model.zip"; else PackageError

Layout of a package folder::

    artifact/          the model (`artifact.py`; its own manifest.json)
    model_card.json    schema, training data, metrics with baselines, size, library versions, and
                       bytes + sha256 of every other file (`model_card.py`)
    MODEL_CARD.md      the same for people
    README.md          the exact verify / predict / serve commands
    results.json, learning_curves.png, context_attention.png   the run's, next to the artifact
                       (target "standard" only, each when present)
    SHA256SUMS         sha256 of every file, `sha256sum -c SHA256SUMS` format

Targets: "standard" ships the artifact as it is with the run's results and plots; "production"
ships it int8-quantised (kept as it is when already quantised) and leaves out the training curves,
plots and results.json (the card keeps the metrics, and the int8 change the run measured). Any
other target is refused.

`verify_package` re-hashes every file against SHA256SUMS and the card, refuses a file missing or
added, and verifies the artifact's own manifest; the error names the file. The package is built
beside `output` and renamed into place, so a failed build leaves nothing half-written; an existing
`output` is replaced only when it holds a package (`is_package`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, Mapping

from nexus_jax.nexusflow.artifact import (
    ArtifactError,
    load_artifact,
    sha256_file,
    verify_artifact,
)
from nexus_jax.nexusflow.artifact_optimize import Variant, write_optimized
from nexus_jax.nexusflow.model_card import model_card, render_markdown
from nexus_jax.nexusflow.optimization import QUANTIZED

TARGETS = {
    "standard": "the artifact as it is, with the run's results.json and plots",
    "production": "int8-quantised artifact (unless already quantised), no training curves",
}
RUN_FILES = ("results.json", "learning_curves.png", "context_attention.png")
ARTIFACT_DIR, CARD_JSON, CARD_MD, README, SUMS = (
    "artifact",
    "model_card.json",
    "MODEL_CARD.md",
    "README.md",
    "SHA256SUMS",
)
PACKAGE_KIND = "nexusflow_package"


class PackageError(ValueError):
  """A package cannot be built or does not verify; the message names the file."""


def is_package(path: str | pathlib.Path) -> bool:
  """Whether folder `path` holds a package written by `package_artifact`."""
  path = pathlib.Path(path)
  try:
    card = json.loads((path / CARD_JSON).read_text())
  except (OSError, ValueError):
    return False
  return (path / SUMS).is_file() and isinstance(card, dict) and card.get("package") is not None


def run_results(artifact: pathlib.Path) -> dict[str, Any] | None:
  """The training run's results.json next to `artifact` (the runner's workdir), if any."""
  file = artifact.parent / "results.json"
  try:
    results = json.loads(file.read_text())
  except (OSError, ValueError):
    return None
  return results if isinstance(results, dict) and "test" in results else None


def package_artifact(
    model: str | pathlib.Path,
    output: str | pathlib.Path,
    target: str = "standard",
    zip: bool = False,  # noqa: A002 (the flag's name)
) -> dict[str, Any]:
  """Writes the package of the artifact at `model` to folder `output` (see the module docstring).

  Returns:
    {"output", "zip" (path or None), "target", "files" (count), "bytes", "params_bytes", "card"}.
  """
  if target not in TARGETS:
    raise PackageError(f"target {target!r} is unknown; choose one of {sorted(TARGETS)}")
  model, output = pathlib.Path(model).absolute(), pathlib.Path(output).absolute()
  if output.exists() and any(output.iterdir()) and not is_package(output):
    raise PackageError(f"{output} exists and does not hold a package; it was left untouched")
  source = load_artifact(model)  # verifies the input
  results = run_results(model)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.packaging-", dir=output.parent))
  try:
    _stage(model, source, tmp, target)
    packaged = load_artifact(tmp / ARTIFACT_DIR)
    (tmp / README).write_text(readme(packaged))
    files = {
        f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in _files(tmp)
    }
    card = model_card(
        packaged,
        tmp / ARTIFACT_DIR,
        results,
        package={"kind": PACKAGE_KIND, "target": target, "source": str(model)},
    )
    card["files"] = files
    (tmp / CARD_MD).write_text(render_markdown(card))
    (tmp / CARD_JSON).write_text(json.dumps(card, indent=1))
    (tmp / SUMS).write_text(
        "".join(f"{sha256_file(tmp / f)}  {f}\n" for f in _files(tmp) if f != SUMS)
    )
    verify_package(tmp)
    _move_into_place(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  zipped = write_zip(output) if zip else None
  return {
      "output": str(output),
      "zip": None if zipped is None else str(zipped),
      "target": target,
      "files": len(_files(output)),
      "bytes": sum((output / f).stat().st_size for f in _files(output)),
      "params_bytes": card["size"]["params_bytes"],
      "optimization": [o["method"] for o in packaged.optimization],
  }


def _stage(model: pathlib.Path, source: Any, tmp: pathlib.Path, target: str) -> None:
  """The artifact (int8 for production) and, for "standard", the run's files, into `tmp`."""
  quantized = any(o["method"] in QUANTIZED for o in source.optimization)
  if target == "production" and not quantized:
    write_optimized(model, tmp / ARTIFACT_DIR, Variant("int8"), predictor=source)
  else:
    shutil.copytree(model, tmp / ARTIFACT_DIR)
  if target == "standard":
    for name in RUN_FILES:
      if (model.parent / name).is_file():
        shutil.copy2(model.parent / name, tmp / name)


def _move_into_place(tmp: pathlib.Path, output: pathlib.Path) -> None:
  old = None
  if output.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    output.rename(old / "package")
  try:
    tmp.rename(output)
  except BaseException:
    if old is not None and not output.exists():
      (old / "package").rename(output)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def _files(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def zip_path(output: str | pathlib.Path) -> pathlib.Path:
  """Where `--zip` writes the package of folder `output`: `<output>.zip` beside it."""
  output = pathlib.Path(output).absolute()
  return output.with_name(output.name + ".zip")


def write_zip(output: pathlib.Path) -> pathlib.Path:
  """`<output>.zip` holding the folder `output/` (written beside it, then renamed)."""
  dest = zip_path(output)
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
  try:
    with open(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
      for name in _files(output):
        z.write(output / name, f"{output.name}/{name}")
    pathlib.Path(tmp).replace(dest)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return dest


def is_package_zip(path: str | pathlib.Path) -> bool:
  """Whether `path` is a zip written by `write_zip` (one folder with SHA256SUMS and a card)."""
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (OSError, zipfile.BadZipFile):
    return False
  tops = {n.split("/", 1)[0] for n in names}
  return len(tops) == 1 and {
      f"{next(iter(tops))}/{SUMS}",
      f"{next(iter(tops))}/{CARD_JSON}",
  } <= set(names)


def verify_package(path: str | pathlib.Path) -> dict[str, Any]:
  """Re-checks a package folder (or its .zip); returns its card. Raises PackageError naming the
  file that is missing, added or changed (see the module docstring)."""
  path = pathlib.Path(path)
  if path.is_file() and zipfile.is_zipfile(path):
    with tempfile.TemporaryDirectory(prefix="nexusflow-verify-") as tmp:
      root = _extract(path, pathlib.Path(tmp))
      return verify_package(root)
  if not path.is_dir():
    raise PackageError(f"{path}: not a package folder or .zip")
  sums_file = path / SUMS
  if not sums_file.is_file():
    raise PackageError(f"{path}: no {SUMS}; not a nexusflow package (or an incomplete one)")
  expected = {}
  for i, line in enumerate(sums_file.read_text().splitlines(), 1):
    digest, sep, name = line.partition("  ")
    if not sep or len(digest) != 64:
      raise PackageError(f"{sums_file}: line {i} is not '<sha256>  <file>'")
    expected[name] = digest
  present = set(_files(path)) - {SUMS}
  missing = sorted(set(expected) - present)
  if missing:
    raise PackageError(f"{path / missing[0]}: listed in {SUMS} but missing")
  added = sorted(present - set(expected))
  if added:
    raise PackageError(f"{path / added[0]}: not listed in {SUMS} (added after packaging)")
  for name, digest in expected.items():
    if sha256_file(path / name) != digest:
      raise PackageError(f"{path / name}: contents changed after packaging (sha256 mismatch)")
  try:
    card = json.loads((path / CARD_JSON).read_text())
  except (OSError, ValueError) as err:
    raise PackageError(f"{path / CARD_JSON}: unreadable ({err})") from None
  for name, entry in (card.get("files") or {}).items():
    if expected.get(name) != entry.get("sha256"):
      raise PackageError(f"{path / name}: sha256 in {CARD_JSON} differs from {SUMS}")
  try:
    verify_artifact(path / ARTIFACT_DIR)
  except ArtifactError as err:
    raise PackageError(str(err)) from None
  return card


def _extract(archive: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  """Extracts `archive` (refusing members outside `dest`); returns its one top folder."""
  with zipfile.ZipFile(archive) as z:
    for name in z.namelist():
      target = (dest / name).resolve()
      if dest.resolve() not in target.parents:
        raise PackageError(f"{archive}: member {name!r} would extract outside the folder")
    z.extractall(dest)
  tops = [p for p in dest.iterdir()]
  if len(tops) != 1 or not tops[0].is_dir():
    raise PackageError(f"{archive}: expected one package folder inside, found {len(tops)} entries")
  return tops[0]


def readme(predictor: Any) -> str:
  """README.md of a package: what the model predicts and the exact commands, run in the folder."""
  schema = predictor.schema
  target = schema.target
  tables = sorted(schema.tables)
  example = {
      "tables": {
          t: [{c: "..." for c in predictor.fit_columns.get(t, []) if c != target.column}]
          for t in tables
      }
  }
  outputs = "`prediction`"
  if predictor.classes is not None:
    outputs += ", " + ", ".join(f"`proba_{c}`" for c in predictor.classes)
  key = schema.target_table.primary_key
  if key:
    outputs += f" and the key `{key}`"
  tables_text = ", ".join(f"`{t}`" for t in tables)
  body = json.dumps(example)
  call = "predict_proba" if predictor.task != "regression" else "predict"
  time_hint = ""
  if schema.target_table.time_column:
    cutoff = schema.split.test_start or "2024-06-01T00:00Z"
    time_hint = (
        f"\nRows of `{target.table}` before `--predict-from TIME` only serve as history (here: "
        "the training run's test start):\n\n"
        "    nexusflow predict --artifact artifact --data new_tables/ --output predictions.csv "
        f"--predict-from {cutoff}\n"
    )
  return f"""# {target.table}.{target.column} ({target.task}): a NexusFlow model package

Predicts `{target.column}` for each row of table `{target.table}` from the related tables
{tables_text} (schema and metrics: MODEL_CARD.md, model_card.json).
Run the commands below inside this folder (`pip install nexus_jax[serve]` provides `nexusflow`).

## Check the files

    nexusflow package verify .

## Predict on a folder of tables

`new_tables/` holds one file per table (`<table>.csv`, `.csv.gz`, `.parquet`), with the columns
listed in MODEL_CARD.md; the `{target.table}` rows are predicted.

    nexusflow predict --artifact artifact --data new_tables/ --output predictions.csv
{time_hint}
`predictions.csv` has {outputs}.

## Serve over HTTP

    nexusflow serve --model artifact --host 127.0.0.1 --port 8000

    curl http://127.0.0.1:8000/health
    curl http://127.0.0.1:8000/schema
    curl -X POST http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
      -d '{body}'

Each table is a list of row objects (column -> value); `"predict_from"` (optional) works like
`--predict-from`.

## From Python

    from nexus_jax.nexusflow import load_artifact
    predictor = load_artifact("artifact")            # integrity-checked, no pickle
    out = predictor.{call}(tables)   # tables: {{name: pandas.DataFrame}}
"""
