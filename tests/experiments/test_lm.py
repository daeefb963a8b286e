"""End to end: the LM experiment (byte-level and BPE) on tiny corpora, the corpus split, and the
bits/byte accounting that keeps byte-level and BPE models comparable."""

import importlib.util
import json
import lzma
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.run import run_experiment
from nexus_jax.data.datasets import text
from nexus_jax.data.datasets.byte_lm import load_lm_data, workdir_tokenizer, xz_bits_per_byte
from nexus_jax.data.tokenizer import TokenizerError, load_tokenizer
from nexus_jax.models.lm import lm_from_config
from nexus_jax.models.saving import load_model
from nexus_jax.models.seq_objectives import lm_objective
from nexus_jax.train.loop import Trainer
from nexus_jax.testing import stdlib_text_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config():
  spec = importlib.util.spec_from_file_location("lm_config", ROOT / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tiny(c, folder, **data):
  c.data.update(root=str(folder), valid_fraction=0.2, test_fraction=0.2, valid_bytes=2048, **data)
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=32)
  c.train.update(
      batch_size=8,
      num_steps=10,
      eval_every_steps=5,
      log_every_steps=5,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 2
  c.sample.num_bytes = 24
  return c


def test_stdlib_split_is_deterministic_file_level_and_disjoint(tmp_path):
  for name in ("a.py", "b.py", "sub/c.py", "sub/d.txt", "site-packages/e.py"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(f"# {name}\n")
  files = [f.as_posix() for f in text.list_files(tmp_path)]
  assert files == ["a.py", "b.py", "sub/c.py"]  # pattern *.py, site-packages excluded
  # A file's split depends only on its own path.
  assert all(text.split_of(f, 0.3, 0.3) == text.split_of(f, 0.3, 0.3) for f in files)
  splits, listed = text.load_text_splits(text.stdlib_dir(), valid_fraction=0.05, test_fraction=0.05)
  again, listed_again = text.load_text_splits(None)
  assert listed == listed_again and all(np.array_equal(splits[s], again[s]) for s in splits)
  sets = [set(listed[s]) for s in text.SPLITS]
  assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
  assert len(sets[0]) > 10 * len(sets[2]) > 0
  w = text.windows(splits["test"][:1000], 11)
  np.testing.assert_array_equal(w[1, 0], w[0, -1])  # stride length - 1: each target once


def test_xz_matches_lzma():
  data = b"def f(x):\n    return x + 1\n" * 50
  assert xz_bits_per_byte(data) == 8 * len(
      lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
  ) / len(data)
  # presets: tests/train/test_presets.py (one mechanism for every config file)


def test_lm_experiment_end_to_end(tmp_path):
  c = _config()
  c.data.update(seq_len=32, valid_bytes=2048, test_bytes=4096)
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=32)
  c.train.update(
      batch_size=8,
      num_steps=20,
      eval_every_steps=10,
      log_every_steps=5,
      progress=False,
      tensorboard=False,
  )
  c.optim.warmup_steps = 2
  c.sample.num_bytes = 16
  results = run_experiment(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  bpb = saved["test_bits_per_byte"]
  assert set(bpb) == {"moe", "dense", "xz_9e"} and all(0 < v < 8.5 for v in bpb.values())
  assert bpb["moe"] < 8.0 and bpb["dense"] < 8.0  # better than uniform over 256 bytes
  p = saved["params"]
  assert p["moe"]["total"] > p["moe"]["active_per_byte"]
  assert abs(p["moe"]["active_per_byte"] - p["dense"]["total"]) < 0.02 * p["dense"]["total"]
  assert results["sample"].startswith("def ") and 4000 < saved["corpus"]["test_bytes_scored"] < 4096
  unc = saved["sample_uncertainty"]  # c.sample.uncertainty (on by default)
  assert unc["tokens"] >= 1 and 0 <= unc["mean_nll_nats"] and 0 < unc["min_token_prob"] <= 1
  assert 0 <= unc["mean_entropy_nats"] <= unc["max_entropy_nats"] <= math.log(256) + 1e-4
  assert (tmp_path / "lm_curves.png").stat().st_size > 1000
  loaded = load_model(saved["model_dir"], family="lm")
  assert loaded.assets == {} and loaded.model.vocab_size == 256


def _direct_bits_per_byte(model, params, data) -> float:
  """Sum of -log p(target) over every masked target of `data.test`, all windows in one batch."""
  tokens = np.concatenate([d.arrays["tokens"] for d in data.test])
  mask = np.concatenate([d.arrays["mask"] for d in data.test])
  logits, _ = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  nats = float(np.sum(np.asarray(nll, np.float64) * mask[:, 1:]))
  return nats / (math.log(2.0) * (len(data.test_bytes) - 1))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_test_bits_per_byte_accounting(tmp_path, kind):
  folder = stdlib_text_folder(tmp_path / "corpus")
  c = _tiny(_config(), folder, tokenizer=kind, vocab_size=300 * (kind == "bpe"), seq_len=16)
  c.data.test_bytes = 1000
  data = load_lm_data(c, tmp_path / "run")
  tok = data.tokenizer
  assert (
      tok.path == tmp_path / "run" / "tokenizer.json"
      and tok.vocab_size == (300, 256)[kind == "byte"]
  )
  # Every test token after the first is a target exactly once and they spell test_bytes[1:].
  targets = np.concatenate(
      [d.arrays["tokens"][:, 1:][d.arrays["mask"][:, 1:] > 0] for d in data.test]
  )
  assert len(targets) == data.test_tokens and tok.decode(targets) == data.test_bytes[1:]
  assert len(data.test_bytes) == 1000 and len(data.test) == 2  # full windows + a tail window
  if kind == "byte":
    assert data.test_tokens == 999 and data.bytes_per_token["test"] == 1.0
  # Toy model: each token costs one nat per byte it spells -> exactly 1 / log 2 bits per byte.
  costs = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], np.float64)

  def toy(d):
    m = d.arrays["mask"][:, 1:]
    return float(np.sum(costs[d.arrays["tokens"][:, 1:]] * m) / np.sum(m))

  assert data.test_bits_per_byte(toy) == pytest.approx(1 / math.log(2.0), rel=1e-12)
  if kind == "byte":
    return
  # A real (untrained) model: the trainer's batched evaluation == a direct sum over the windows.
  model = lm_from_config(c.model).clone(vocab_size=tok.vocab_size)
  trainer = Trainer(lm_objective(model), c, tmp_path / "t", 1, data.train.train_batch(0))
  state = trainer.init(0)
  got = data.test_bits_per_byte(lambda d: trainer.evaluate(state, d)[0]["loss"])
  assert got == pytest.approx(_direct_bits_per_byte(model, state.params, data), rel=1e-5)


