"""Generation: sampling transforms, greedy/cached == recomputed, batched prompts of different
lengths, per-sequence stop tokens, beam search (beam 1 == greedy, exhaustive == brute force on a
hand-made scorer, length penalty), encoder-decoder generation and bad-input errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from nexus_jax.inference.generate import (
    Sampling,
    StepModel,
    beam_search,
    generate,
    process_logits,
    sampling_probs,
)
from nexus_jax.models.lm import LanguageModel
from nexus_jax.models.transformer import EncoderDecoder

V = 12


@pytest.fixture(scope="module")
def lm():
  """Tiny MoE language model (GQA, RoPE, 2 layers, 4 experts) and its params."""
  model = LanguageModel.from_preset("tiny", vocab_size=V, embed_dim=16, mlp_dim=32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


PROMPTS = [[3], [1, 2, 3, 4, 5], [7, 8, 9]]  # one shape for every model-based call: one compile
N_NEW, CACHE = 5, 12


def _greedy_by_recompute(model, params, prompt, n):
  """Reference: full forward over the whole prefix at every step, argmax at the last position
  (a right-padded static buffer: causal attention makes the padding irrelevant)."""
  apply = jax.jit(lambda t: model.apply({"params": params}, t)[0])
  seq = list(prompt)
  for _ in range(n):
    buf = jnp.array([seq + [0] * (CACHE - len(seq))])
    seq.append(int(jnp.argmax(apply(buf)[0, len(seq) - 1])))
  return seq[len(prompt) :]


def test_sampling_transforms_on_a_tiny_vocabulary():
  p = np.array([0.5, 0.25, 0.15, 0.1])
  logits = jnp.log(jnp.array([p]))
  probs = lambda **kw: np.asarray(sampling_probs(logits, Sampling(**kw)))[0]
  np.testing.assert_allclose(probs(temperature=1.0), p, atol=1e-6)
  np.testing.assert_allclose(probs(temperature=2.0), np.sqrt(p) / np.sqrt(p).sum(), atol=1e-6)
  np.testing.assert_allclose(probs(temperature=0.0), [1, 0, 0, 0])
  np.testing.assert_allclose(probs(top_k=2), [2 / 3, 1 / 3, 0, 0], atol=1e-6)
  # top-p keeps the smallest set of most likely tokens whose mass reaches p.
  np.testing.assert_allclose(probs(top_p=0.7), [2 / 3, 1 / 3, 0, 0], atol=1e-6)
  np.testing.assert_allclose(probs(top_p=0.5), [1, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(probs(top_p=0.76), [*(p[:3] / p[:3].sum()), 0], atol=1e-6)
  # Repetition penalty: seen token 0 has a negative logit, so it is multiplied by the penalty.
  seen = jnp.array([[True, False, False, False]])
  got = sampling_probs(logits, Sampling(repetition_penalty=2.0), seen)[0]
  want = np.array([0.25, 0.25, 0.15, 0.1]) / 0.75
  np.testing.assert_allclose(got, want, atol=1e-6)
  pos = jnp.array([[2.0, 1.0, 0.0]])
  assert (
      process_logits(pos, Sampling(repetition_penalty=2.0), jnp.array([[1, 0, 0]], bool))[0, 0]
      == 1.0
  )


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-5, 5).map(lambda v: round(v, 3)), min_size=6, max_size=6),
    st.integers(0, 6),
    st.floats(0.05, 1.0),
    st.floats(0.2, 3.0),
)
def test_filtering_keeps_the_most_likely_tokens(logits, top_k, top_p, temperature):
  """Properties: a distribution; kept tokens outrank excluded ones; at most top_k kept; the
  kept set reaches top_p of the tempered mass, and drops a token only when the more likely
  ones already reach it."""
  x = jnp.array([logits], jnp.float32)
  probs = np.asarray(sampling_probs(x, Sampling(temperature, top_k, top_p)))[0]
  kept = probs > 0
  values = np.asarray(x[0])  # logits rounded to 1e-3: XLA flushes subnormal floats to zero
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
  # At most top_k kept, unless ties at the k-th largest value make the cut ambiguous.
  ties_at_cut = np.sum(values >= np.sort(values)[-top_k]) if top_k else len(values)
  assert kept.any() and (top_k == 0 or kept.sum() <= max(top_k, ties_at_cut))
  if (~kept).any():
    assert np.min(values[kept]) >= np.max(values[~kept])
  base = np.asarray(jax.nn.softmax(x[0] / temperature))
  if top_k == 0:
    assert base[kept].sum() >= top_p - 1e-5
    order = np.argsort(-base)
    n = kept.sum()
    assert n == 1 or base[order[: n - 1]].sum() < top_p + 1e-5


def test_sampled_frequencies_follow_the_processed_distribution():
  """Empirical frequencies of `generate`'s sampler (vmapped over keys) match temperature +
  top-k + top-p probabilities; excluded tokens never appear."""
  from nexus_jax.inference.generate import sample

  logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
  sampling = Sampling(temperature=0.7, top_k=4, top_p=0.9)
  want = np.asarray(sampling_probs(logits, sampling))[0]
  keys = jax.random.split(jax.random.PRNGKey(0), 8000)
  draws = np.asarray(jax.vmap(lambda k: sample(k, logits, sampling)[0])(keys))
  counts = np.bincount(draws, minlength=5)
  keep = want > 0
  assert counts[~keep].sum() == 0 and keep.sum() == 3
  kept = want[keep].astype(np.float64)
  expected = kept / kept.sum() * len(draws)
  assert stats.chisquare(counts[keep], expected).pvalue > 1e-3


def test_greedy_batched_prompts_of_different_lengths_equal_recomputing_the_prefix(lm):
  """Greedy is deterministic; with left padding, the cache mask (through the MoE layers) and
  per-row RoPE positions, each row equals decoding its prompt alone without a cache."""
  model, params = lm
  a = generate(model, params, PROMPTS, max_new_tokens=N_NEW, cache_len=CACHE)
  b = generate(model, params, PROMPTS, max_new_tokens=N_NEW, cache_len=CACHE)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.lengths == N_NEW).all()
  for row, prompt in zip(a.tokens, PROMPTS):
    assert list(row) == _greedy_by_recompute(model, params, prompt, N_NEW)


def test_stop_tokens_stop_each_sequence_separately(lm):
  model, params = lm
  free = generate(model, params, PROMPTS, max_new_tokens=N_NEW, cache_len=CACHE).tokens
  stop = int(free[1, 1])
  out = generate(
      model, params, PROMPTS, max_new_tokens=N_NEW, cache_len=CACHE, stop_tokens=(stop,), pad_id=11
  )
  for row, free_row, length in zip(out.tokens, free, out.lengths):
    hits = np.flatnonzero(free_row == stop)
    want = hits[0] + 1 if hits.size else N_NEW
    assert length == want
    np.testing.assert_array_equal(row[:want], free_row[:want])
    assert (row[want:] == 11).all()
  assert out.lengths[1] <= 2


def test_sampling_is_seeded_and_differs_from_greedy(lm):
  model, params = lm
  s = Sampling(temperature=1.5, top_k=8, top_p=0.95, repetition_penalty=1.2)
  run = lambda seed: generate(
      model,
      params,
      PROMPTS,
      max_new_tokens=N_NEW,
      cache_len=CACHE,
      rng=jax.random.PRNGKey(seed),
      sampling=s,
  ).tokens
  one, two, other = run(3), run(3), run(4)
  np.testing.assert_array_equal(one, two)
  assert not np.array_equal(one, other)
  greedy = generate(model, params, PROMPTS, max_new_tokens=N_NEW, cache_len=CACHE).tokens
  assert not (np.array_equal(one, greedy) and np.array_equal(other, greedy))


def test_beam_width_one_equals_greedy(lm):
  model, params = lm
  greedy = generate(model, params, PROMPTS, max_new_tokens=N_NEW, cache_len=CACHE)
  beam = beam_search(model, params, PROMPTS, beam_width=1, max_new_tokens=N_NEW, cache_len=CACHE)
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)


def markov(num_tokens: int) -> StepModel:
  """Hand-made scorer: logits of the next token depend only on the previous one (params[prev])."""
  return StepModel(
      vocab_size=num_tokens,
      cache_len=64,
      init=lambda params, b, source=None: {},
      apply=lambda params, state, tokens, pos, mask, first: (params[tokens], state),
      reorder=lambda s, i: s,
      rewind=lambda s, i: s,
  )


def _brute_force(table, n, stop, alpha):
  """All hypotheses from prompt [0]: (tokens up to and including a stop, score); best first."""
  hyps = {}
  for seq in itertools.product(range(table.shape[0]), repeat=n):
    cut = next((i + 1 for i, t in enumerate(seq) if t == stop), n)
    seq = seq[:cut]
    score = sum(table[a, b] for a, b in zip((0,) + seq[:-1], seq))
    hyps[seq] = score / len(seq) ** alpha
  return sorted(hyps.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_exhaustive_beam_search_equals_brute_force(alpha):
  table = np.asarray(jax.nn.log_softmax(2 * jax.random.normal(jax.random.PRNGKey(1), (4, 4))))
  out = beam_search(
      markov(4),
      jnp.asarray(table),
      [[0]],
      beam_width=64,
      max_new_tokens=3,
      length_penalty=alpha,
      stop_tokens=(3,),
      pad_id=0,
  )
  want = _brute_force(table, 3, 3, alpha)
  for rank in range(5):
    seq, score = want[rank]
    assert tuple(out.tokens[0, rank, : out.lengths[0, rank]]) == seq
    np.testing.assert_allclose(out.normalized_scores[0, rank], score, rtol=1e-5)


def test_beam_search_escapes_the_greedy_trap_and_length_penalty_prefers_longer():
  p = np.full((4, 4), 1e-9)
  p[0] = [1e-9, 0.5, 0.4, 0.1]  # greedy takes 1 ...
  p[1] = [0.25, 0.25, 0.25, 0.25]  # ... where nothing is likely;
  p[2] = [0.05, 0.03, 0.02, 0.9]  # 2 then stop (3) is the best pair: 0.36 > 0.125
  table = jnp.log(jnp.asarray(p))
  greedy = generate(markov(4), table, [[0]], max_new_tokens=2, stop_tokens=(3,))
  beam = beam_search(markov(4), table, [[0]], beam_width=2, max_new_tokens=2, stop_tokens=(3,))
  assert greedy.tokens[0, 0] == 1 and list(beam.tokens[0, 0]) == [2, 3]
  q = np.full((4, 4), 1e-9)
  q[0] = [1e-9, 0.4, 1e-9, 0.6]  # stop at once (-0.51) or go on
  q[1] = [1e-9, 0.95, 1e-9, 0.05]  # 1, 1, 1: -1.02 in total, -0.34 per token
  short = beam_search(
      markov(4),
      jnp.log(jnp.asarray(q)),
      [[0]],
      beam_width=3,
      max_new_tokens=3,
      stop_tokens=(3,),
      length_penalty=0.0,
  )
  long = beam_search(
      markov(4),
      jnp.log(jnp.asarray(q)),
      [[0]],
      beam_width=3,
      max_new_tokens=3,
      stop_tokens=(3,),
      length_penalty=1.0,
  )
  assert list(short.tokens[0, 0]) == [3, 0, 0] and short.lengths[0, 0] == 1
  assert list(long.tokens[0, 0]) == [1, 1, 1]


def test_encoder_decoder_greedy_generation_matches_recompute():
  model = EncoderDecoder(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32, vocab_size=V)
  src = jnp.array([[3, 4, 5, 6], [7, 8, 0, 0]])
  src_mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), src, src[:, :2])["params"]
  out = generate(model, params, [[1], [1]], max_new_tokens=4, source=src, source_mask=src_mask)
  full = jax.jit(lambda s, t, m: model.apply({"params": params}, s, t, source_mask=m)[0])
  for b in range(2):
    seq = [1]
    for _ in range(4):
      buf = jnp.array([seq + [0] * (5 - len(seq))])  # causal decoder: right padding is inert
      seq.append(int(jnp.argmax(full(src[b : b + 1], buf, src_mask[b : b + 1])[0, len(seq) - 1])))
    assert list(out.tokens[b]) == seq[1:]
  with pytest.raises(ValueError, match="pass `source=`"):
    generate(model, params, [[1]], max_new_tokens=2)


def test_bad_inputs_get_clear_errors(lm):
  model, params = lm
  with pytest.raises(ValueError, match="exceeds the cache length 6"):
    generate(model, params, [[1, 2, 3, 4, 5]], max_new_tokens=2, cache_len=6)
  with pytest.raises(ValueError, match="empty prompt at row 1"):
    generate(model, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 12\)"):
    generate(model, params, [[1, 12]], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 12\)"):
    generate(model, params, [[-1, 2]], max_new_tokens=2)
  for top_p in (0.0, 1.5, -0.2):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
      Sampling(top_p=top_p)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    Sampling(temperature=-1.0)
  with pytest.raises(ValueError, match="beam_width must be >= 1"):
    beam_search(model, params, [[1]], beam_width=0, max_new_tokens=2)
  # beam search shares the prompt checks
  with pytest.raises(ValueError, match="exceeds the cache length 6"):
    beam_search(model, params, [[1, 2, 3, 4, 5]], beam_width=2, max_new_tokens=2, cache_len=6)
  with pytest.raises(ValueError, match="empty prompt at row 0"):
    beam_search(model, params, [[]], beam_width=2, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 12\)"):
    beam_search(model, params, [[3, 12]], beam_width=2, max_new_tokens=2)
  with pytest.raises(ValueError, match="needs `rng`"):
    generate(model, params, [[1]], max_new_tokens=2, sampling=Sampling(temperature=1.0))
  with pytest.raises(ValueError, match="stop_tokens / pad_id"):
    generate(model, params, [[1]], max_new_tokens=2, stop_tokens=(40,))
  with pytest.raises(ValueError, match="list of token-id sequences"):
    generate(model, params, [1, 2, 3], max_new_tokens=2)


def test_capacity_factor_moe_decodes_each_prompt_as_alone():
  """With `moe_capacity_factor` set, a batch's padding and other prompts could take a row's
  expert slots; decoding is dropless, so every row generates exactly its tokens alone."""
  model = LanguageModel.from_preset(
      "tiny", vocab_size=32, embed_dim=32, mlp_dim=32, moe_capacity_factor=1.0
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 32, n).tolist() for n in (3, 11)]
  batch = generate(model, params, prompts, max_new_tokens=8, cache_len=24)
  for i, p in enumerate(prompts):
    alone = generate(model, params, [p], max_new_tokens=8, cache_len=24)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
