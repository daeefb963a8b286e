"""Streaming generation: the same tokens as `generate` (sampled and greedy, with a repetition
penalty and a stop token), left padding that changes nothing, the hybrid model, early stop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.inference.generate import Sampling, generate
from nexus_jax.inference.stream import stream_tokens
from nexus_jax.models import hybrid
from nexus_jax.models.lm import LanguageModel

V = 12


@pytest.fixture(scope="module")
def lm():
  model = LanguageModel.from_preset("tiny", vocab_size=V, embed_dim=16, mlp_dim=32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


SAMPLED = Sampling(temperature=1.3, top_p=0.9, repetition_penalty=1.2)


@pytest.mark.parametrize(
    "sampling", [Sampling(temperature=0.0), SAMPLED], ids=["greedy", "sampled"]
)
def test_stream_yields_exactly_what_generate_returns(lm, sampling):
  model, params = lm
  prompt, rng = [1, 2, 3, 4, 5], jax.random.PRNGKey(7)
  out = generate(
      model, params, [prompt], max_new_tokens=9, rng=rng, sampling=sampling, cache_len=16
  )
  streamed = list(
      stream_tokens(
          model, params, prompt, max_new_tokens=9, rng=rng, sampling=sampling, cache_len=16
      )
  )
  assert streamed == out.tokens[0].tolist()


def test_stop_token_ends_the_stream_like_generate(lm):
  model, params = lm
  rng = jax.random.PRNGKey(3)
  free = list(stream_tokens(model, params, [4, 2], max_new_tokens=12, rng=rng, sampling=SAMPLED))
  stop = free[4]
  out = generate(
      model, params, [[4, 2]], max_new_tokens=12, rng=rng, sampling=SAMPLED, stop_tokens=(stop,)
  )
  streamed = list(
      stream_tokens(
          model, params, [4, 2], max_new_tokens=12, rng=rng, sampling=SAMPLED, stop_tokens=(stop,)
      )
  )
  assert streamed == out.tokens[0, : out.lengths[0]].tolist()
  assert streamed[-1] == stop and len(streamed) <= 5


def test_left_padding_to_a_bucket_changes_no_greedy_token(lm):
  model, params = lm
  prompt = [5, 1, 7]
  exact = list(stream_tokens(model, params, prompt, max_new_tokens=8, cache_len=32))
  padded = list(
      stream_tokens(model, params, prompt, max_new_tokens=8, cache_len=32, pad_to_multiple=16)
  )
  assert padded == exact


def test_hybrid_streams_like_its_generate():
  model = hybrid.HybridLM(
      vocab_size=V, d_model=16, num_heads=2, num_blocks=1, layers_per_block=2, ssm_state_dim=4
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = jax.random.PRNGKey(2)
  out = hybrid.generate(model, params, [[1, 2, 3]], max_new_tokens=6, rng=rng, sampling=SAMPLED)
  streamed = list(
      stream_tokens(
          model, params, [1, 2, 3], max_new_tokens=6, rng=rng, sampling=SAMPLED, pad_to_multiple=8
      )
  )
  assert streamed == out.tokens[0].tolist()


def test_a_consumer_can_stop_early_and_bad_input_is_named(lm):
  model, params = lm
  it = stream_tokens(model, params, [1], max_new_tokens=100)
  assert len([next(it) for _ in range(3)]) == 3
  it.close()
  with pytest.raises(ValueError, match="empty prompt"):
    next(stream_tokens(model, params, [], max_new_tokens=2))
  with pytest.raises(ValueError, match="prompt"):
    next(stream_tokens(model, params, [V + 3], max_new_tokens=2))
  with pytest.raises(ValueError, match="exceeds the cache"):
    next(stream_tokens(model, params, [1, 2], max_new_tokens=20, cache_len=8))
  with pytest.raises(ValueError, match="needs `rng`"):
    next(stream_tokens(model, params, [1], max_new_tokens=2, sampling=SAMPLED))