def test_workdir_tokenizer_refuses_a_byte_level_run_and_bad_settings(tmp_path):
  c = _config()
  (tmp_path / "moe").mkdir()
  (tmp_path / "moe" / "metrics.jsonl").write_text("{}\n")  # a run from before tokenizers
  train = np.frombuffer(b"def f(x):\n    return x\n" * 50, np.uint8)
  c.data.tokenizer = "bpe"
  with pytest.raises(TokenizerError, match="holds a run trained before tokenizers"):
    workdir_tokenizer(c.data, tmp_path, train, [tmp_path / "moe"])
  c.data.tokenizer = "byte"
  tok, seconds = workdir_tokenizer(c.data, tmp_path, train, [tmp_path / "moe"])
  assert tok.kind == "byte" and load_tokenizer(tmp_path / "tokenizer.json").kind == "byte"
  c.data.vocab_size = 4096
  with pytest.raises(
      TokenizerError, match="config.data.tokenizer='byte', config.data.vocab_size=4096: a byte"
  ):
    load_lm_data(c, tmp_path / "other")  # fails before reading the corpus
  c.data.update(tokenizer="sentencepiece", vocab_size=0)
  with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
    load_lm_data(c, tmp_path / "other")


def test_lm_experiment_bpe_end_to_end_and_resume(tmp_path):
  folder = stdlib_text_folder(tmp_path / "corpus")
  c = _tiny(_config(), folder, tokenizer="bpe", vocab_size=512, seq_len=16, test_bytes=4096)
  c.model.train_dense_baseline = False
  c.train.compute_dtype = "bfloat16"  # every experiment honours it (test_compute_dtype.py)
  work = tmp_path / "run"
  results = run_experiment(c, work)
  saved = json.loads((work / "results.json").read_text())
  tok_file = work / "tokenizer.json"
  info = saved["tokenizer"]
  assert info["kind"] == "bpe" and info["vocab_size"] == 512 and info["file"] == str(tok_file)
  assert 1.5 < info["bytes_per_token"] < 5
  assert load_tokenizer(tok_file).vocab_size == 512
  bpb = saved["test_bits_per_byte"]
  assert set(bpb) == {"moe", "xz_9e"} and 0 < bpb["moe"] < 8.0 and 0 < bpb["xz_9e"] < 8.0
  assert saved["corpus"]["test_bytes_scored"] == 4095
  assert 4095 / 5 < saved["corpus"]["test_tokens_scored"] < 4095 / 1.5
  # The embedding has one row per tokenizer token.
  assert saved["params"]["moe"]["total"] > 512 * 32
  assert results["sample"].startswith("def ") and len(results["sample"].encode()) >= 4
  # The trained model is saved with its tokenizer, for `nexus-lm generate / chat`.
  loaded = load_model(saved["model_dir"], family="lm")
  assert loaded.model.vocab_size == 512 and loaded.assets["tokenizer.json"].read_bytes() == (
      tok_file.read_bytes()
  )
  assert loaded.metadata["test_bits_per_byte"] == bpb["moe"]
  assert loaded.model.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(loaded.variables)} == {jnp.dtype("float32")}
  # Resume: the saved tokenizer is reused (not retrained) and the finished run restored.
  before = tok_file.read_bytes(), tok_file.stat().st_mtime_ns
  again = run_experiment(c, work)
  assert (tok_file.read_bytes(), tok_file.stat().st_mtime_ns) == before
  assert again["test_bits_per_byte"]["moe"] == pytest.approx(bpb["moe"], rel=1e-6)
  assert again["corpus"]["tokenizer_train_seconds"] == 0
  c.data.vocab_size = 1024
  with pytest.raises(TokenizerError, match="is a bpe tokenizer with 512 tokens but config.data"):
    run_experiment(c, work)


