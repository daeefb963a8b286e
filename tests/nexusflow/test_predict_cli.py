"""predict_cli: --output is checked before any work; an existing file is kept without --overwrite."""

import pandas as pd
import pytest
from relational_testing import SCHEMA, predict_tables

from nexus_jax.data.datasets.folder import save_folder
from nexus_jax.nexusflow import predict_cli


@pytest.fixture(scope="module")
def folders(fitted, tables, tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  new, _ = predict_tables(tables)
  return fitted.save(root / "model"), save_folder(new, SCHEMA, root / "tables"), root


def test_predicts_and_keeps_an_existing_output(folders, capsys):
  artifact, data, root = folders
  out = root / "pred.csv"
  assert (
      predict_cli.main(["--artifact", str(artifact), "--data", str(data), "--output", str(out)])
      == 0
  )
  pred = pd.read_csv(out)
  assert {"order_id", "prediction", "proba_0", "proba_1"} <= set(pred.columns)
  out.write_text("mine")
  argv = ["--artifact", str(artifact), "--data", str(data), "--output", str(out)]
  assert predict_cli.main(argv) == 2
  assert "already exists; pass --overwrite" in capsys.readouterr().err
  assert out.read_text() == "mine"
  assert predict_cli.main(argv + ["--overwrite"]) == 0 and len(pd.read_csv(out)) == len(pred)


@pytest.mark.parametrize(
    "where, message", [("missing/p.csv", "does not exist"), (".", "is a folder")]
)
def test_bad_output_fails_before_predicting(folders, monkeypatch, capsys, where, message):
  artifact, data, root = folders

  def no_work(*a, **k):
    raise AssertionError("predicted before checking --output")

  monkeypatch.setattr(predict_cli, "predict_folder", no_work)
  argv = ["--artifact", str(artifact), "--data", str(data), "--output", str(root / where)]
  assert predict_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
