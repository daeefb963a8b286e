"""Every notebook in notebooks/ executes top to bottom without error."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  ).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any(
      o.get("output_type") in ("display_data", "execute_result")
      and "image/png" in o.get("data", {})
      for o in outputs
  )


def test_there_is_a_notebook():
  assert NOTEBOOKS, "notebooks/ should hold at least one quickstart"