@pytest.mark.slow
def test_lm_experiment_with_a_ponder_head(tmp_path):
  """`--config.model.ponder_steps=2`: the expected-loss objective trains, test bits/byte are the
  halting steps', the sample decodes with per-step caches and the saved model ponders."""
  c = _config()
  c.data.update(seq_len=32, valid_bytes=2048, test_bytes=4096)
  c.model.update(
      num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=32, ponder_steps=2
  )
  c.train.update(
      batch_size=8, num_steps=20, eval_every_steps=10, log_every_steps=5, progress=False,
      tensorboard=False,
  )  # fmt: skip
  c.model.train_dense_baseline = False
  c.optim.warmup_steps = 2
  c.sample.num_bytes = 16
  results = run_experiment(c, tmp_path)
  assert 0 < results["test_bits_per_byte"]["moe"] < 8.0
  assert results["sample"].startswith("def ")
  assert load_model(results["model_dir"], family="lm").model.ponder_steps == 2


def _continual(tmp_path, name, **optim):
  c = _config()
  c.data.update(root=str(text.stdlib_dir()), seq_len=32, valid_bytes=1024, test_bytes=2048)
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=32, num_experts=2)
  c.train.update(batch_size=8, num_steps=12, eval_every_steps=12, progress=False, tensorboard=False)
  c.optim.update(warmup_steps=2, **optim)
  c.continual.update(domains="asyncio,xml", fisher_examples=16)
  c.sample.num_bytes = 8
  return run_experiment(c, tmp_path / name)


