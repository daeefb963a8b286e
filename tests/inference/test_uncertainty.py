"""Uncertainty: generate's per-token scores == a separate forward pass through the processed
distribution, sequence aggregates and abstain flags, conformal thresholds == brute force,
temperature scaling recovers a known T, ECE / AUROC / risk-coverage on hand examples, semantic
entropy on hand clusters and bad-input errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nexus_jax.inference import uncertainty as U
from nexus_jax.inference.generate import GenerateOutput, Sampling, generate, process_logits
from nexus_jax.models.lm import LanguageModel

V = 12
PROMPTS = [[3], [1, 2, 3, 4, 5], [7, 8, 9]]
N_NEW, CACHE = 6, 12


@pytest.fixture(scope="module")
def lm():
  model = LanguageModel.from_preset("tiny", vocab_size=V, embed_dim=16, mlp_dim=32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


_apply = jax.jit(lambda model, params, t: model.apply({"params": params}, t)[0], static_argnums=0)
_process = jax.jit(process_logits, static_argnums=1)


def _reference_stats(model, params, prompt, generated, sampling):
  """Full forward over prompt + generated, then the processed distribution at each step, in
  numpy: (logprob, entropy, margin, max_prob) per generated token."""
  seq = list(prompt) + list(generated)
  buf = jnp.array([seq + [0] * (CACHE - len(seq))])  # right padding: causal, so irrelevant
  logits = np.asarray(_apply(model, params, buf))[0]
  n = len(generated)
  seen = np.zeros((n, V), bool)
  for t in range(n):
    seen[t, seq[: len(prompt) + t]] = True
  xs = np.asarray(_process(logits[len(prompt) - 1 : len(seq) - 1], sampling, seen))
  rows = []
  for t, tok in enumerate(generated):
    x = xs[t].astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    top = np.sort(p)[::-1]
    nz = p[p > 0]
    rows.append((math.log(p[tok]), -(nz * np.log(nz)).sum(), top[0] - top[1], top[0]))
  return np.array(rows).reshape(-1, 4)


def test_generate_scores_equal_a_separate_forward_pass(lm):
  model, params = lm
  sampling = Sampling(temperature=0.8, top_k=7, top_p=0.9, repetition_penalty=1.3)
  kw = dict(max_new_tokens=N_NEW, cache_len=CACHE, rng=jax.random.PRNGKey(3), sampling=sampling)
  kw["stop_tokens"] = (5,)
  plain = generate(model, params, PROMPTS, **kw)
  out = generate(model, params, PROMPTS, **kw, return_uncertainty=True)
  assert isinstance(plain, GenerateOutput) and isinstance(out, U.UncertainOutput)
  np.testing.assert_array_equal(out.tokens, plain.tokens)  # scoring does not change the draw
  np.testing.assert_array_equal(out.lengths, plain.lengths)
  u = out.uncertainty
  for i, prompt in enumerate(PROMPTS):
    n = int(out.lengths[i])
    assert u.mask[i].sum() == n and not u.mask[i, n:].any()
    ref = _reference_stats(model, params, prompt, out.tokens[i, :n].tolist(), sampling)
    got = np.stack([u.logprob[i, :n], u.entropy[i, :n], u.margin[i, :n], u.max_prob[i, :n]], -1)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert np.all(u.logprob[i, n:] == 0)
  seq = out.sequence
  m = u.mask
  np.testing.assert_allclose(seq.mean_nll, -(u.logprob * m).sum(-1) / m.sum(-1), rtol=1e-6)
  np.testing.assert_allclose(seq.max_entropy, np.where(m, u.entropy, -1).max(-1), rtol=1e-6)
  np.testing.assert_array_equal(seq.length, out.lengths)


def test_greedy_scores_use_temperature_one_or_score_temperature_and_abstain_flags(lm):
  model, params = lm
  kw = dict(max_new_tokens=N_NEW, cache_len=CACHE)
  out = generate(model, params, PROMPTS, **kw, return_uncertainty=True)
  plain = generate(model, params, PROMPTS, **kw)
  np.testing.assert_array_equal(out.tokens, plain.tokens)
  u = out.uncertainty
  # the greedy token is the argmax: its log-probability is log max_prob.
  np.testing.assert_allclose(u.logprob, np.where(u.mask, np.log(u.max_prob), 0), atol=1e-5)
  ref = _reference_stats(model, params, PROMPTS[1], out.tokens[1].tolist(), Sampling(1.0))
  np.testing.assert_allclose(u.entropy[1], ref[:, 1], atol=2e-4)
  hot = generate(model, params, PROMPTS, **kw, return_uncertainty=True, score_temperature=2.0)
  np.testing.assert_array_equal(hot.tokens, out.tokens)
  assert np.all(hot.uncertainty.entropy > u.entropy)  # flatter distribution
  thr = float(np.median(u.max_prob[u.mask]))
  abst = U.ConformalAbstainer(threshold=thr)
  flagged = generate(model, params, PROMPTS, **kw, abstain=abst)
  want = u.mask & (u.max_prob < thr)
  np.testing.assert_array_equal(flagged.abstain, want)
  np.testing.assert_array_equal(flagged.abstain_sequence, want.any(-1))
  np.testing.assert_array_equal(flagged.sequence.min_max_prob < thr, want.any(-1))


def _brute_threshold(scores, errors, alpha, risk):
  best = (math.inf, 1.0 if risk == "selective" else 1 / (len(scores) + 1), 0.0)
  for t in sorted(set(scores.tolist()) | {math.inf}, reverse=True):
    answered = [i for i in range(len(scores)) if scores[i] >= t]
    err = sum(bool(errors[i]) for i in answered)
    bound = (err + 1) / ((len(answered) + 1) if risk == "selective" else (len(scores) + 1))
    if bound <= alpha:
      best = (t, bound, len(answered) / len(scores))
  return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("risk", ["selective", "joint"])
def test_conformal_threshold_equals_brute_force(seed, risk):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 60))
  scores = np.round(rng.random(n), 1)  # many ties
  errors = rng.random(n) > scores + rng.normal(0, 0.2, n)  # confident items err less
  for alpha in (0.05, 0.2, 0.5):
    got = U.conformal_threshold(scores, errors, alpha, risk)
    np.testing.assert_allclose(got, _brute_threshold(scores, errors, alpha, risk))
  ab = U.calibrate_abstainer(scores, errors, 0.3, risk=risk)
  assert ab.threshold == U.conformal_threshold(scores, errors, 0.3, risk)[0]
  np.testing.assert_array_equal(ab.answers(scores), scores >= ab.threshold)


@pytest.mark.slow
def test_joint_conformal_risk_is_controlled_over_random_splits():
  rng = np.random.default_rng(0)
  alpha, losses = 0.1, []
  for _ in range(2000):
    s = rng.random(101)
    e = rng.random(101) > s
    t, _, _ = U.conformal_threshold(s[:100], e[:100], alpha, "joint")
    losses.append(e[100] and s[100] >= t)
  assert np.mean(losses) <= alpha + 0.02


def test_fit_temperature_recovers_a_known_temperature():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 2.0, (20000, 10)).astype(np.float32)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  labels = (p.cumsum(-1) > rng.random((20000, 1))).argmax(-1)  # calibrated by construction
  assert abs(U.fit_temperature(z, labels) - 1.0) < 0.05
  t = U.fit_temperature(2 * z, labels)
  assert abs(t - 2.0) < 0.1
  assert U.nll_at_temperature(2 * z, labels, t) < U.nll_at_temperature(2 * z, labels, 1.0)
  conf, correct = U.top1_confidence(2 * z, labels, temperature=t)
  assert U.expected_calibration_error(conf, correct) < 0.02
  raw = U.expected_calibration_error(*U.top1_confidence(2 * z, labels))
  assert raw > 0.1  # the over-confident logits are badly calibrated before scaling
  masked = U.fit_temperature(2 * z[:, None], labels[:, None], mask=np.ones((20000, 1), bool))
  assert abs(masked - t) < 1e-3


def test_ece_on_a_hand_example():
  conf = [0.95, 0.95, 0.55, 0.55, 0.25]
  correct = [1, 0, 1, 1, 0]
  # bins (14/15, 1]: acc .5 conf .95; (8/15, 9/15]: acc 1 conf .55; (3/15, 4/15]: acc 0 conf .25
  want = 2 / 5 * 0.45 + 2 / 5 * 0.45 + 1 / 5 * 0.25
  assert U.expected_calibration_error(conf, correct) == pytest.approx(want)
  bins = U.calibration_bins(conf, correct)
  assert bins["count"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 2]
  assert U.calibration_bins([1 / 15, 0.0, 1.0], [1, 1, 1])["count"][[0, 14]].tolist() == [2, 1]
  assert U.expected_calibration_error(conf, correct, 1) == pytest.approx(abs(0.6 - 0.65))


def test_auroc_risk_coverage_and_accuracy_at_coverage():
  rng = np.random.default_rng(1)
  s, y = np.round(rng.random(200), 1), rng.random(200) < 0.4
  assert U.auroc(s, y) == pytest.approx(roc_auc_score(y, s))
  s = np.array([0.9, 0.8, 0.7, 0.6])
  c = np.array([True, True, False, True])
  cov, risk, aurc = U.risk_coverage_curve(s, c)
  np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 4])
  assert aurc == pytest.approx(0.25 * (1 / 3 + 1 / 4))
  assert U.accuracy_at_coverage(s, c, 0.5) == 1.0
  assert U.accuracy_at_coverage(s, c, 1.0) == 0.75


def test_semantic_entropy_on_hand_clusters():
  answers = ["Paris", "paris ", "Lyon", "PARIS"]
  assert U.semantic_clusters(answers).tolist() == [0, 0, 1, 0]
  want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert U.semantic_entropy(answers) == pytest.approx(want)
  lp = np.log([0.1, 0.1, 0.6, 0.2])  # p(Paris cluster) = 0.4, p(Lyon) = 0.6
  assert U.semantic_entropy(answers, lp) == pytest.approx(
      -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
  )
  assert U.semantic_entropy(["a", "A", " a"]) == 0.0
  code = ["x = 1", "x=1  # one", "x = 2", "def f(:", "def f(:"]
  assert U.semantic_clusters(code, U.python_ast_equal).tolist() == [0, 0, 1, 2, 2]
  assert U.python_ast_equal("a+b", "(a + b)") and not U.python_ast_equal("a+b", "b+a")
  assert U.semantic_entropy(code[:2], equivalent=U.python_ast_equal) == 0.0


def test_bad_inputs_raise_clear_errors(lm):
  s, e = np.array([0.9, 0.2]), np.array([False, True])
  for alpha in (0, 1, 1.5, -0.1):
    with pytest.raises(ValueError, match="alpha"):
      U.conformal_threshold(s, e, alpha)
  with pytest.raises(ValueError, match="scores is empty"):
    U.conformal_threshold([], [], 0.1)
  with pytest.raises(ValueError, match="scores and errors"):
    U.calibrate_abstainer(s, e[:1], 0.1)
  with pytest.raises(ValueError, match="risk"):
    U.conformal_threshold(s, e, 0.1, risk="marginal")
  with pytest.raises(ValueError, match="num_bins"):
    U.expected_calibration_error([0.5], [1], num_bins=0)
  with pytest.raises(ValueError, match="confidence must lie"):
    U.expected_calibration_error([1.5], [1])
  with pytest.raises(ValueError, match="labels"):
    U.fit_temperature(np.zeros((4, 3)), np.zeros(5, int))
  with pytest.raises(ValueError, match="mask"):
    U.fit_temperature(np.zeros((4, 3)), np.zeros(4, int), mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="bounds"):
    U.fit_temperature(np.zeros((4, 3)), np.zeros(4, int), bounds=(2.0, 1.0))
  with pytest.raises(ValueError, match="positive needs both"):
    U.auroc([0.1, 0.2], [True, True])
  with pytest.raises(ValueError, match="score must be one of"):
    U.ConformalAbstainer(0.5, score="confidence")
  with pytest.raises(ValueError, match="samples is empty"):
    U.semantic_entropy([])
  with pytest.raises(ValueError, match="logprobs"):
    U.semantic_entropy(["a", "b"], [0.0])
  model, params = lm
  with pytest.raises(ValueError, match="score_temperature"):
    generate(model, params, PROMPTS, max_new_tokens=2, return_uncertainty=True, score_temperature=0)
  with pytest.raises(ValueError, match="abstain must be"):
    generate(model, params, PROMPTS, max_new_tokens=2, abstain=0.5)


def test_an_equivalence_that_raises_or_returns_no_bool_is_named():
  def broken(a, b):
    raise KeyError("boom")

  with pytest.raises(ValueError, match="equivalent=broken raised KeyError"):
    U.semantic_entropy(["a", "b"], equivalent=broken)
  with pytest.raises(ValueError, match="must return a bool"):
    U.semantic_entropy(["a", "b"], equivalent=lambda a, b: "yes")
