"""End to end: the tabular experiment on a tiny slice of nycflights13 -- the multi-table NexusFormer default
(results, attention plot, optimisation report, artifact -> predict command) and the flat row path with a resume.
"""

import importlib.util
import json
import pathlib

import pandas as pd
import pytest

from experiments.run import run_experiment
from nexus_jax.data.datasets import nycflights13
from nexus_jax.data.datasets.folder import save_folder
from nexus_jax.nexusflow import predict_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config():
  spec = importlib.util.spec_from_file_location("tabular_config", ROOT / "configs" / "tabular.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.max_rows = 3000
  c.train.update(batch_size=128, num_epochs=2, progress=False, tensorboard=False, log_every_steps=5)
  c.optim.warmup_steps = 5
  c.train.min_steps = 0  # the tiny slice: one epoch, as configured
  return c


@pytest.fixture(scope="module")
def tiny_config():
  c = load_config()
  c.model.update(d_model=16, n_heads=2, d_head=16)
  c.model.target_encoder_kwargs.update(d_layers=(16,), d_embedding=4)
  c.model.context_encoder_kwargs.update(d_layers=(8,), d_embedding=2)
  c.train.num_epochs = 1
  c.eval.plot_attention = True
  # Three of the seven contexts (one parent, two histories) keep the compile short on a CPU.
  c.data.contexts = "carrier->airlines,flights.tailnum=tailnum,weather.origin=origin"
  c.data.history_rows = 4
  return c


def test_multi_table_experiment_end_to_end_and_predict_command(tiny_config, tmp_path):
  results = run_experiment(tiny_config, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test"] == results["test"] and saved["model"]["name"] == "nexus_former"
  assert (
      0.0 <= saved["test"]["auc"] <= 1.0 and saved["test"]["log_loss"] > 0
  )  # 19 steps: no quality claim
  assert saved["rows"]["train"] > saved["rows"]["valid"] > 0
  assert saved["baselines_test_auc"]["lightgbm_set_a"] == 0.6957
  assert list(saved["context_importance"]) == tiny_config.data.contexts.split(",")
  assert (tmp_path / "context_attention.png").stat().st_size > 1000
  assert (tmp_path / "learning_curves.png").stat().st_size > 1000
  opt = saved["optimization"]
  assert 0.5 < opt["int8"]["size_reduction"] < 0.8 and opt["prune"]["sparsity"] == pytest.approx(
      0.5
  )
  assert abs(opt["int8"]["change"]["auc"]) < 0.02
  # The artifact predicts from raw tables: December flights of the slice, earlier flights as history.
  tables = nycflights13.load_tables(max_target_rows=3000)
  folder = save_folder(
      {**tables, "flights": tables["flights"].drop(columns=["delayed"])},
      nycflights13.SCHEMA,
      tmp_path / "tables",
  )
  out = tmp_path / "pred.csv"
  assert (
      predict_cli.main(
          [
              "--artifact",
              saved["artifact"],
              "--data",
              str(folder),
              "--output",
              str(out),
              "--predict-from",
              nycflights13.TEST_START,
          ]
      )
      == 0
  )
  pred = pd.read_csv(out)
  assert len(pred) == saved["rows"]["test"] and {"id", "prediction", "proba_0", "proba_1"} <= set(
      pred.columns
  )
  assert pred["proba_1"].between(0, 1).all()
  assert (
      predict_cli.main(
          ["--artifact", str(tmp_path / "nope"), "--data", str(folder), "--output", str(out) + "2"]
      )
      == 2
  )


@pytest.mark.slow
def test_ensemble_experiment_members_plots_and_resume(tiny_config, tmp_path):
  c = tiny_config.copy_and_resolve_references()
  c.model.ensemble_size = 2
  c.model.ensemble_mode = "sequential"
  c.eval.optimize = False
  results = run_experiment(c, tmp_path)
  members = results["ensemble_members"]
  assert [m["seed"] for m in members] == [c.seed, c.seed + 1] and all(
      m["valid"]["auc"] > 0 for m in members
  )
  for i in range(2):
    assert (tmp_path / f"member_{i}" / "learning_curves.png").stat().st_size > 1000
  assert (
      json.loads((pathlib.Path(results["artifact"]) / "artifact.json").read_text())["spec"][
          "ensemble_size"
      ]
      == 2
  )
  assert (
      run_experiment(c, tmp_path)["test"] == results["test"]
  )  # both members resume, nothing retrains


def test_row_experiment_end_to_end_and_resume(tmp_path):
  c = load_config()
  c.model.name = "row"
  c.model.row.update(d_hidden=16, d_embedding=4, d_layers=(32,))
  results = run_experiment(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test"] == results["test"] and saved["model"]["name"] == "row"
  assert 0.5 < saved["test"]["auc"] <= 1.0 and saved["test"]["log_loss"] > 0
  assert (tmp_path / "learning_curves.png").stat().st_size > 1000
  assert (tmp_path / "preprocessor").is_dir() and (tmp_path / "config.json").exists()
  # Rerunning in the same workdir resumes the finished run: no new steps, same test metrics.
  again = run_experiment(c, tmp_path)
  assert again["test"] == results["test"]
