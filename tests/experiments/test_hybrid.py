"""End to end: the hybrid LM experiment, byte-level with the JEPA auxiliary loss on a tiny slice of
the stdlib and with a BPE tokenizer on a tiny text folder."""

import importlib.util
import json
import pathlib

import pytest

from experiments.hybrid import build_model
from experiments.run import run_experiment
from nexus_jax.data.tokenizer import TokenizerError
from nexus_jax.models.saving import load_model
from nexus_jax.testing import stdlib_text_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config():
  spec = importlib.util.spec_from_file_location("hybrid_config", ROOT / "configs" / "hybrid.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_bad_model_config():  # presets: tests/train/test_presets.py
  c = _config()
  lm, model = build_model(c.model, c.jepa, 128)
  assert model is lm and lm.d_model == 128 and lm.num_blocks == 2  # tiny, no JEPA wrapper
  assert lm.vocab_size == 256 and build_model(c.model, c.jepa, 128, 1000)[0].vocab_size == 1000
  c.model.preset = "medium"
  with pytest.raises(ValueError, match="config.model.preset='medium'"):
    build_model(c.model, c.jepa, 128)
  c = _config()
  c.jepa.update(weight=0.5, horizon=128)
  with pytest.raises(ValueError, match="config.jepa.horizon"):
    build_model(c.model, c.jepa, 128)


def test_hybrid_experiment_end_to_end_with_jepa(tmp_path):
  c = _config()
  c.data.update(seq_len=32, valid_bytes=1024, test_bytes=2048)
  c.model.update(
      d_model=32, num_heads=2, num_blocks=1, layers_per_block=2, ssm_state_dim=4, ssm_chunk_size=16
  )
  c.jepa.update(weight=0.1, horizon=2)
  c.train.update(
      batch_size=4,
      num_steps=6,
      eval_every_steps=3,
      log_every_steps=3,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 2
  c.sample.num_bytes = 8
  results = run_experiment(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  bpb = saved["test_bits_per_byte"]
  assert set(bpb) == {"hybrid", "xz_9e"} and all(0 < v < 9 for v in bpb.values())
  assert bpb["hybrid"] < 8.0  # better than uniform over 256 bytes after 6 steps
  assert saved["model"]["layers"] == 2 and saved["model"]["jepa_weight"] == 0.1
  assert saved["train"]["steps_run"] == 6 and saved["train"]["final_aux_jepa"] > 0
  assert saved["params"] > 0 and 1900 < saved["corpus"]["test_bytes_scored"] < 2048
  assert results["sample"].startswith("def ") and len(results["sample"].encode()) >= 4
  assert (tmp_path / "hybrid_curves.png").stat().st_size > 1000
  # The hybrid LM itself (not the JEPA wrapper) is saved for `nexus-lm`.
  loaded = load_model(saved["model_dir"], family="hybrid")
  assert loaded.model.num_blocks == 1 and loaded.metadata["test_bits_per_byte"] == bpb["hybrid"]
  # The EMA target encoder is part of the checkpointed state (collection jepa_target).
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any("aux/jepa" in r for r in logged if r["split"] == "train")


def test_hybrid_experiment_bpe_and_a_mismatching_resume(tmp_path):
  c = _config()
  c.data.update(
      root=str(stdlib_text_folder(tmp_path / "corpus")),
      valid_fraction=0.2,
      test_fraction=0.2,
      tokenizer="bpe",
      vocab_size=400,
      seq_len=16,
      valid_bytes=1024,
      test_bytes=2048,
  )
  c.model.update(d_model=32, num_heads=2, num_blocks=1, layers_per_block=2, ssm_state_dim=4)
  c.train.update(
      batch_size=4,
      num_steps=4,
      eval_every_steps=2,
      log_every_steps=2,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 1
  c.sample.num_bytes = 12
  work = tmp_path / "run"
  results = run_experiment(c, work)
  saved = json.loads((work / "results.json").read_text())
  assert saved["tokenizer"]["kind"] == "bpe" and saved["tokenizer"]["vocab_size"] == 400
  assert saved["tokenizer"]["file"] == str(work / "tokenizer.json")
  assert saved["model"]["vocab_size"] == 400 and (work / "tokenizer.json").exists()
  assert 0 < saved["test_bits_per_byte"]["hybrid"] < 8.0
  assert saved["corpus"]["test_bytes_scored"] == 2047
  assert results["sample"].startswith("def ")
  c.data.update(tokenizer="byte", vocab_size=0)
  with pytest.raises(TokenizerError, match="is a bpe tokenizer with 400 tokens but config.data"):
    run_experiment(c, work)
