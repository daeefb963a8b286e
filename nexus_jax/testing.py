"""Small, fully specified models and data for testing training infrastructure.

`ToyMLP` uses every feature the loop must handle: logically partitioned params (embed/mlp),
dropout, an optional BatchNorm (`batch_stats` collection) and a sown auxiliary loss.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from nexus_jax.train.steps import Objective


class ToyMLP(nn.Module):
  """x [batch, features] -> y [batch]; sows `aux_loss/toy_l2` = aux_weight * mean(h^2)."""

  hidden: int = 16
  dropout: float = 0.1
  batch_norm: bool = False
  aux_weight: float = 1e-3
  nan_after: float = 0.0  # if > 0, the output becomes NaN when |x| exceeds it (for NaN tests)
  dtype: Any = jnp.float32  # compute dtype (params stay float32)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False):
    init = nn.initializers.lecun_normal()
    h = nn.Dense(
        self.hidden,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
    )(x)
    if self.batch_norm:
      h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    self.sow("aux_loss", "toy_l2", self.aux_weight * jnp.mean(h**2))
    y = nn.Dense(
        1, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed"))
    )(h)
    y = y[..., 0].astype(jnp.float32)
    if self.nan_after > 0:
      y = jnp.where(jnp.max(jnp.abs(x)) > self.nan_after, jnp.nan, y)
    return y, {"hidden": h}


def toy_regression_data(n: int, features: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  """y = sin(x @ w) + 0.5 x @ w + noise with one fixed w; `seed` draws the rows.

  Returns {"x": [n, features], "y": [n]} float32.
  """
  w = np.random.default_rng(1234).normal(size=(features,)).astype(np.float32) / np.sqrt(features)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  z = x @ w
  y = (np.sin(z) + 0.5 * z + 0.05 * rng.normal(size=n)).astype(np.float32)
  return {"x": x, "y": y}


def mse_loss(outputs: Any, batch: Any):
  w = batch["weight"]
  err = (outputs - batch["y"]) ** 2
  loss = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)
  return loss, {"mae": jnp.sum(jnp.abs(outputs - batch["y"]) * w) / jnp.maximum(jnp.sum(w), 1.0)}


def toy_objective(**model_kwargs: Any) -> Objective:
  return Objective(
      model=ToyMLP(**model_kwargs),
      loss=mse_loss,
      inputs=lambda batch, train: {"x": batch["x"], "train": train},
  )


def stdlib_text_folder(root: pathlib.Path, count: int = 40) -> pathlib.Path:
  """`count` standard-library .py files of 2-20 KB (the first in path order) copied under `root`:
  a small real text corpus for the language-model experiments' tests."""
  from nexus_jax.data.datasets import text

  stdlib = text.stdlib_dir()
  picked = [f for f in text.list_files(stdlib) if 2_000 < (stdlib / f).stat().st_size < 20_000]
  for rel in picked[:count]:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stdlib / rel, root / rel)
  return root


def tiny_lm_folder(path: pathlib.Path, *, num_experts: int = 0, seed: int = 0) -> pathlib.Path:
  """A randomly initialised byte-level LanguageModel (2 layers, width 32) saved with
  `models.saving.save_model` at `path`: what `nexus-lm` and the HTTP server load, in a second.

  `num_experts > 0` makes its blocks MoE (top-2, dropless), else dense SwiGLU blocks.
  """
  import jax  # noqa: PLC0415

  from nexus_jax.models.lm import LanguageModel  # noqa: PLC0415
  from nexus_jax.models.saving import save_model  # noqa: PLC0415

  model = LanguageModel(
      vocab_size=256,
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      num_experts=num_experts,
      moe_top_k=min(2, max(num_experts, 1)),
  )
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
  return save_model(path, model, {"params": params})


THREE_TABLE_SCHEMA = {
    "tables": {
        "customers": {"primary_key": "customer_id"},
        "orders": {
            "primary_key": "order_id",
            "time_column": "ordered_at",
            "foreign_keys": {"customer_id": "customers"},
        },
        "visits": {"time_column": "visited_at", "foreign_keys": {"customer_id": "customers"}},
    },
    "target": {"table": "orders", "column": "returned", "task": "binary"},
    "split": {"method": "time", "valid_start": "2024-05-01", "test_start": "2024-06-01"},
}


def three_table_frames(n_orders: int = 600, seed: int = 0) -> dict[str, Any]:
  """customers (50) <- orders (`n_orders`, target `returned`) and visits (800, a time column):
  a small relational folder (with `THREE_TABLE_SCHEMA`) whose target depends on a parent column.
  """
  import pandas as pd  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  customers = pd.DataFrame(
      {
          "customer_id": np.arange(50),
          "segment": rng.choice(["retail", "pro"], 50),
          "age": rng.integers(18, 80, 50),
      }
  )
  start = pd.Timestamp("2024-01-01")
  hours = lambda n: pd.to_timedelta(np.sort(rng.uniform(0, 180 * 24, n)), unit="h")  # noqa: E731
  visits = pd.DataFrame(
      {
          "customer_id": rng.integers(0, 50, 800),
          "visited_at": start + hours(800),
          "pages": rng.integers(1, 9, 800),
      }
  )
  orders = pd.DataFrame(
      {
          "order_id": np.arange(n_orders),
          "customer_id": rng.integers(0, 50, n_orders),
          "ordered_at": start + hours(n_orders),
          "price": rng.gamma(2.0, 30.0, n_orders).round(2),
          "channel": rng.choice(["web", "app"], n_orders),
      }
  )
  segment = orders["customer_id"].map(customers.set_index("customer_id")["segment"])
  logit = 2.5 * segment.eq("pro").to_numpy() - 1.25 + 0.02 * (orders["price"].to_numpy() - 60)
  orders["returned"] = (rng.random(n_orders) < 1 / (1 + np.exp(-logit))).astype(int)
  return {"customers": customers, "orders": orders, "visits": visits}
