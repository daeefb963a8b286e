"""Early-exit decoding: tau = 1 equals `generate` (greedy on ragged prompts, and sampled); tau = 0
exits every token at layer 1 while every skipped layer still writes its K/V from the exited
state (equal to running the full block on it, and seen by the next token); the K/V-only skip
branch matches the no-skip reference; decode-time exits match the teacher-forced ones; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.inference import early_exit as ee
from nexus_jax.inference.generate import Sampling, generate
from nexus_jax.models import anytime, decoding
from nexus_jax.models.lm import LanguageModel

V, L = 13, 3
PROMPTS = [[3, 1, 4, 1], [5, 9]]


@pytest.fixture(scope="module")
def lm():
  model = LanguageModel(
      vocab_size=V, num_layers=L, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32,
      num_experts=0,
  )  # fmt: skip
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


def test_tau_one_equals_generate_greedy(lm):
  model, params = lm
  want = generate(model, params, PROMPTS, max_new_tokens=6, stop_tokens=(7,))
  got = ee.early_exit_generate(
      model, params, PROMPTS, max_new_tokens=6, threshold=1.0, stop_tokens=(7,)
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  valid = np.arange(6)[None] < got.lengths[:, None]
  np.testing.assert_array_equal(got.exit_layers, np.where(valid, L, 0))
  assert got.skipped_fraction == 0.0 and got.batch_skipped_fraction == 0.0


@pytest.mark.slow
def test_tau_one_equals_generate_sampled(lm):
  model, params = lm
  sampling = Sampling(temperature=0.9, top_k=6, repetition_penalty=1.3)
  kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(4), sampling=sampling)
  want = generate(model, params, PROMPTS, **kw)
  got = ee.early_exit_generate(model, params, PROMPTS, threshold=1.0, confidence="state", **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_tau_zero_exits_at_layer_one_and_matches_the_no_skip_reference(lm):
  model, params = lm
  kw = dict(max_new_tokens=5, threshold=0.0)
  fast = ee.early_exit_generate(model, params, PROMPTS, **kw)
  ref = ee.early_exit_generate(model, params, PROMPTS, skip_compute=False, **kw)
  np.testing.assert_array_equal(fast.exit_layers, np.ones((2, 5)))
  np.testing.assert_array_equal(fast.tokens, ref.tokens)
  assert fast.skipped_fraction == pytest.approx((L - 1) / L)
  assert fast.batch_skipped_fraction == pytest.approx((L - 1) / L)  # compute actually skipped
  assert ref.skipped_fraction == pytest.approx((L - 1) / L) and ref.batch_skipped_fraction == 0


def test_skipped_layers_write_their_cache_from_the_exited_state(lm):
  """One tau = 0 step on a prefilled cache: every layer's cache index advances and its new K/V
  slot equals what the full block writes from the layer-1 state (the no-skip reference); the
  next (full-depth) token's logits depend on those slots."""
  model, params = lm
  plan = ee._plan(model)
  prompt = jnp.array([[3, 1, 4]])
  cache_len = 6
  cache = decoding.init_cache(model, 1, cache_len)
  _, cache = decoding.decode_step(model, params, cache, prompt)
  mask = jnp.ones((1, cache_len), bool)
  args = (jnp.array([2]), jnp.array([3]), mask, jnp.float32(0.0), "softmax_max", jnp.array([True]))
  step = jax.jit(ee.early_exit_step, static_argnums=(0, 7, 9))
  _, fast, exits, skipped = step(plan, params, cache, *args, True)
  _, ref, _, ref_skipped = step(plan, params, cache, *args, False)
  assert int(exits[0]) == 1 and int(skipped) == L - 1 and int(ref_skipped) == 0
  kv = fast["decoder"]["layers"]["self_attention"]
  ref_kv = ref["decoder"]["layers"]["self_attention"]
  np.testing.assert_array_equal(kv["cache_index"], np.full((L, 1), 4))
  for name in ("cached_key", "cached_value"):
    np.testing.assert_allclose(kv[name], ref_kv[name], rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(np.asarray(kv[name][:, 0, 3])).sum(-1).sum(-1) > 0)  # every layer
  # The next token (full depth) attends to the propagated slot 3 of every layer.
  nxt = jax.jit(lambda c: decoding.decode_step(model, params, c, jnp.array([[5]]))[0])
  erased = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[-1, :, 3].set(0) if p[-1].key in ("cached_key", "cached_value") else x,
      fast,
  )
  np.testing.assert_allclose(nxt(fast), nxt(ref), rtol=1e-5, atol=1e-5)
  assert not np.allclose(nxt(fast), nxt(erased), atol=1e-4)


def test_decode_exits_match_teacher_forced(lm):
  """Batch 1: the first generated token's exit layer is the teacher-forced exit at the last
  prompt position (its context is the full-depth prefill either way)."""
  model, params = lm
  prompt = jnp.array([[3, 1, 4, 1, 5]])
  states = anytime.layer_states(model, {"params": params}, prompt)
  logits = anytime.layer_logits(model, params, states[1:])
  conf = ee.confidence_scores("softmax_max", logits[:, 0, -1], None, None)
  tau = float(np.sort(np.asarray(conf[:-1]))[0]) + 1e-7  # between the layers' confidences
  tf = ee.exit_layers_teacher_forced(logits, states, tau, "softmax_max")
  out = ee.early_exit_generate(model, params, prompt, max_new_tokens=1, threshold=tau)
  assert int(out.exit_layers[0, 0]) == int(tf[0, -1])
  assert np.all(np.asarray(ee.exit_layers_teacher_forced(logits, states, 1.0, "state")) == L)
  assert np.all(np.asarray(ee.exit_layers_teacher_forced(logits, states, 0.0, "softmax_diff")) == 1)


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan"), "0.5"])
def test_bad_threshold_raises(lm, tau):
  model, params = lm
  with pytest.raises(ValueError, match="threshold"):
    ee.early_exit_generate(model, params, PROMPTS, max_new_tokens=2, threshold=tau)


def test_bad_confidence_and_model_raise(lm):
  model, params = lm
  with pytest.raises(ValueError, match="confidence='entropy'"):
    ee.early_exit_generate(
        model, params, PROMPTS, max_new_tokens=2, threshold=0.5, confidence="entropy"
    )
  learned = model.clone(position_embedding="learned", max_len=16)
  with pytest.raises(ValueError, match="position_embedding"):
    ee.early_exit_generate(learned, params, PROMPTS, max_new_tokens=2, threshold=0.5)
