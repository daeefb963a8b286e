"""End to end: the estimator learns a perfectly separable three-table task and predicts it (AUC > 0.99).

orders -> customers -> regions; the label of an order is the `north` flag of its customer's region,
an attribute of the target row's grandparent. The context builder reaches the target table's parents
and histories only (`data/relational.py::discover_contexts`), so the `regions` table itself is not
read: the label is reachable as a function of the customer row's `region_id` categorical code (and
so of the customer). Held-out rows are new orders of the same customers. Validation evaluations of
such a task tie at AUC 1.0, which used to crash `fit` at the end (early stopping and the best
checkpoint chose different tied steps; issue 20).
"""

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from nexus_jax.nexusflow.estimator import NexusFlowClassifier

SCHEMA = {
    "tables": {
        "orders": {"primary_key": "order_id", "foreign_keys": {"customer_id": "customers"}},
        "customers": {"primary_key": "customer_id", "foreign_keys": {"region_id": "regions"}},
        "regions": {"primary_key": "region_id"},
    },
    "target": {"table": "orders", "column": "y", "task": "binary"},
    "split": {"method": "random", "valid_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
}
N_REGIONS, N_CUSTOMERS = 4, 12


def make_tables(n_orders: int, seed: int, first_id: int = 0) -> dict[str, pd.DataFrame]:
  """Regions with a `north` flag, customers spread over the regions, orders of random customers.

  Orders are `o{first_id + i}` (a different `first_id` gives new orders of the same customers).
  Returns {"orders", "customers", "regions"}; orders carry `y` = north flag of their customer's
  region and an `amount` that is pure noise.
  """
  regions = pd.DataFrame(
      {
          "region_id": [f"r{i}" for i in range(N_REGIONS)],
          "north": [1, 0, 1, 0],
          "name": ["north-east", "south-east", "north-west", "south-west"],
      }
  )
  customers = pd.DataFrame(
      {
          "customer_id": [f"c{i}" for i in range(N_CUSTOMERS)],
          "region_id": [f"r{i % N_REGIONS}" for i in range(N_CUSTOMERS)],
          "age": np.random.default_rng(7).normal(40, 10, N_CUSTOMERS).round(),
      }
  )
  rng = np.random.default_rng(seed)
  customer = rng.choice(customers["customer_id"], n_orders)
  region = customers.set_index("customer_id").loc[customer, "region_id"].to_numpy()
  orders = pd.DataFrame(
      {
          "order_id": [f"o{first_id + i}" for i in range(n_orders)],
          "customer_id": customer,
          "amount": rng.normal(0, 1, n_orders).round(3),
          "y": regions.set_index("region_id").loc[region, "north"].to_numpy(),
      }
  )
  return {"orders": orders, "customers": customers, "regions": regions}


def test_grandparent_attribute_is_learned_and_predicted_with_auc_1():
  tables = make_tables(600, seed=0)
  clf = NexusFlowClassifier(num_epochs=2, min_steps=60, d_model=16, learning_rate=1e-2)
  clf.fit(tables, SCHEMA)  # must not crash at the end when validation AUC ties at 1.0
  held_out = make_tables(200, seed=1, first_id=10_000)  # new orders, never seen in training
  y = held_out["orders"].pop("y").to_numpy()
  assert 0 < y.mean() < 1
  proba = clf.predict_proba(held_out)
  assert proba.shape == (200, 2)
  # 1.0 before the default summaries added the (label-free) order counts per customer; 0.995 after
  assert roc_auc_score(y, proba[:, 1]) > 0.99
