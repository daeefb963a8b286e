"""Reading and writing Hugging Face safetensors checkpoints, one tensor at a time, without torch.

    reader = CheckpointReader("path/to/model")   # model.safetensors, or the shards of
    reader.keys(); reader.shape(name)            #   model.safetensors.index.json
    w = reader.get(name)                         # numpy array, read (memory-mapped) on demand
    write_shards(folder, tensors, max_shard_bytes=...)   # tensors: iterable of (name, array)

Tensors are read with `safetensors.safe_open(framework="np")`; bfloat16 (which numpy lacks) is
read from the file's own header and byte offsets into an `ml_dtypes.bfloat16` view. Written files
carry the metadata `{"format": "pt"}` that transformers requires, plus `EXPORTED_BY`, which marks
a folder as one of our exports (the only kind an export may replace).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORTED_BY = {"exported_by": "nexus_jax"}
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}


class CheckpointReader:
  """The tensors of a safetensors checkpoint folder: one file, or shards listed in the index."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = pathlib.Path(folder)
    index = self.folder / INDEX_FILE
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: unreadable index ({err})") from None
      self.file_of = {k: self.folder / f for k, f in weight_map.items()}
      missing = sorted({str(f.name) for f in self.file_of.values() if not f.is_file()})
      if missing:
        raise ValueError(f"{index} lists shard(s) {missing[:3]} that are not in {self.folder}")
    elif (self.folder / SINGLE_FILE).is_file():
      with safe_open(self.folder / SINGLE_FILE, framework="np") as f:
        self.file_of = {k: self.folder / SINGLE_FILE for k in f.keys()}
    else:
      raise ValueError(
          f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint folder"
      )
    self._headers: dict[pathlib.Path, dict] = {}

  def keys(self) -> list[str]:
    return sorted(self.file_of)

  def _header(self, file: pathlib.Path) -> dict:
    if file not in self._headers:
      with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      self._headers[file] = {"offset": 8 + n, "tensors": header}
    return self._headers[file]

  def _entry(self, key: str) -> tuple[pathlib.Path, dict]:
    if key not in self.file_of:
      raise KeyError(f"{self.folder} has no tensor {key!r}")
    file = self.file_of[key]
    entry = self._header(file)["tensors"].get(key)
    if entry is None:
      raise ValueError(f"{file.name} does not hold {key!r}, though {INDEX_FILE} says it does")
    return file, entry

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(int(s) for s in self._entry(key)[1]["shape"])

  def dtype(self, key: str) -> str:
    """The safetensors dtype name ("F32", "BF16", ...)."""
    return self._entry(key)[1]["dtype"]

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a numpy array (bfloat16 as `ml_dtypes.bfloat16`)."""
    file, entry = self._entry(key)
    raw = _RAW_DTYPES.get(entry["dtype"])
    if raw is None:
      with safe_open(file, framework="np") as f:
        return f.get_tensor(key)
    begin, end = entry["data_offsets"]
    offset = self._header(file)["offset"] + begin
    count = (end - begin) // np.dtype(raw).itemsize
    data = np.memmap(file, dtype=raw, mode="r", offset=offset, shape=(count,))
    return np.array(data).reshape(entry["shape"])


def write_shards(
    folder: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    max_shard_bytes: int | None = None,
) -> list[str]:
  """Writes `(name, array)` pairs as `model.safetensors`, or (when they exceed
  `max_shard_bytes`) as `model-0000i-of-0000n.safetensors` shards plus the index; returns the
  file names. Each shard is written as soon as it is full (at most one shard is held)."""
  folder = pathlib.Path(folder)
  shards: list[list[str]] = []
  pending: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    nonlocal pending, size
    if pending:
      save_file(
          pending, folder / f"shard-{len(shards)}.tmp", metadata={"format": "pt", **EXPORTED_BY}
      )
      shards.append(list(pending))
      pending, size = {}, 0

  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if max_shard_bytes and pending and size + array.nbytes > max_shard_bytes:
      flush()
    pending[name] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  if len(shards) == 1:
    (folder / "shard-0.tmp").rename(folder / SINGLE_FILE)
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for i, (keys, name) in enumerate(zip(shards, names)):
    (folder / f"shard-{i}.tmp").rename(folder / name)
    weight_map.update({k: name for k in keys})
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return names + [INDEX_FILE]


def is_our_export(folder: str | os.PathLike) -> bool:
  """Whether `folder` holds only an export of ours (config.json, safetensors files, index)."""
  folder = pathlib.Path(folder)
  files = [p for p in folder.iterdir()]
  allowed = lambda p: p.is_file() and (
      p.name in ("config.json", INDEX_FILE) or p.name.endswith(".safetensors")
  )
  tensors = [p for p in files if p.name.endswith(".safetensors")]
  if not tensors or not all(allowed(p) for p in files):
    return False
  try:
    with safe_open(tensors[0], framework="np") as f:
      meta = f.metadata() or {}
  except Exception:  # not a safetensors file: not ours
    return False
  return all(meta.get(k) == v for k, v in EXPORTED_BY.items())
