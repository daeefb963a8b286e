"""Packed int4 params in the artifact: saved as format version 3 (others stay version 2), reloaded
to predict exactly like the in-memory int4 predictor, refused once quantised, and named clearly by
a reader that only knows version 2."""

import json

import numpy as np
import pytest
from relational_testing import predict_tables

from nexus_jax.nexusflow import artifact
from nexus_jax.nexusflow.artifact import ArtifactError, load_artifact, save_artifact
from nexus_jax.nexusflow.artifact_optimize import Variant, clone


def test_int4_round_trip_predicts_identically(fitted, tables, tmp_path):
  new, history = predict_tables(tables)
  predictor = clone(fitted.predictor_)
  report = predictor.optimize("int4", group_size=16)
  assert report["method"] == "int4" and report["bytes_after"] < report["bytes_before"] / 2
  packed = [x for x in _leaves(predictor.params_stored) if x.dtype == np.uint8]
  assert packed, "int4 leaves are stored packed in uint8"
  path = save_artifact(predictor, tmp_path / "int4")
  assert json.loads((path / "artifact.json").read_text())["format_version"] == 3
  assert json.loads((path / "manifest.json").read_text())["format_version"] == 3
  loaded = load_artifact(path)
  np.testing.assert_array_equal(
      loaded.predict_proba(new, history), predictor.predict_proba(new, history)
  )
  change = np.abs(predictor.predict_proba(new, history) - fitted.predict_proba(new, history))
  assert change.max() < 0.2
  with pytest.raises(ValueError, match="already int4-quantised"):
    loaded.optimize("int8")


def test_float_int8_and_pruned_artifacts_stay_version_2(fitted, tmp_path):
  for variant in (Variant("none"), Variant("int8"), Variant("prune", amount=0.3)):
    predictor = clone(fitted.predictor_)
    variant.apply(predictor)
    path = save_artifact(predictor, tmp_path / variant.method)
    assert json.loads((path / "artifact.json").read_text())["format_version"] == 2


def test_a_version_2_reader_names_the_newer_int4_format(fitted, tmp_path, monkeypatch):
  predictor = clone(fitted.predictor_)
  predictor.optimize("int4")
  path = save_artifact(predictor, tmp_path / "int4")
  monkeypatch.setattr(artifact, "READABLE_VERSIONS", (2,))
  monkeypatch.setattr(artifact, "FORMAT_VERSION", 2)
  with pytest.raises(
      ArtifactError, match="format version 3, this nexus_jax reads version 2; upgrade"
  ):
    load_artifact(path)


def test_clone_leaves_the_original_unoptimised(fitted):
  before = [o["method"] for o in fitted.predictor_.optimization]
  copy = clone(fitted.predictor_)
  copy.optimize("prune", amount=0.5)
  assert [o["method"] for o in fitted.predictor_.optimization] == before
  assert copy.training == fitted.predictor_.training
  assert fitted.predictor_.training["rows_per_split"]["train"] > 0


def _leaves(tree):
  import jax

  return jax.tree.leaves(tree)
