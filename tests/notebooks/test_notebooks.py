"""The notebooks in notebooks/: each runs top to bottom in quick mode, and is committed clean.

`test_notebook_executes` runs a notebook the way a reader would, in a fresh kernel with the working
directory notebooks/, and fails on the first cell that raises; the notebooks' own asserts check
their results (backends agree, losses fall, reloaded predictions are identical, ...). Its wall time
is printed (`pytest -s tests/notebooks`) and recorded as the test's `seconds` property.
"""

import ast
import pathlib
import subprocess
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
EXPECTED = {
    "language_models.ipynb",
    "layers_in_your_flax_model.ipynb",
    "sharding.ipynb",
    "tabular_quickstart.ipynb",
}

sys.path.insert(0, str(FOLDER))
import strip_outputs  # noqa: E402


def _read(path):
  return nbformat.read(path, as_version=4)


def _setup_cell(nb):
  return next(c for c in nb.cells if c.cell_type == "code").source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, record_property):
  nb = _read(path)
  t0 = time.perf_counter()
  NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(FOLDER)}}
  ).execute()
  seconds = time.perf_counter() - t0
  record_property("seconds", round(seconds, 1))
  print(f"{path.name}: {seconds:.0f} s in quick mode")
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no inline plot was shown"


def test_the_four_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
  nb = _read(path)
  assert not strip_outputs.dirty_cells(
      nb
  ), f"{path.name} has outputs or execution counts: python notebooks/strip_outputs.py"
  assert all(c.source.strip() for c in nb.cells), f"{path.name} has an empty cell"
  kinds = [c.cell_type for c in nb.cells]
  assert (
      kinds[0] == "markdown" and kinds.count("markdown") >= kinds.count("code") // 2
  ), f"{path.name}: a story needs prose between the code cells"


def test_setup_cell_is_shared_quick_and_imports_nothing():
  """One setup cell for all notebooks, QUICK on; run here it installs nothing, finds this checkout
  and leaves jax unimported (the sharding notebook sets XLA_FLAGS after it)."""
  cells = {p.name: _setup_cell(_read(p)) for p in NOTEBOOKS}
  first = next(iter(cells.values()))
  assert all(c == first for c in cells.values()), "the setup cells differ"
  tree = ast.parse(first)
  values = {
      t.id: node.value.value
      for node in tree.body
      if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
      for t in node.targets
  }
  assert values["QUICK"] is True, "commit the notebooks with QUICK = True (the tests rely on it)"
  assert values["REPO_URL"].startswith("https://github.com/")
  probe = first + "\nprint('JAX_IMPORTED', 'jax' in sys.modules, 'REPO', REPO, 'RUNTIME', RUNTIME)"
  proc = subprocess.run(
      [sys.executable, "-c", probe], cwd=FOLDER, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  line = proc.stdout.splitlines()[-1].split()
  assert line[1] == "False" and pathlib.Path(line[3]) == FOLDER.parent, proc.stdout
  assert line[5] in ("local", "tpu-vm"), proc.stdout


def test_strip_outputs_cleans_an_executed_notebook(tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("print(1)")]
  nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
  nb.cells[1].execution_count = 3
  nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
  path = tmp_path / "x.ipynb"
  nbformat.write(nb, path)
  assert strip_outputs.main(["--check", str(path)]) == 1
  assert strip_outputs.main([str(path)]) == 0
  clean = _read(path)
  assert not strip_outputs.dirty_cells(clean) and clean.cells[1].source == "print(1)"
  assert strip_outputs.main(["--check", str(path)]) == 0
