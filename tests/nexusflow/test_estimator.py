"""NexusFlowClassifier / Regressor on a tiny three-table schema: fit, predict, save/load, bad input, optimize."""

import json
import shutil

import jax
import numpy as np
import pandas as pd
import pytest
from relational_testing import SCHEMA, TINY, make_tables, predict_tables
from sklearn.base import clone

from nexus_jax.data.schema import SchemaError
from nexus_jax.inference.quantize import tree_bytes
from nexus_jax.nexusflow.artifact import ArtifactError, sha256_file
from nexus_jax.nexusflow.estimator import NexusFlowClassifier, NexusFlowRegressor


def test_fit_predict_shapes_order_and_quality(fitted, tables):
  new, history = predict_tables(tables)
  proba = fitted.predict_proba(new, history=history)
  assert proba.shape == (len(new["orders"]), 2)
  np.testing.assert_allclose(proba.sum(1), 1.0)
  np.testing.assert_array_equal(fitted.classes_, [0, 1])
  labels = fitted.predict(new, history=history)
  np.testing.assert_array_equal(labels, proba.argmax(1))
  # One prediction per row, in order: reversing the rows reverses the predictions.
  rev = {**new, "orders": new["orders"].iloc[::-1].reset_index(drop=True)}
  np.testing.assert_allclose(
      fitted.predict_proba(rev, history=history), proba[::-1], rtol=1e-5, atol=1e-6
  )
  report = fitted.fit_report_
  assert report["rows"]["train"] > report["rows"]["test"] > 0
  assert report["test"]["auc"] > 0.6, report  # the task is learnable from the tables


def test_save_load_predicts_identically(fitted, tables, tmp_path):
  new, history = predict_tables(tables)
  path = fitted.save(tmp_path / "model")
  assert not list(path.rglob("*.pkl")) and not list(path.rglob("*.pickle"))
  loaded = NexusFlowClassifier.load(path)
  np.testing.assert_array_equal(
      loaded.predict_proba(new, history=history), fitted.predict_proba(new, history=history)
  )
  assert loaded.get_params() == json.loads(
      json.dumps(fitted.get_params())
  )  # tuples come back as lists


def test_unseen_categories_nan_and_missing_related_rows(fitted, tables):
  new, history = predict_tables(tables)
  orders = new["orders"].copy()
  orders.loc[0, "channel"] = "carrier pigeon"  # unseen category
  orders.loc[1, "amount"] = np.nan  # missing numeric
  orders.loc[2, "customer_id"] = "nobody"  # no parent row, no history
  orders.loc[3, "customer_id"] = None  # null foreign key
  events = tables["events"]
  events = events[
      events["customer_id"] != orders.loc[4, "customer_id"]
  ]  # a customer without any event
  proba = fitted.predict_proba({**new, "orders": orders, "events": events}, history=history)
  assert proba.shape == (len(orders), 2) and np.isfinite(proba).all()
  base = fitted.predict_proba(new, history=history)
  touched = set(new["orders"]["customer_id"].iloc[:5])
  untouched = ~new["orders"]["customer_id"].isin(touched).to_numpy()
  np.testing.assert_allclose(
      proba[untouched], base[untouched], rtol=1e-5, atol=1e-6
  )  # other rows unaffected
  assert not np.allclose(proba[:3], base[:3])


