"""End to end: the byte-level LM experiment on a tiny slice of the stdlib, plus the corpus split."""

import importlib.util
import json
import lzma
import pathlib

import numpy as np

from nexus_jax.data.datasets.byte_lm import xz_bits_per_byte
from experiments.run import run_experiment
from nexus_jax.data.datasets import text

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config():
  spec = importlib.util.spec_from_file_location("lm_config", ROOT / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
  assert (tmp_path / "lm_curves.png").stat().st_size > 1000
