"""`nexusflow train | predict | optimize | package | serve` on one model, trained once per module.

`train --optimize quantization` on a small three-table folder writes the float artifact (with the
run's results.json next to it) and its int8 copy; the other subcommands work on that artifact:
predict equals `predict_folder`, optimize writes new artifacts (int4, pruning, the least lossy under
a size; never touching the input), package builds a verified folder and zip whose tampering is
caught, and the FastAPI app predicts the same numbers as `predict_folder` from JSON rows.
"""

import json
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest

from nexus_jax.cli import nexusflow
from nexus_jax.data.datasets.folder import save_folder
from nexus_jax.nexusflow.artifact import load_artifact, sha256_file
from nexus_jax.nexusflow.artifact_optimize import params_bytes
from nexus_jax.nexusflow.package import PackageError, verify_package
from nexus_jax.nexusflow.predict_cli import predict_folder, read_tables
from nexus_jax.testing import THREE_TABLE_SCHEMA, three_table_frames

SCHEMA = THREE_TABLE_SCHEMA
# Wide enough (~175k params, ~0.7 MB of float32) that array bytes, not the ~50 kB of Orbax
# metadata (and its write-to-write variation), decide the sizes on disk.
SMALL = [
    "--config.model.d_model=64",
    "--config.model.n_heads=2",
    "--config.model.d_head=64",
    "--config.model.target_encoder_kwargs.d_layers=(256,)",
    "--config.model.target_encoder_kwargs.d_embedding=8",
    "--config.model.context_encoder_kwargs.d_layers=(32,)",
    # one model: the size targets below are set against its ~0.7 MB of float params (the default
    # batched ensemble of 4 holds 4x that; tests/nexusflow/test_estimator.py covers its int8)
    "--config.model.ensemble_size=1",
    "--config.train.min_steps=60",
    "--config.train.progress=False",
    "--config.train.tensorboard=False",
    "--config.eval.plot_attention=False",
]


