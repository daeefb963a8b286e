"""Byte-level text corpora, by default the Python standard library's own `.py` sources (offline).

    splits = load_text_splits()          # {"train"|"valid"|"test": np.uint8 [n_bytes]}
    windows(splits["train"], 257)        # [N, 257] non-overlapping byte windows

Folders are split at the file level, deterministically: a file's split depends only on a hash
of its path relative to the root (and `salt`), never on the file order or on which other files
exist, so adding a file moves no other file. Files are concatenated in sorted path order. A
single file is split by position (first `1 - valid - test` of the bytes, then valid, then test).
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig

import numpy as np

SPLITS = ("train", "valid", "test")


def stdlib_dir() -> pathlib.Path:
  """The folder of this interpreter's Python standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_files(
    root: str | pathlib.Path, pattern: str = "*.py", exclude: tuple[str, ...] = ("site-packages",)
) -> list[pathlib.Path]:
  """Files under `root` matching `pattern` (recursive), sorted; paths relative to `root`.

  `exclude`: folder names whose files are skipped (third-party packages by default).
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ValueError(f"text root {root} is not a folder.")
  out = []
  for path in root.rglob(pattern):
    rel = path.relative_to(root)
    if path.is_file() and not any(part in exclude for part in rel.parts[:-1]):
      out.append(rel)
  if not out:
    raise ValueError(f"no files matching {pattern!r} under {root} (excluding {exclude}).")
  return sorted(out)


def split_of(
    relative_path: str | pathlib.Path,
    valid_fraction: float,
    test_fraction: float,
    salt: str = "nexus",
) -> str:
  """The split of one file: a uniform hash bucket of its relative path."""
  digest = hashlib.sha256(f"{salt}:{pathlib.PurePath(relative_path).as_posix()}".encode())
  u = int.from_bytes(digest.digest()[:8], "big") / 2.0**64
  if u < test_fraction:
    return "test"
  if u < test_fraction + valid_fraction:
    return "valid"
  return "train"


def load_text_splits(
    root: str | pathlib.Path | None = None,
    *,
    pattern: str = "*.py",
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    exclude: tuple[str, ...] = ("site-packages",),
    salt: str = "nexus",
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """`({split: bytes as uint8 [n]}, {split: relative file paths})`; root None: the stdlib."""
  if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
    raise ValueError(
        f"valid_fraction ({valid_fraction}) and test_fraction ({test_fraction}) "
        f"must be > 0 with a sum < 1."
    )
  root = stdlib_dir() if root is None else pathlib.Path(root)
  if root.is_file():
    data = np.frombuffer(root.read_bytes(), np.uint8)
    a = int(len(data) * (1 - valid_fraction - test_fraction))
    b = int(len(data) * (1 - test_fraction))
    if min(a, b - a, len(data) - b) < 2:
      raise ValueError(f"{root} is too small ({len(data)} bytes) to split.")
    return (
        {"train": data[:a], "valid": data[a:b], "test": data[b:]},
        {s: [root.name] for s in SPLITS},
    )
  files = {s: [] for s in SPLITS}
  for rel in list_files(root, pattern, exclude):
    files[split_of(rel, valid_fraction, test_fraction, salt)].append(rel)
  empty = [s for s in SPLITS if not files[s]]
  if empty:
    raise ValueError(
        f"splits {empty} got no files under {root}; use more files or larger "
        f"valid/test fractions."
    )
  data = {
      s: np.frombuffer(b"".join((root / f).read_bytes() for f in files[s]), np.uint8)
      for s in SPLITS
  }
  return data, {s: [f.as_posix() for f in files[s]] for s in SPLITS}


def windows(data: np.ndarray, length: int, max_windows: int = 0) -> np.ndarray:
  """Consecutive windows `[N, length]` overlapping by one byte (stride `length - 1`), so each
  byte after the first is a next-byte target exactly once; `max_windows` > 0 keeps the first N."""
  if length < 2:
    raise ValueError(f"window length must be >= 2; got {length}.")
  n = (len(data) - 1) // (length - 1)
  if max_windows:
    n = min(n, max_windows)
  if n < 1:
    raise ValueError(f"{len(data)} bytes are too few for one window of {length}.")
  idx = np.arange(n)[:, None] * (length - 1) + np.arange(length)[None, :]
  return data[idx]


def random_windows(data: np.ndarray, length: int, count: int, seed: int) -> np.ndarray:
  """`count` windows `[count, length]` at uniformly random offsets (seeded)."""
  if len(data) < length:
    raise ValueError(f"{len(data)} bytes are too few for a window of {length}.")
  starts = np.random.default_rng(seed).integers(0, len(data) - length + 1, count)
  return data[starts[:, None] + np.arange(length)[None, :]]
