"""The context-compression benchmark's baselines see exactly the context they claim to.

benchmarks/context_compression.py compares a window-only `CompressiveLM` (each segment sees
itself and the previous one) with a full-attention oracle built on the same code (`oracle`: a
window-only model whose segment is half the sequence). With the same params: the oracle equals
one causal segment over the whole sequence everywhere, the window equals it on the first two
segments (where it sees everything too) and not after, and the last segment of the window model
does not depend on bytes more than `num_layers` segments back while the oracle's does.
"""

import argparse
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from nexus_jax.models.compressive_lm import CompressiveLM

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "context_compression.py"
W, SEGMENTS = 4, 6


def _bench():
  spec = importlib.util.spec_from_file_location("context_compression", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _models():
  args = argparse.Namespace(
      segment=W,
      segments=SEGMENTS,
      layers=2,
      dim=32,
      heads=4,
      kv_heads=2,
      memory=4,
      rate=4,
      compression="mean",
      recon_coef=1.0,
      summary_slots=0,
      titans_chunk=4,
      titans_max_lr=0.02,
      titans_full_bptt=False,
      variants="window,full",
  )
  return _bench().make_models(args)


@pytest.fixture(scope="module")
def setup():
  models = _models()
  window, oracle = models["window"], models["full"]
  one_segment = window.clone(segment_length=W * SEGMENTS)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, W * SEGMENTS), 0, 256)
  params = window.init(jax.random.PRNGKey(0), tokens)["params"]
  logits = lambda m, x: np.asarray(m.apply({"params": params}, x)[0])
  return window, oracle, one_segment, tokens, logits


def test_oracle_is_causal_attention_over_the_whole_sequence(setup):
  window, oracle, one_segment, tokens, logits = setup
  assert isinstance(oracle, CompressiveLM) and oracle.memory_slots == 0
  assert oracle.segment_length == W * SEGMENTS // 2
  np.testing.assert_allclose(logits(oracle, tokens), logits(one_segment, tokens), atol=2e-5)


def test_window_matches_the_oracle_only_on_the_first_two_segments(setup):
  window, oracle, _, tokens, logits = setup
  diff = np.abs(logits(window, tokens) - logits(oracle, tokens)).max(axis=(0, 2))
  assert diff[: 2 * W].max() < 2e-5  # segments 0 and 1 see every earlier byte in both models
  assert diff[2 * W :].min() > 1e-3  # from segment 2 on the window has forgotten segment 0


def test_only_the_oracle_sees_the_first_segments_from_the_last(setup):
  # Transformer-XL-style reach: layer l's previous-segment K/V were computed from layer l - 1
  # outputs that saw one more segment back, so the window's last segment reaches back
  # `num_layers` segments and no further; the oracle reaches everything.
  window, oracle, _, tokens, logits = setup
  far = W * (SEGMENTS - 1 - window.num_layers)  # segments the window cannot reach
  assert far > 0
  changed = tokens.at[:, :far].set((tokens[:, :far] + 7) % 256)
  for model, sees in ((window, False), (oracle, True)):
    last = np.abs(logits(model, tokens)[:, -W:] - logits(model, changed)[:, -W:]).max()
    assert (last > 1e-3) == sees, (model.segment_length, last)
  reach = tokens.at[:, far : far + W].set((tokens[:, far : far + W] + 7) % 256)
  assert np.abs(logits(window, tokens)[:, -W:] - logits(window, reach)[:, -W:]).max() > 1e-3


def test_cache_plot_is_written_from_a_printed_result(tmp_path):
  result = {
      "config": {"segment": W, "memory": 4},
      "cache_bytes_vs_length": {
          "window": {"24": 1000, "48": 1000},
          "full": {"24": 2000, "48": 4000},
      },
  }
  path = tmp_path / "cache.png"
  _bench().save_cache_plot(result, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir()] == ["cache.png"]  # no temporary file left