make_tables = three_table_frames


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, data folder) after `nexusflow train --optimize quantization`."""
  root = tmp_path_factory.mktemp("nexusflow")
  data = save_folder(make_tables(), SCHEMA, root / "tables")
  workdir = root / "run"
  argv = ["train", f"--config.data.path={data}", "--workdir", str(workdir)]
  assert nexusflow.main(argv + SMALL + ["--optimize", "quantization"]) == 0
  return workdir, data


def test_train_writes_the_artifact_and_its_int8_copy(trained, capsys):
  workdir, _ = trained
  results = json.loads((workdir / "results.json").read_text())
  assert results["artifact"] == str(workdir / "artifact")
  float_model = load_artifact(workdir / "artifact")
  int8 = load_artifact(workdir / "artifact_int8")
  assert float_model.optimization == [] and [o["method"] for o in int8.optimization] == ["int8"]
  assert params_bytes(workdir / "artifact_int8") < 0.6 * params_bytes(workdir / "artifact")
  assert float_model.training["table_rows"] == {"customers": 50, "orders": 600, "visits": 800}


def test_predict_matches_predict_folder(trained, tmp_path):
  workdir, data = trained
  out = tmp_path / "preds.csv"
  argv = ["predict", "--artifact", str(workdir / "artifact"), "--data", str(data)]
  assert nexusflow.main(argv + ["--output", str(out)]) == 0
  got = pd.read_csv(out)
  want = predict_folder(workdir / "artifact", data)
  np.testing.assert_allclose(got["proba_1"], want["proba_1"], rtol=1e-6)
  assert (got["order_id"] == want["order_id"]).all()
  assert nexusflow.main(argv + ["--output", str(out)]) == 2  # exists, no --overwrite


def test_optimize_int4_and_pruning_write_new_artifacts(trained, tmp_path, capsys):
  workdir, data = trained
  source = workdir / "artifact"
  before = sha256_file(source / "manifest.json")
  out = tmp_path / "int4"
  argv = ["optimize", "--model", str(source), "--method", "int4", "--group-size", "32"]
  assert nexusflow.main(argv + ["--output", str(out), "--eval-data", str(data), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert (
      report["label"] == "int4 g32"
      and report["array_bytes_after"] < report["array_bytes_before"] / 4
  )
  assert abs(report["change"]["auc"]) < 0.05
  int4 = load_artifact(out)
  assert int4.optimization[0]["method"] == "int4" and int4.optimization[0]["group_size"] == 32
  assert json.loads((out / "artifact.json").read_text())["format_version"] == 3
  pruned = tmp_path / "pruned"
  argv = ["optimize", "--model", str(source), "--method", "pruning", "--amount", "0.3"]
  assert nexusflow.main(argv + ["--output", str(pruned)]) == 0
  assert "pruning 0.3" in capsys.readouterr().out
  assert load_artifact(pruned).optimization[0]["sparsity"] == pytest.approx(0.3, abs=0.01)
  assert sha256_file(source / "manifest.json") == before  # the input is untouched


def test_optimize_refuses_existing_outputs_and_the_input(trained, tmp_path, capsys):
  workdir, _ = trained
  source = str(workdir / "artifact")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  base = ["optimize", "--model", source, "--method", "int8", "--output"]
  assert nexusflow.main(base + [str(mine)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert nexusflow.main(base + [str(mine), "--overwrite"]) == 2
  assert "does not hold a previous artifact" in capsys.readouterr().err
  assert (mine / "notes.txt").read_text() == "keep me"
  assert nexusflow.main(base + [source, "--overwrite"]) == 2
  assert "overlaps the input" in capsys.readouterr().err
  again = tmp_path / "again"
  assert nexusflow.main(base + [str(again)]) == 0
  assert nexusflow.main(base + [str(again)]) == 2  # an artifact, but no --overwrite
  assert nexusflow.main(base + [str(again), "--overwrite"]) == 0  # our own artifact: replaced


def test_target_size_picks_the_first_candidate_that_fits(trained, tmp_path, capsys):
  workdir, _ = trained
  source = workdir / "artifact"
  out = tmp_path / "small"
  argv = ["optimize", "--model", str(source), "--target-size-mb", "0.45", "--json"]
  assert nexusflow.main(argv + ["--output", str(out)]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = report["candidates"]
  fits = [r["label"] for r in rows if r.get("fits")]
  assert report["chosen"] == fits[0] == "int8"  # the float params (~0.7 MB) do not fit
  assert report["params_bytes_after"] == params_bytes(out) <= 450_000
  pruned = [r for r in rows if r["method"] == "prune"]
  assert all(r["array_bytes"] == rows[0]["array_bytes"] for r in pruned)  # stored dense
  assert pruned[-1]["params_bytes"] < rows[0]["params_bytes"]  # ...but zeros compress on disk
  int4_only = tmp_path / "int4_only"
  argv = ["optimize", "--model", str(source), "--method", "int4", "--target-size-mb", "0.4"]
  assert nexusflow.main(argv + ["--output", str(int4_only), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["chosen"] == "int4 g32" and {r["method"] for r in report["candidates"]} == {"int4"}


def test_target_size_with_eval_data_picks_the_best_metric(trained, tmp_path, capsys):
  workdir, data = trained
  out = tmp_path / "by_auc"
  argv = ["optimize", "--model", str(workdir / "artifact"), "--target-size-mb", "0.45"]
  assert nexusflow.main(argv + ["--eval-data", str(data), "--output", str(out), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  fitting = [r for r in report["candidates"] if r.get("fits")]
  best = max(r["metrics"]["auc"] for r in fitting)
  chosen = next(r for r in fitting if r["label"] == report["chosen"])
  assert chosen["metrics"]["auc"] == best and report["chosen_by"] == "best eval auc"
  assert all("change" in r for r in report["candidates"])


def test_unreachable_target_size_names_the_smallest_reachable(trained, tmp_path, capsys):
  workdir, _ = trained
  out = tmp_path / "tiny"
  argv = ["optimize", "--model", str(workdir / "artifact"), "--target-size-mb", "0.001"]
  assert nexusflow.main(argv + ["--output", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "the smallest reachable is" in err and "pruning 0.9" in err
  assert not out.exists() and not list(tmp_path.glob(".tiny*"))  # nothing left behind


def test_package_verifies_and_catches_tampering(trained, tmp_path, capsys):
  workdir, _ = trained
  out = tmp_path / "pkg"
  argv = ["package", "--model", str(workdir / "artifact"), "--output", str(out), "--zip"]
  assert nexusflow.main(argv) == 0
  names = {p.name for p in out.iterdir()}
  assert {"artifact", "model_card.json", "MODEL_CARD.md", "README.md", "SHA256SUMS"} <= names
  assert {"results.json", "learning_curves.png"} <= names  # standard target keeps the run's files
  card = json.loads((out / "model_card.json").read_text())
  results = json.loads((workdir / "results.json").read_text())
  assert card["training_data"]["rows_per_split"] == results["rows"]
  assert card["metrics"]["test"] == results["test"]
  assert "int8" in card["metrics"]["optimization_on_test"]
  assert card["schema"]["tables"]["orders"]["primary_key"] == "order_id"
  assert {"jax", "flax", "optax", "numpy", "pandas"} <= set(card["libraries"])
  assert card["files"]["artifact/manifest.json"]["sha256"] == sha256_file(
      out / "artifact" / "manifest.json"
  )
  readme = (out / "README.md").read_text()
  assert "nexusflow predict --artifact artifact --data" in readme
  assert "nexusflow serve --model artifact" in readme
  assert nexusflow.main(["package", "verify", str(out)]) == 0
  assert nexusflow.main(["package", "verify", str(out) + ".zip"]) == 0
  capsys.readouterr()
  for victim in ("MODEL_CARD.md", "artifact/builder/context_set_builder.json"):
    bad = tmp_path / f"bad-{victim.replace('/', '_')}"
    shutil.copytree(out, bad)
    (bad / victim).write_text((bad / victim).read_text() + " ")
    with pytest.raises(PackageError, match=f"{victim}: contents changed"):
      verify_package(bad)
    assert nexusflow.main(["package", "verify", str(bad)]) == 2
    assert victim in capsys.readouterr().err
  extra = tmp_path / "extra"
  shutil.copytree(out, extra)
  (extra / "artifact" / "payload.bin").write_bytes(b"x")
  with pytest.raises(PackageError, match="payload.bin: not listed"):
    verify_package(extra)


def test_package_production_target_and_existing_outputs(trained, tmp_path, capsys):
  workdir, _ = trained
  out = tmp_path / "prod"
  argv = ["package", "--model", str(workdir / "artifact"), "--output", str(out)]
  assert nexusflow.main(argv + ["--target", "production"]) == 0
  assert not (out / "learning_curves.png").exists() and not (out / "results.json").exists()
  card = verify_package(out)
  assert [o["method"] for o in card["model"]["optimization"]] == ["int8"]
  assert card["package"]["target"] == "production"
  assert nexusflow.main(argv) == 2 and "already exists" in capsys.readouterr().err
  assert nexusflow.main(argv + ["--overwrite"]) == 0  # a previous package: replaced
  assert verify_package(out)["package"]["target"] == "standard"
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("mine")
  argv = ["package", "--model", str(workdir / "artifact"), "--output", str(mine), "--overwrite"]
  assert nexusflow.main(argv) == 2
  assert "does not hold a previous package" in capsys.readouterr().err
  assert (mine / "thesis.tex").read_text() == "mine"


def _json_rows(frame: pd.DataFrame) -> list[dict]:
  return json.loads(frame.to_json(orient="records", date_format="iso"))


def test_serve_predicts_like_predict_folder(trained):
  from fastapi.testclient import TestClient

  from nexus_jax.nexusflow.server import create_app

  workdir, data = trained
  artifact = workdir / "artifact"
  client = TestClient(create_app(str(artifact)))
  health = client.get("/health").json()
  assert health["status"] == "ok" and health["format_version"] == 2
  assert health["model_sha256"] == sha256_file(artifact / "manifest.json")
  assert client.get("/schema").json()["target"]["column"] == "returned"
  tables = read_tables(data, load_artifact(artifact).schema)
  body = {"tables": {name: _json_rows(df) for name, df in tables.items()}}
  got = client.post("/predict", json=body)
  assert got.status_code == 200
  want = predict_folder(artifact, data)
  np.testing.assert_allclose(
      np.asarray(got.json()["probabilities"]), want[["proba_0", "proba_1"]], rtol=1e-6
  )
  assert got.json()["keys"] == want["order_id"].tolist()
  later = client.post("/predict", json={**body, "predict_from": "2024-06-01"}).json()
  want = predict_folder(artifact, data, predict_from="2024-06-01")
  np.testing.assert_allclose(np.asarray(later["probabilities"])[:, 1], want["proba_1"], rtol=1e-6)


def test_serve_errors_name_the_table_and_column(trained):
  from fastapi.testclient import TestClient

  from nexus_jax.nexusflow.server import create_app

  workdir, data = trained
  client = TestClient(create_app(str(workdir / "artifact")))
  tables = read_tables(data, load_artifact(workdir / "artifact").schema)
  rows = {name: _json_rows(df.head(20)) for name, df in tables.items()}
  renamed = [{("prize" if k == "price" else k): v for k, v in r.items()} for r in rows["orders"]]
  bad = client.post("/predict", json={"tables": {**rows, "orders": renamed}})
  assert bad.status_code == 400
  assert "table 'orders'" in bad.json()["detail"] and "'prize'" in bad.json()["detail"]
  missing = client.post(
      "/predict", json={"tables": {k: v for k, v in rows.items() if k != "visits"}}
  )
  assert missing.status_code == 400 and "visits" in missing.json()["detail"]
  shape = client.post("/predict", json={"tables": {"orders": [1, 2]}})
  assert shape.status_code == 422 and shape.json()["detail"].startswith("body.tables.orders.0")