def test_bad_input_names_table_and_column(fitted, tables):
  new, history = predict_tables(tables)
  with pytest.raises(SchemaError, match="table\\(s\\) \\['shops'\\] were not in the training data"):
    fitted.predict({**new, "shops": new["customers"]})
  with pytest.raises(SchemaError, match="table\\(s\\) \\['events'\\] are missing"):
    fitted.predict({k: v for k, v in new.items() if k != "events"})
  with pytest.raises(
      SchemaError, match="table 'orders': column\\(s\\) \\['coupon'\\] were not in the training"
  ):
    fitted.predict({**new, "orders": new["orders"].assign(coupon=1)})
  with pytest.raises(SchemaError, match="table 'customers': column 'income' .* is missing"):
    fitted.predict({**new, "customers": new["customers"].drop(columns=["income"])})
  with pytest.raises(
      SchemaError, match="table 'orders': column 'amount' was numeric at fit time .* \\['lots'\\]"
  ):
    fitted.predict({**new, "orders": new["orders"].assign(amount=["lots"] * len(new["orders"]))})
  with pytest.raises(
      SchemaError, match="table 'orders' \\(the target table\\) has no rows to predict"
  ):
    fitted.predict({**new, "orders": new["orders"].iloc[:0]})
  with pytest.raises(RuntimeError, match="not fitted"):
    NexusFlowClassifier().predict(new)
  with pytest.raises(SchemaError, match="handles tasks \\('regression',\\)"):
    NexusFlowRegressor().fit(tables, SCHEMA)


def _rewrite(path, name, text):
  (path / name).write_text(text)
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["sha256"][name] = sha256_file(path / name)
  (path / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_or_foreign_artifacts_fail_clearly(fitted, tmp_path):
  path = fitted.save(tmp_path / "model")
  victims = sorted(p for p in (path / "params").rglob("*") if p.is_file() and p.stat().st_size > 16)
  for case in ("flip", "delete", "add", "version_newer", "version_older", "no_manifest"):
    bad = tmp_path / case
    shutil.copytree(path, bad)
    if case == "flip":
      target = bad / victims[-1].relative_to(path)
      data = bytearray(target.read_bytes())
      data[len(data) // 2] ^= 0xFF
      target.write_bytes(bytes(data))
      match = "contents changed after saving"
    elif case == "delete":
      (bad / "builder" / "context_set_builder.json").unlink()
      match = "are missing"
    elif case == "add":
      (bad / "params" / "extra.bin").write_bytes(b"\x80\x04evil")
      match = "were added after saving"
    elif case.startswith("version"):
      meta = json.loads((bad / "artifact.json").read_text())
      meta["format_version"] = 99 if case == "version_newer" else 0
      _rewrite(bad, "artifact.json", json.dumps(meta))
      match = "upgrade nexus_jax" if case == "version_newer" else "re-train or re-save"
    else:
      (bad / "manifest.json").unlink()
      match = "no manifest.json"
    with pytest.raises(ArtifactError, match=match):
      NexusFlowClassifier.load(bad)


def test_sklearn_params_and_clone():
  est = NexusFlowClassifier(num_epochs=3, d_model=24)
  assert est.get_params()["num_epochs"] == 3
  other = clone(est)
  assert other.get_params() == est.get_params() and other is not est
  est.set_params(learning_rate=1e-2)
  assert est.learning_rate == 1e-2
  with pytest.raises(ValueError, match="unknown parameter"):
    est.set_params(epochs=3)
  config = NexusFlowClassifier().make_config(SCHEMA)  # no arguments: the quick defaults
  assert config.model.name == "nexus_former" and config.train.min_steps == 400
  assert set(SCHEMA["tables"]) <= set(config.model.encoders)  # one encoder field per table
  config = NexusFlowClassifier(config_overrides={"model.ensemble_size": 2}).make_config(SCHEMA)
  assert config.model.ensemble_size == 2
  with pytest.raises(ValueError, match="config has no field 'model.widht'"):
    NexusFlowClassifier(config_overrides={"model.widht": 3}).make_config(SCHEMA)


def test_overrides_are_honoured_or_refused():
  est = NexusFlowClassifier(
      preset="full",
      num_epochs=2,
      config_overrides={"train.num_steps": 30, "model.d_model": 8, "data.count_windows": "1,24"},
  )
  c = est.make_config(SCHEMA)
  assert (c.train.num_epochs, c.train.num_steps, c.model.d_model) == (2, 30, 8)  # they beat "full"
  assert c.model.ensemble_size == 3  # what the preset sets and nobody overrode
  assert c.data.count_windows == "1,24"
  for key in ("data.path", "model.name", "eval.plot_attention", "preset"):
    with pytest.raises(ValueError, match=f"config_overrides: '{key}' is not honoured"):
      NexusFlowClassifier(config_overrides={key: "x"}).make_config(SCHEMA)
  with pytest.raises(ValueError, match="config_overrides\\['train.batch_size'\\] = 'abc'"):
    NexusFlowClassifier(config_overrides={"train.batch_size": "abc"}).make_config(SCHEMA)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"learning_rate": float("nan")}, "optim.learning_rate"),
        ({"learning_rate": -1e-3}, "optim.learning_rate"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"config_overrides": {"train.num_epochs": 0}}, "num_epochs"),
        ({"config_overrides": {"model.ensemble_mode": "parallel"}}, "model.ensemble_mode"),
        ({"config_overrides": {"model.ensemble_size": 0}}, "model.ensemble_size"),
        ({"config_overrides": {"model.ensemble_size": 2.5}}, "model.ensemble_size"),
        ({"config_overrides": {"model.min_member_epochs": -1.0}}, "model.min_member_epochs"),
        ({"config_overrides": {"model.min_member_batch": -1}}, "model.min_member_batch"),
    ],
)
def test_bad_training_settings_fail_before_any_work(tables, kwargs, field, monkeypatch):
  from nexus_jax.data import relational

  def no_build(*a, **k):
    raise AssertionError("the context sets were built before the settings were checked")

  monkeypatch.setattr(relational.ContextSetBuilder, "fit", no_build)
  with pytest.raises(ValueError, match=field.replace(".", "\\.")):
    NexusFlowClassifier(**kwargs).fit(tables, SCHEMA)


