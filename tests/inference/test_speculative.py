"""Speculative decoding: the acceptance rule reproduces the target distribution (chi-square,
fixed seeds, vmapped), a wrong rule is detected by the same test, the full loop with tiny models
samples the target's sequence distribution, greedy verification == greedy decoding, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nexus_jax.inference.generate import Sampling, generate, sampling_probs, step_model
from nexus_jax.inference.speculative import (
    speculative_accept,
    speculative_generate,
    speculative_sample,
)
from nexus_jax.models.lm import LanguageModel

P = np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2] * 5], np.float32)
Q = np.array([[0.1, 0.4, 0.1, 0.3, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]], np.float32)


def _chisquare(observed, probs):
  probs = np.asarray(probs, np.float64)
  return stats.chisquare(observed, probs / probs.sum() * np.sum(observed)).pvalue


def _chi2_pvalue(samples, probs):
  return _chisquare(np.bincount(samples, minlength=len(probs)), probs)


def _first_two_tokens(rule, n=20000, seed=0):
  """Draft 2 tokens from Q, apply `rule`; the first two emitted tokens of each run."""

  def one(key):
    k_draft, k_rule = jax.random.split(key)
    d = jax.random.categorical(k_draft, jnp.log(Q), axis=-1)
    k, nxt = rule(k_rule, d, jnp.asarray(Q), jnp.asarray(P))
    emitted = jnp.where(jnp.arange(3) < k, jnp.concatenate([d, d[:1]]), nxt)
    return emitted[0], jnp.where(k >= 1, emitted[1], -1)  # 2nd token only when the 1st was kept

  return jax.vmap(one)(jax.random.split(jax.random.PRNGKey(seed), n))


def test_acceptance_rule_reproduces_the_target_distribution():
  first, second = (np.asarray(x) for x in _first_two_tokens(speculative_accept))
  assert _chi2_pvalue(first, P[0]) > 1e-3
  # Given the first draft token was kept, the second emitted token is distributed as P[1].
  assert _chi2_pvalue(second[second >= 0], P[1]) > 1e-3


def test_a_wrong_acceptance_rule_is_detected():
  """Power check: accepting whenever p(d) >= 0.1 (a threshold test, like the seed's top-p
  acceptance) changes the distribution, and the same chi-square test rejects it."""

  def threshold_rule(key, d, q, p):
    ok = p[jnp.arange(2), d] >= 0.1
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    return n, jax.random.categorical(key, jnp.log(p[n]))

  first, _ = _first_two_tokens(threshold_rule)
  assert _chi2_pvalue(np.asarray(first), P[0]) < 1e-6


@pytest.fixture(scope="module")
def pair():
  """Tiny dense target and a different tiny draft over 6 tokens."""
  kw = dict(
      vocab_size=6,
      num_experts=0,
      num_layers=1,
      embed_dim=16,
      num_heads=2,
      num_kv_heads=1,
      mlp_dim=32,
  )
  target, draft = LanguageModel(**kw), LanguageModel(**{**kw, "embed_dim": 8})
  x = jnp.zeros((1, 4), jnp.int32)
  return (
      target,
      jax.jit(target.init)(jax.random.PRNGKey(1), x)["params"],
      draft,
      jax.jit(draft.init)(jax.random.PRNGKey(2), x)["params"],
  )


def test_speculative_sequences_follow_the_target_distribution(pair):
  """Chi-square over all 6**3 continuations of 3 tokens (num_draft=2, so rounds accept,
  reject, resample and rewind the caches): frequencies of 12000 vmapped runs vs the target's
  exact sequence probabilities from full forward passes."""
  target, tparams, draft, dparams = pair
  sampling, prompt, n_new = Sampling(temperature=0.5), jnp.array([1, 4]), 3
  tsm, dsm = step_model(target, 8), step_model(draft, 8)
  run = jax.jit(
      jax.vmap(
          lambda key: speculative_sample(
              tsm, dsm, sampling, n_new, 2, tparams, dparams, prompt, key
          )
      )
  )
  toks, _, accepted, rounds = run(jax.random.split(jax.random.PRNGKey(0), 12000))
  codes = np.asarray(toks) @ np.array([36, 6, 1])
  seqs = jnp.array([[1, 4, *s] for s in itertools.product(range(6), repeat=3)])
  logits = jax.jit(lambda t: target.apply({"params": tparams}, t)[0])(seqs)
  probs = jax.vmap(lambda lg: sampling_probs(lg, sampling))(logits)  # [216, 5, V]
  exact = np.prod([np.asarray(probs[np.arange(216), 1 + i, seqs[:, 2 + i]]) for i in range(3)], 0)
  np.testing.assert_allclose(exact.sum(), 1.0, atol=1e-4)
  counts = np.bincount(codes, minlength=216)
  big = exact * len(codes) >= 5  # pool the rare sequences into one cell
  obs = np.append(counts[big], counts[~big].sum())
  assert _chisquare(obs, np.append(exact[big], exact[~big].sum())) > 1e-3
  rate = float(np.sum(accepted)) / float(np.sum(rounds) * 2)
  assert 0.1 < rate < 0.95, rate  # both the accept and the reject paths were exercised


def test_greedy_speculative_equals_greedy_decoding(pair):
  target, tparams, draft, dparams = pair
  spec = speculative_generate(
      target,
      tparams,
      draft,
      dparams,
      [1, 4, 2],
      max_new_tokens=7,
      num_draft=3,
      sampling=Sampling(temperature=0.0),
      cache_len=16,
  )
  plain = generate(target, tparams, [[1, 4, 2]], max_new_tokens=7, cache_len=16)
  np.testing.assert_array_equal(spec.tokens, plain.tokens[0])
  assert spec.length == 7 and 0 <= spec.accepted <= spec.proposed == 3 * spec.rounds


def test_speculative_stop_token(pair):
  target, tparams, draft, dparams = pair
  free = speculative_generate(
      target,
      tparams,
      draft,
      dparams,
      [1, 4, 2],
      max_new_tokens=7,
      num_draft=3,
      sampling=Sampling(temperature=0.0),
      cache_len=16,
  )
  stop = int(free.tokens[2])
  out = speculative_generate(
      target,
      tparams,
      draft,
      dparams,
      [1, 4, 2],
      max_new_tokens=7,
      num_draft=3,
      sampling=Sampling(temperature=0.0),
      cache_len=16,
      stop_tokens=(stop,),
      pad_id=5,
  )
  want = int(np.flatnonzero(free.tokens == stop)[0]) + 1
  assert out.length == want and (out.tokens[want:] == 5).all()
  np.testing.assert_array_equal(out.tokens[:want], free.tokens[:want])


def test_bad_inputs_get_clear_errors(pair):
  target, tparams, draft, dparams = pair
  other = LanguageModel(
      vocab_size=7, num_experts=0, num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16
  )
  with pytest.raises(ValueError, match="draft vocab_size 7 != target vocab_size 6"):
    speculative_generate(target, tparams, other, dparams, [1], max_new_tokens=3)
  with pytest.raises(ValueError, match="exceeds the cache length"):
    speculative_generate(
        target, tparams, draft, dparams, [1, 2], max_new_tokens=4, num_draft=3, cache_len=8
    )
  with pytest.raises(ValueError, match="empty prompt"):
    speculative_generate(target, tparams, draft, dparams, [], max_new_tokens=3)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\)"):
    speculative_generate(target, tparams, draft, dparams, [9], max_new_tokens=3)
  with pytest.raises(ValueError, match="repetition_penalty"):
    speculative_generate(
        target,
        tparams,
        draft,
        dparams,
        [1],
        max_new_tokens=3,
        sampling=Sampling(repetition_penalty=1.3),
        rng=jax.random.PRNGKey(0),
    )
