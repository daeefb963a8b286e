"""train/continual_fit: replayed batches, LM Fisher targets, domain configs and field checks (the
end-to-end run through `fit` is tests/experiments/test_lm.py::test_lm_continual_*)."""

import importlib.util
import pathlib

import numpy as np
import pytest

from nexus_jax.train.continual_fit import (
    ReplayDataset,
    check_continual_config,
    domain_config,
    lm_targets,
    parse_domains,
)
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.replay import ReservoirBuffer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config():
  spec = importlib.util.spec_from_file_location("lm_config", ROOT / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_replay_dataset_replaces_the_last_rows_with_stored_windows():
  base = ArrayDataset({"tokens": np.zeros((40, 5), np.int32)}, 8, seed=0)
  buffer = ReservoirBuffer(10, seed=0)
  data = ReplayDataset(base, buffer, 2, seed=3)
  np.testing.assert_array_equal(data.train_batch(0)["tokens"], base.train_batch(0)["tokens"])
  buffer.add({"tokens": np.full((30, 5), 7, np.int32)})
  for step in range(5):
    batch = data.train_batch(step)
    assert batch["tokens"].shape == (8, 5) and batch["weight"].shape == (8,)
    assert np.all(batch["tokens"][:6] == 0) and np.all(batch["tokens"][6:] == 7)
    np.testing.assert_array_equal(batch["tokens"], data.train_batch(step)["tokens"])  # resumable


def test_lm_targets_shift_and_mask():
  tokens = np.arange(12).reshape(2, 6)
  labels, weights = lm_targets({"tokens": tokens, "mask": (tokens % 2).astype(np.int32)})
  np.testing.assert_array_equal(labels, tokens[:, 1:])
  np.testing.assert_array_equal(weights, tokens[:, 1:] % 2)
  _, ones = lm_targets({"tokens": tokens})
  assert float(ones.sum()) == 10


def test_domain_configs_and_parsing():
  c = _config()
  assert parse_domains(c) == [] and check_continual_config(c) == []
  c.continual.domains = " asyncio, xml ,"
  assert check_continual_config(c) == ["asyncio", "xml"]
  d = domain_config(c, pathlib.Path("/r"), "xml")
  assert d.data.root == "/r/xml" and d.data.test_fraction == c.continual.test_fraction
  assert c.data.root == ""  # the original is untouched


@pytest.mark.parametrize(
    "field, value",
    [
        ("domains", "a,a"),
        ("domains", "a"),
        ("replay_fraction", -0.1),
        ("replay_capacity", -1),
        ("fisher_examples", 0),
        ("fisher_variant", "exact"),
    ],
)
def test_bad_continual_fields_name_the_field(field, value):
  c = _config()
  c.continual.domains = "a,b"
  c.continual[field] = value
  with pytest.raises(ValueError, match=f"config.continual.{field}"):
    check_continual_config(c)


def test_continual_needs_the_byte_tokenizer():
  c = _config()
  c.continual.domains = "a,b"
  c.data.tokenizer = "bpe"
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    check_continual_config(c)


def test_run_domains_scores_test_and_validation_matrices(tmp_path):
  """Two tiny domains through `fit`: both matrices are filled, the last row of the validation
  matrix is the selection metric, and its diagonal is the validation loss `fit` selected on."""
  import math  # noqa: PLC0415

  from nexus_jax.data.datasets import text  # noqa: PLC0415
  from nexus_jax.models.lm import lm_from_config  # noqa: PLC0415
  from nexus_jax.models.seq_objectives import lm_objective  # noqa: PLC0415
  from nexus_jax.train.continual_fit import run_domains  # noqa: PLC0415

  c = _config()
  c.data.update(root=str(text.stdlib_dir()), seq_len=16, valid_bytes=512, test_bytes=1024)
  c.model.update(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=16, num_experts=2)
  c.train.update(batch_size=4, num_steps=3, eval_every_steps=3, progress=False, tensorboard=False)
  c.optim.warmup_steps = 1
  c.continual.domains = "asyncio,xml"
  model = lm_from_config(c.model, 256)
  out = run_domains(lambda: lm_objective(model), c, tmp_path)
  assert out.matrix.shape == out.valid_matrix.shape == (2, 2)
  assert np.all((0 < out.valid_matrix) & (out.valid_matrix < 9)) and np.all(out.matrix > 0)
  assert not np.allclose(out.valid_matrix[0], out.valid_matrix[1])  # domain 1 moved the params
  for i, fit_result in enumerate(out.fit_results):  # the domain's own valid loss, in bits
    best = fit_result.best_metrics["loss"] / math.log(2.0)
    assert out.valid_matrix[i, i] == pytest.approx(best, rel=1e-4)
  report = out.report()
  assert report["average_valid_bits_per_byte"] == pytest.approx(
      out.valid_matrix[1].mean(), abs=1e-4
  )
  assert np.array(report["valid_bits_per_byte_matrix"]).shape == (2, 2)