def test_history_overlapping_the_rows_names_history(fitted, tables):
  new, history = predict_tables(tables)
  overlap = pd.concat([history, new["orders"].iloc[:2]], ignore_index=True)
  with pytest.raises(SchemaError, match="^history: 2 row\\(s\\) share primary key 'order_id'"):
    fitted.predict(new, history=overlap)


def test_empty_related_table_predicts(fitted, tables):
  new, history = predict_tables(tables)
  proba = fitted.predict_proba({**new, "events": new["events"].iloc[:0]}, history=history)
  assert proba.shape == (len(new["orders"]), 2) and np.isfinite(proba).all()


def test_save_never_deletes_what_it_did_not_write(fitted, tmp_path, monkeypatch):
  mine = tmp_path / "notes"
  mine.mkdir()
  (mine / "thesis.txt").write_text("years of work")
  with pytest.raises(
      ArtifactError, match="does not hold a nexus_jax artifact; it was left untouched"
  ):
    fitted.save(mine)
  assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
  monkeypatch.chdir(mine)
  with pytest.raises(ArtifactError, match="is the working directory"):
    fitted.save(".", overwrite=True)
  assert (mine / "thesis.txt").read_text() == "years of work"
  monkeypatch.chdir(tmp_path.parent)
  path = fitted.save(tmp_path / "model")
  (tmp_path / "model" / "params" / "junk").write_text("x")  # a damaged artifact of ours ...
  assert fitted.save(path) == path  # ... is replaced atomically
  assert not (path / "params" / "junk").exists() and NexusFlowClassifier.load(path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes"]  # no leftovers beside
  empty = tmp_path / "empty"
  empty.mkdir()
  assert fitted.save(empty) == empty  # an empty folder is fine
  assert fitted.save(mine, overwrite=True) == mine and not (mine / "thesis.txt").exists()


def test_old_artifact_format_gets_a_clear_error(fitted, tmp_path):
  path = fitted.save(tmp_path / "model")
  meta = json.loads((path / "artifact.json").read_text())
  meta["format_version"] = 1
  _rewrite(path, "artifact.json", json.dumps(meta))
  with pytest.raises(
      ArtifactError, match="artifact format version 1, this nexus_jax reads version 2"
  ):
    NexusFlowClassifier.load(path)


def test_quantised_and_pruned_models_predict_with_bounded_change(fitted, tables, tmp_path):
  new, history = predict_tables(tables)
  est = NexusFlowClassifier.load(fitted.save(tmp_path / "orig"))
  labelled = {**tables, "orders": tables["orders"]}
  before = est.predict_proba(new, history=history)
  pruned = est.optimize("prune", amount=0.3, eval_tables=labelled)
  assert abs(pruned["sparsity"] - 0.3) < 0.01
  assert abs(pruned["change"]["auc"]) < 0.05 and abs(pruned["change"]["log_loss"]) < 0.05
  quant = est.optimize("int8", eval_tables=labelled)
  # A tiny model has many small leaves that stay float32; big matrices shrink by 75% (test_quantize.py).
  assert quant["size_reduction"] > 0.3 and abs(quant["change"]["auc"]) < 0.02
  after = est.predict_proba(new, history=history)
  assert np.max(np.abs(after - before)) < 0.2
  path = est.save(tmp_path / "small")
  reloaded = NexusFlowClassifier.load(path)
  np.testing.assert_array_equal(reloaded.predict_proba(new, history=history), after)
  assert [o["method"] for o in reloaded.predictor_.optimization] == ["prune", "int8"]
  # The stored arrays shrink (bytes on disk vary between two Orbax writes of the same tree).
  original = NexusFlowClassifier.load(tmp_path / "orig").predictor_.params_stored
  assert tree_bytes(reloaded.predictor_.params_stored) < 0.5 * tree_bytes(original)
  with pytest.raises(ValueError, match="already int8"):
    est.optimize("int8")


def test_regressor_fit_save_load(tables, tmp_path):
  schema = json.loads(json.dumps(SCHEMA))
  schema["target"] = {"table": "orders", "column": "amount", "task": "regression"}
  data = {**tables, "orders": tables["orders"].drop(columns=["label"])}
  reg = NexusFlowRegressor(**{**TINY, "min_steps": 30}).fit(data, schema)
  new = {
      **data,
      "orders": data["orders"].drop(columns=["amount"]).iloc[-20:].reset_index(drop=True),
  }
  pred = reg.predict(new)
  assert pred.shape == (20,) and np.isfinite(pred).all()
  assert 5 < float(np.mean(pred)) < 100  # back in the target's units (mean amount is ~40)
  np.testing.assert_array_equal(
      NexusFlowRegressor.load(reg.save(tmp_path / "reg")).predict(new), pred
  )
  with pytest.raises(ValueError, match="regressor"):
    reg.predictor_.predict_proba(new)


def test_deep_ensemble_averages_members_and_round_trips(tables, tmp_path):
  from nexus_jax.nexusflow.table_predictor import TabularPredictor

  kwargs = {
      **TINY,
      "min_steps": 20,
      "config_overrides": {
          **TINY["config_overrides"],
          "model.ensemble_size": 2,
          "model.ensemble_mode": "sequential",
      },
  }
  est = NexusFlowClassifier(**kwargs).fit(tables, SCHEMA)
  new, history = predict_tables(tables)
  proba = est.predict_proba(new, history=history)
  p = est.predictor_
  assert sorted(p.variables["params"]) == ["member_0", "member_1"] and p.spec["ensemble_size"] == 2
  assert [m["seed"] for m in est.fit_report_["ensemble_members"]] == [0, 1]
  members = []
  for i in range(2):
    spec = {k: v for k, v in p.spec.items() if k not in ("ensemble_size", "task", "ensemble_mode")}
    variables = {col: tree[f"member_{i}"] for col, tree in p.variables.items()}
    members.append(
        TabularPredictor(p.builder, spec, variables, p.target_scale, p.fit_columns).predict_proba(
            new, history=history
        )
    )
  assert not np.allclose(members[0], members[1])  # two seeds, two models
  np.testing.assert_allclose(proba, np.mean(members, 0), rtol=1e-5, atol=1e-6)
  loaded = NexusFlowClassifier.load(est.save(tmp_path / "ens"))
  np.testing.assert_array_equal(loaded.predict_proba(new, history=history), proba)
  quant = loaded.optimize("int8", eval_tables=tables)
  assert quant["size_reduction"] > 0.3 and abs(quant["change"]["auc"]) < 0.02


def test_a_table_without_feature_columns_still_trains():
  """A parent table with only its key (or every column dropped) becomes a learned presence token."""
  tables = make_tables(300)
  tables["customers"] = tables["customers"][["customer_id"]]
  est = NexusFlowClassifier(**TINY).fit(tables, SCHEMA)
  proba = est.predict_proba(tables)
  assert proba.shape == (len(tables["orders"]), 2) and np.isfinite(proba).all()


def test_summaries_fit_predict_and_reload_identically(tmp_path):
  """data.summaries: the target row's aggregate features are recomputed at predict time (they are
  not columns of the user's table) and the reloaded artifact predicts the same."""
  kw = dict(TINY, config_overrides={**TINY["config_overrides"], "data.summaries": "all"})
  tables = make_tables(300)
  est = NexusFlowClassifier(**kw).fit(tables, SCHEMA)
  names = est.predictor_.builder.preprocessors["orders"].get_feature_info().numeric_names
  assert "events.customer_id=customer_id.mean(value)" in names
  proba = est.predict_proba(tables)
  est.save(tmp_path / "m")
  np.testing.assert_allclose(NexusFlowClassifier.load(tmp_path / "m").predict_proba(tables), proba)


def test_batched_ensemble_trains_in_one_model_and_round_trips(tables, tmp_path):
  from nexus_jax.nexusflow.table_predictor import TabularPredictor

  overrides = {**TINY["config_overrides"], "model.ensemble_size": 3}  # batched: the default mode
  est = NexusFlowClassifier(**{**TINY, "min_steps": 20, "config_overrides": overrides})
  est.fit(tables, SCHEMA)
  p = est.predictor_
  assert p.spec["ensemble_mode"] == "batched" and list(p.variables["params"]) == ["members"]
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(p.variables["params"]))
  assert est.fit_report_["ensemble_members"] == []  # one model, one early stopping
  new, history = predict_tables(tables)
  proba = est.predict_proba(new, history=history)
  spec = {k: v for k, v in p.spec.items() if k not in ("ensemble_size", "task", "ensemble_mode")}
  members = [
      TabularPredictor(
          p.builder,
          spec,
          {c: jax.tree.map(lambda a, m=m: a[m], t["members"]) for c, t in p.variables.items()},
          p.target_scale,
          p.fit_columns,
      ).predict_proba(new, history=history)
      for m in range(3)
  ]
  assert not np.allclose(members[0], members[1])  # own inits, own rows, own dropout
  np.testing.assert_allclose(proba, np.mean(members, 0), rtol=1e-5, atol=1e-6)
  loaded = NexusFlowClassifier.load(est.save(tmp_path / "batched"))
  np.testing.assert_array_equal(loaded.predict_proba(new, history=history), proba)
  quant = loaded.optimize("int8", eval_tables=tables)
  assert quant["size_reduction"] > 0.3 and abs(quant["change"]["auc"]) < 0.02


def test_batched_ensemble_on_shared_batches_trains_every_member_on_every_row(tables):
  overrides = {
      **TINY["config_overrides"],
      "model.ensemble_size": 3,
      "model.min_member_batch": 10**6,  # no batch is big enough to split
  }
  est = NexusFlowClassifier(**{**TINY, "min_steps": 20, "config_overrides": overrides})
  est.fit(tables, SCHEMA)
  schedule = est.fit_report_["schedule"]
  assert schedule["split_members"] is False and schedule["ensemble_size"] == 3
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(est.predictor_.variables["params"]))
  assert schedule["batch_size"] % 3 != 0  # not rounded to a multiple of the members: not split
  assert est.fit_report_["valid_at_best"]["auc"] > 0.6  # it learned (deterministic seeds)
  assert np.isfinite(est.predict_proba(tables)).all()