@pytest.mark.slow  # four fits on two stdlib domains: ~2 minutes on a shared 2-core CPU
def test_lm_continual_domains_ewc_changes_the_later_rows(tmp_path):
  plain = _continual(tmp_path, "finetune")["continual"]
  ewc = _continual(tmp_path, "ewc", ewc_lambda=1e4)["continual"]
  saved = json.loads((tmp_path / "ewc" / "results.json").read_text())["continual"]
  assert saved["domains"] == ["asyncio", "xml"] and saved["ewc_lambda"] == 1e4
  r0, r1 = np.array(plain["bits_per_byte_matrix"]), np.array(ewc["bits_per_byte_matrix"])
  assert r0.shape == (2, 2) and np.all((0 < r0) & (r0 < 8.5))
  # Domain 0 trains identically (no Fisher yet); domain 1 is pulled back towards domain 0's params.
  np.testing.assert_allclose(r0[0], r1[0], rtol=1e-5)
  assert np.all(np.abs(r0[1] - r1[1]) > 1e-4)
  assert saved["backward_transfer"] == pytest.approx(r1[1, 0] - r1[0, 0], abs=1e-3)
  assert (tmp_path / "ewc" / "continual" / "ewc_after_0.npz").exists()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("optim.ewc_lambda", -1.0, "config.optim.ewc_lambda"),
        ("optim.ewc_gamma", 1.5, "config.optim.ewc_gamma"),
        ("continual.domains", "asyncio", "config.continual.domains"),
        ("continual.domains", "asyncio,no_such_pkg", "config.continual.domains"),
        ("continual.replay_fraction", 1.0, "config.continual.replay_fraction"),
        ("continual.fisher_variant", "exact", "config.continual.fisher_variant"),
    ],
)
def test_lm_continual_bad_fields_raise_naming_them(tmp_path, field, value, match):
  c = _config()
  c.continual.domains = "asyncio,xml"
  c.optim.ewc_lambda = 1.0
  section, key = field.split(".")
  c[section][key] = value
  c.train.update(progress=False, tensorboard=False, num_steps=2, batch_size=2)
  c.optim.warmup_steps = 0
  with pytest.raises(ValueError, match=match):
    run_experiment(c, tmp_path)


@pytest.mark.parametrize(
    "memory", ["compressive", pytest.param("titans", marks=pytest.mark.slow)]  # ~60-80 s each
)
def test_lm_experiment_with_context_memory_end_to_end(tmp_path, memory):
  folder = stdlib_text_folder(tmp_path / "corpus")
  c = _tiny(_config(), folder, seq_len=32, test_bytes=1500)
  c.model.update(context_memory=memory, segment_len=8, memory_slots=4)
  results = run_experiment(c, tmp_path / "run")
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  bpb = saved["test_bits_per_byte"]
  assert set(bpb) == {"tcc", "xz_9e"} and 0 < bpb["tcc"] < 8.0
  cm = saved["context_memory"]
  assert cm["memory"] == memory and cm["segment_len"] == 8
  if memory == "compressive":  # 4 segments: 2 are ever evicted into 4 slots -> rate 4
    assert cm["compression_rate"] == 4
  assert results["sample"].startswith("def ") and len(results["sample"]) > 4
  assert "sample_uncertainty" not in saved


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(context_memory="ring"), "config.model"),
        (dict(context_memory="compressive", segment_len=0), "config.model.segment_len"),
        (dict(context_memory="summary", segment_len=5), "config.model.segment_len"),
        (dict(context_memory="summary", memory_slots=0), "config.model.memory_slots"),
    ],
)
def test_context_memory_bad_fields_name_them(fields, match):
  from nexus_jax.models.compressive_lm import compressive_lm_from_config

  c = _config()
  c.model.update(**fields)
  with pytest.raises(ValueError, match=match):
    compressive_lm_from_config(c.model, 256, 32)
