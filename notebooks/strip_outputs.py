"""Removes outputs and execution counts from notebooks, so they are committed as source only.

    python notebooks/strip_outputs.py              # strips every notebook in notebooks/
    python notebooks/strip_outputs.py a.ipynb      # only the given files
    python notebooks/strip_outputs.py --check      # lists notebooks with outputs; exit 1 if any

Also drops per-cell execution metadata (timings, `collapsed`, `scrolled`) and the notebook-level
widget state, which change on every run and make diffs unreadable. Cell sources and ids are kept.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")
NOTEBOOK_METADATA = ("widgets",)


def dirty_cells(nb: nbformat.NotebookNode) -> list[int]:
  """Indices of code cells with outputs, an execution count or run-time metadata."""
  return [
      i
      for i, cell in enumerate(nb.cells)
      if cell.cell_type == "code"
      and (
          cell.get("outputs")
          or cell.get("execution_count") is not None
          or any(k in cell.get("metadata", {}) for k in CELL_METADATA)
      )
  ]


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """`nb` without outputs, execution counts and run-time metadata (modified in place)."""
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
    for key in CELL_METADATA:
      cell.get("metadata", {}).pop(key, None)
  for key in NOTEBOOK_METADATA:
    nb.metadata.pop(key, None)
  return nb


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("paths", nargs="*", type=pathlib.Path, help="default: notebooks/*.ipynb")
  parser.add_argument("--check", action="store_true", help="only report; exit 1 if any has outputs")
  args = parser.parse_args(argv)
  paths = args.paths or sorted(HERE.glob("*.ipynb"))
  dirty = []
  for path in paths:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    cells = dirty_cells(nb) or ([-1] if any(k in nb.metadata for k in NOTEBOOK_METADATA) else [])
    if not cells:
      continue
    dirty.append(path)
    if args.check:
      print(f"{path}: outputs in code cell(s) {[i for i in cells if i >= 0]}")
    else:
      nbformat.write(strip(nb), path)
      print(f"stripped {path}")
  if args.check and dirty:
    print("strip them with: python notebooks/strip_outputs.py", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
