"""Function -> docstring seq2seq: pair extraction, chrF, and the experiment end to end (tiny),
including the saved model reproducing the test summaries."""

import importlib.util
import json
import pathlib

import pytest

from experiments.run import run_experiment
from experiments.seq2seq import chrf, encode, function_pairs, load_pairs, model_summaries
from nexus_jax.models.saving import load_model

ROOT = pathlib.Path(__file__).resolve().parents[2]

CODE = '''
@decorator
def add(a, b):
    """Add two numbers.

    More text.
    """
    # sum them
    return a + b

def nodoc(x):
    return x

class C:
    async def m(self):
        """Wait for it, please."""
        await thing()
'''


def test_function_pairs_drop_the_docstring_and_keep_the_code():
  pairs = function_pairs(CODE, 200, 5, 64)
  assert [t for _, t in pairs] == ["Add two numbers.", "Wait for it, please."]
  add_src, m_src = pairs[0][0], pairs[1][0]
  assert add_src.startswith("@decorator\ndef add(a, b):\n") and "More text" not in add_src
  assert "return a + b" in add_src and "# sum them" in add_src
  assert m_src.startswith("async def m(self):") and "await thing()" in m_src
  assert function_pairs(CODE, 12, 5, 64)[0][0] == "@decorator\nd"  # cut to source_bytes
  assert function_pairs("def (:", 100, 1, 10) == []  # unparsable files are skipped


def test_chrf():
  assert chrf(["Return the value."], ["Return the value."]) == pytest.approx(100.0)
  assert chrf(["abc"], ["xyz"]) == 0.0
  # one character off: unigram P = R = 2/3, bigram P = R = 1/2, no 3..6-grams -> mean over n
  p = (2 / 3 + 1 / 2) / 6
  assert chrf(["abd"], ["abc"]) == pytest.approx(100 * p, rel=1e-6)


def test_seq2seq_experiment_end_to_end(tmp_path):
  spec = importlib.util.spec_from_file_location("s2s_config", ROOT / "configs" / "seq2seq.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.update(
      max_files=120,
      max_eval=16,
      source_bytes=64,
      max_target_bytes=24,
      valid_fraction=0.1,
      test_fraction=0.1,
  )
  c.model.update(
      num_encoder_layers=1,
      num_decoder_layers=1,
      embed_dim=16,
      num_heads=2,
      num_kv_heads=1,
      mlp_dim=32,
  )
  c.train.update(
      batch_size=8,
      num_steps=10,
      eval_every_steps=10,
      log_every_steps=5,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 2
  results = run_experiment(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test"] == results["test"]
  for name in ("transformer", "nearest_neighbour"):
    assert 0 <= saved["test"][name]["chrf"] <= 100 and 0 <= saved["test"][name]["exact_match"] <= 1
  assert saved["pairs"]["train"] > saved["pairs"]["test"] > 0
  assert (tmp_path / "seq2seq.png").stat().st_size > 1000

  model_dir = pathlib.Path(saved["model_dir"])  # the saved model writes the same summaries
  assert model_dir == tmp_path.absolute() / "model"
  loaded = load_model(model_dir, family="encoder_decoder")
  assert loaded.metadata["test"] == saved["test"] and loaded.metadata["tokens"]["eos"] == 258
  examples = saved["examples"]
  test = encode(load_pairs(c.data)["test"][: len(examples)], 64, 24)
  hyps = model_summaries(loaded.model, loaded.variables["params"], test, c)
  assert hyps == [e["transformer"] for e in examples]
