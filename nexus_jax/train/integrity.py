"""Integrity-checked folders: sha256 manifests, Orbax variable trees, atomic folder writes.

The generic pieces shared by every saved-folder format (`nexusflow/artifact.py`, the tabular
artifact; `models/saving.py`, the sequence models):

- `sha256_file`, `folder_files` and `write_manifest` / `verify_manifest`: a `manifest.json` that
  lists the sha256 of every other file of a folder; verification names the first file that was
  removed, added or changed after saving (raising the caller's `ValueError` subclass).
- `save_tree` / `restore_tree`: a pytree of arrays (a Flax variables dict) as an Orbax
  checkpoint folder (tensorstore, no pickle); restored as numpy arrays with the saved dtypes.
- `atomic_folder(path)`: write into a temporary sibling folder, then rename it into place, so a
  failed write leaves `path` as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | pathlib.Path) -> str:
  """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def folder_files(root: str | pathlib.Path, manifest: str = MANIFEST_FILE) -> list[str]:
  """Sorted paths (relative, '/'-separated) of every file under `root` but the manifest."""
  root = pathlib.Path(root)
  return sorted(
      p.relative_to(root).as_posix()
      for p in root.rglob("*")
      if p.is_file() and p.relative_to(root).as_posix() != manifest
  )


def write_manifest(
    root: str | pathlib.Path, manifest: str = MANIFEST_FILE, **fields: Any
) -> dict[str, Any]:
  """Writes `root/manifest` = `{**fields, "sha256": {file: digest}}` for every other file."""
  root = pathlib.Path(root)
  content = {**fields, "sha256": {f: sha256_file(root / f) for f in folder_files(root, manifest)}}
  (root / manifest).write_text(json.dumps(content, indent=1))
  return content


def verify_manifest(
    root: str | pathlib.Path,
    error: type[ValueError] = ValueError,
    what: str = "folder",
    manifest: str = MANIFEST_FILE,
) -> dict[str, Any]:
  """Checks every file of `root` against its manifest; returns the manifest's content.

  Raises:
    `error` (one line naming the file) when the manifest is missing or unreadable, or a file
    listed in it is missing, a file not listed was added, or a file's sha256 differs. `what`
    names the kind of folder in the messages ("artifact", "saved model").
  """
  root = pathlib.Path(root)
  if not (root / manifest).is_file():
    raise error(f"{root}: no {manifest}; not a nexus_jax {what} (or an incomplete one)")
  try:
    content = json.loads((root / manifest).read_text())
    expected = dict(content["sha256"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
    raise error(f"{root / manifest}: unreadable manifest ({err})") from None
  present = set(folder_files(root, manifest))
  missing = sorted(set(expected) - present)
  if missing:
    raise error(f"{root}: file(s) {missing[:3]} listed in {manifest} are missing")
  added = sorted(present - set(expected))
  if added:
    raise error(f"{root}: file(s) {added[:3]} were added after saving (not in {manifest})")
  for name, digest in sorted(expected.items()):
    if sha256_file(root / name) != digest:
      raise error(
          f"{root / name}: contents changed after saving (sha256 mismatch); "
          f"the {what} was tampered with or corrupted"
      )
  return content


def listed_files_match(root: str | pathlib.Path, manifest: str = MANIFEST_FILE) -> bool:
  """Whether `root`'s files are exactly the ones its manifest lists (names only, no hashing)."""
  root = pathlib.Path(root)
  try:
    expected = set(json.loads((root / manifest).read_text())["sha256"])
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return expected == set(folder_files(root, manifest))


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a save / restore done by this process alone (e.g. process 0 writing the
  artifact of a multi-process run): no barrier waits for the other processes."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}"
  )


def save_tree(directory: str | pathlib.Path, tree: Any) -> None:
  """Writes a pytree of arrays (`{"params": ..., **collections}`) as an Orbax checkpoint folder
  (host arrays, written by the calling process alone)."""
  with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckpt:
    ckpt.save(pathlib.Path(directory).absolute(), jax.device_get(tree))


def restore_tree(directory: str | pathlib.Path) -> Any:
  """The pytree written by `save_tree`, as numpy arrays with the saved dtypes."""
  with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckpt:
    tree = ckpt.restore(pathlib.Path(directory).absolute())
  return jax.tree.map(np.asarray, tree)


@contextlib.contextmanager
def atomic_folder(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields an empty temporary folder beside `path`; on success it becomes `path`.

  An existing `path` (the caller has decided it may be replaced) is moved aside first and deleted
  only once the new folder is in place; if the body or the swap fails, the temporary folder is
  removed and the previous `path` is put back.
  """
  path = pathlib.Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=path.parent))
  old = None
  try:
    yield tmp
    if path.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
      path.rename(old / "previous")
    tmp.rename(path)
  except BaseException:
    if old is not None and not path.exists():
      (old / "previous").rename(path)  # put the previous folder back
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
