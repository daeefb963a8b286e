"""End to end: the weather forecasting experiment on a tiny config (its saved model reproduces the
test forecasts); window construction."""

import importlib.util
import json
import pathlib

import numpy as np

from experiments.run import run_experiment
from experiments.timeseries import calendar, make_windows, model_forecasts, split_windows
from nexus_jax.models.saving import load_model

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config():
  spec = importlib.util.spec_from_file_location("ts_config", ROOT / "configs" / "timeseries.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_windows_align_past_future_and_teacher_forcing_inputs():
  import pandas as pd

  z = np.arange(2 * 50 * 3, dtype=np.float32).reshape(2, 50, 3)
  cal = calendar(pd.date_range("2013-01-01", periods=50, freq="h", tz="UTC"))
  w = make_windows(z, cal, np.array([10, 20]), past=4, horizon=3, autoregressive=True)
  assert w["source"].shape == (4, 4, 3 + 3 + 2 + 2) and w["decoder_inputs"].shape == (4, 3, 7)
  np.testing.assert_array_equal(w["history"][1, :, 0], z[0, 16:20, 0])
  np.testing.assert_array_equal(w["future"][2, :, 0], z[1, 10:13, 0])
  np.testing.assert_array_equal(w["source"][1, :, 0], z[0, 16:20, 0] - z[0, 19, 0])  # relative
  np.testing.assert_array_equal(w["source"][1, :, 3], [z[0, 19, 0]] * 4)  # level channels
  np.testing.assert_array_equal(w["decoder_inputs"][2, 0, :3], 0)  # last observed hour - itself
  np.testing.assert_array_equal(
      w["decoder_inputs"][2, 1, :3], z[1, 10] - z[1, 9]
  )  # teacher forcing
  np.testing.assert_array_equal(w["targets"][:, 1:], np.diff(w["future"], axis=1))
  np.testing.assert_array_equal(w["source"][3, :, -2:], [[0, 1]] * 4)  # origin one-hot
  direct = make_windows(z, cal, np.array([10, 20]), past=4, horizon=3, autoregressive=False)
  np.testing.assert_array_equal(direct["decoder_inputs"], w["future_feats"])
  np.testing.assert_array_equal(direct["targets"], w["future"] - w["history"][:, -1:])


def test_timeseries_experiment_end_to_end(tmp_path):
  c = _config()
  c.data.eval_stride = 48
  c.model.autoregressive = True  # the feedback path (the default is direct)
  c.model.update(num_encoder_layers=1, num_decoder_layers=1, embed_dim=16, mlp_dim=32)
  c.train.update(
      batch_size=32,
      num_steps=10,
      eval_every_steps=10,
      log_every_steps=5,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 2
  results = run_experiment(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test_mae_standardized"] == results["test_mae_standardized"]
  mae = saved["test_mae_standardized"]
  assert set(mae) == {"transformer", "seasonal_naive_24h", "ridge_lags", "persistence"}
  assert np.isfinite(mae["transformer"])  # 10 steps: finite, not yet good
  assert 0.3 < mae["ridge_lags"] < mae["persistence"] < mae["seasonal_naive_24h"] < 1.0
  assert saved["windows"]["train"] > 10 * saved["windows"]["test"] > 0
  assert (tmp_path / "timeseries.png").stat().st_size > 1000

  loaded = load_model(saved["model_dir"], family="encoder_decoder")
  assert loaded.metadata["autoregressive"] and len(loaded.metadata["std"]) == 7
  test = split_windows(c)[0]["test"]
  preds = model_forecasts(loaded.model, True, loaded.variables["params"], test, None, 32)
  assert np.abs(preds - test["future"]).mean() == mae["transformer"]  # the same forecasts
