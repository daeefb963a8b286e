"""`python -m nexus_jax.serve` on a NexusFlow artifact, over real HTTP on 127.0.0.1.

/v1/predict on JSON rows gives the numbers of `nexusflow predict` on the same folder; tables the
model cannot use get 400 naming the table or column; schemathesis over the live OpenAPI finds no 5xx
and no schema violation (a schema-valid body can still name tables the model lacks, so the check
that every schema-valid body succeeds is left out here); SIGTERM exits with code 0.
"""

import json

import httpx
import numpy as np
import pytest

from nexus_jax.data.datasets.folder import save_folder
from nexus_jax.nexusflow.artifact import load_artifact
from nexus_jax.nexusflow.estimator import NexusFlowClassifier
from nexus_jax.nexusflow.predict_cli import predict_folder, read_tables
from nexus_jax.testing import THREE_TABLE_SCHEMA, three_table_frames
from serve_testing import run_schemathesis, running_server

TINY = dict(
    num_epochs=1,
    min_steps=20,
    d_model=16,
    batch_size=64,
    max_history=4,
    config_overrides={"model.n_heads": 2, "model.d_head": 16},
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_tabular")
  tables = three_table_frames(300)
  data = save_folder(tables, THREE_TABLE_SCHEMA, root / "tables")
  artifact = NexusFlowClassifier(**TINY).fit(tables, THREE_TABLE_SCHEMA).save(root / "artifact")
  return artifact, data


@pytest.fixture(scope="module")
def server(trained):
  with running_server(trained[0]) as server:
    yield server
  assert server.returncode == 0, server.output


def rows(frame):
  return json.loads(frame.to_json(orient="records", date_format="iso"))


def test_predict_equals_nexusflow_predict(server, trained):
  artifact, data = trained
  tables = read_tables(data, load_artifact(artifact).schema)
  body = {"tables": {name: rows(df) for name, df in tables.items()}}
  got = httpx.post(server.url + "/v1/predict", json=body, timeout=120)
  assert got.status_code == 200, got.text
  want = predict_folder(artifact, data)
  np.testing.assert_allclose(
      np.asarray(got.json()["probabilities"]), want[["proba_0", "proba_1"]], rtol=1e-6
  )
  assert got.json()["keys"] == want["order_id"].tolist()
  models = httpx.get(server.url + "/v1/models").json()["data"][0]
  assert models["kind"] == "tabular" and models["task"] == "binary"


def test_tables_the_model_cannot_use_get_400_naming_them(server, trained):
  artifact, data = trained
  tables = read_tables(data, load_artifact(artifact).schema)
  body = {"tables": {name: rows(df) for name, df in tables.items() if name != "orders"}}
  r = httpx.post(server.url + "/v1/predict", json=body, timeout=60)
  assert r.status_code == 400 and "orders" in r.json()["detail"]
  r = httpx.post(server.url + "/v1/predict", json={"tables": [1]}, timeout=60)
  assert r.status_code == 422


def test_schemathesis_finds_no_server_errors_or_schema_violations(server, tmp_path):
  done = run_schemathesis(server, tmp_path, also_exclude=("positive_data_acceptance",))
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
