"""Shared helpers of tests/tabular: a tiny synthetic three-table task (customers, orders = target, events).

The label of an order depends on its own amount, its customer's segment (parent table) and the mean
value of the customer's recent events (history table), so every kind of context carries signal.
Imported by the tests (conftest.py puts this folder on sys.path).
"""

import numpy as np
import pandas as pd

SCHEMA = {
    "tables": {
        "customers": {"primary_key": "customer_id"},
        "orders": {
            "primary_key": "order_id",
            "time_column": "time",
            "foreign_keys": {"customer_id": "customers"},
        },
        "events": {"time_column": "time", "foreign_keys": {"customer_id": "customers"}},
    },
    "target": {"table": "orders", "column": "label", "task": "binary"},
    "split": {"method": "time", "valid_start": "2024-03-01", "test_start": "2024-03-16"},
}
TINY = dict(
    num_epochs=1,
    min_steps=60,
    d_model=16,
    batch_size=64,
    max_history=4,
    config_overrides={
        "model.target_encoder_kwargs.d_layers": (16,),
        "model.target_encoder_kwargs.d_embedding": 4,
        "model.target_encoder_kwargs.numeric_embedding": "linear",
        "model.d_head": 16,
        "model.context_encoder_kwargs.d_layers": (8,),
        "model.n_heads": 2,
        "eval.optimize": False,
        "optim.learning_rate": 3e-3,
        "train.min_epochs": 1,  # exactly min_steps on the tiny tables (no epoch budget)
    },
)


def make_tables(n_orders: int = 480, seed: int = 0) -> dict[str, pd.DataFrame]:
  rng = np.random.default_rng(seed)
  n_cust = 40
  customers = pd.DataFrame(
      {
          "customer_id": [f"c{i}" for i in range(n_cust)],
          "segment": rng.choice(["a", "b", "c"], n_cust),
          "income": rng.normal(50, 10, n_cust).round(1),
      }
  )
  start = pd.Timestamp("2024-01-01")
  ev_t = start + pd.to_timedelta(np.sort(rng.uniform(0, 90 * 24, 1200)), unit="h")
  events = pd.DataFrame(
      {
          "customer_id": rng.choice(customers["customer_id"], 1200),
          "time": ev_t,
          "kind": rng.choice(["view", "click", "cart"], 1200),
          "value": rng.normal(0, 1, 1200),
      }
  )
  t = start + pd.to_timedelta(np.sort(rng.uniform(0, 90 * 24, n_orders)), unit="h")
  orders = pd.DataFrame(
      {
          "order_id": np.arange(n_orders),
          "customer_id": rng.choice(customers["customer_id"], n_orders),
          "time": t,
          "amount": rng.gamma(2.0, 20.0, n_orders).round(2),
          "channel": rng.choice(["web", "app", "store"], n_orders),
      }
  )
  seg = orders["customer_id"].map(customers.set_index("customer_id")["segment"])
  recent = [
      events[(events.customer_id == c) & (events.time <= tt)].tail(4)["value"].mean()
      for c, tt in zip(orders.customer_id, orders.time)
  ]
  logit = (
      2.0 * (seg == "a")
      - 1.0
      + 0.03 * (orders["amount"] - 40)
      + 1.5 * np.nan_to_num(np.asarray(recent))
  )
  orders["label"] = (rng.random(n_orders) < 1 / (1 + np.exp(-logit))).astype(int)
  return {"customers": customers, "orders": orders, "events": events}


def predict_tables(tables):
  """The test-period orders without labels + every related table (what a user passes at predict time)."""
  orders = tables["orders"]
  new = (
      orders[orders["time"] >= pd.Timestamp("2024-03-16")]
      .drop(columns=["label"])
      .reset_index(drop=True)
  )
  history = orders[orders["time"] < pd.Timestamp("2024-03-16")].reset_index(drop=True)
  return {**tables, "orders": new}, history
