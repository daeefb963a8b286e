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
