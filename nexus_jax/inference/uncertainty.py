"""Uncertainty for generation: token scores, temperature scaling, ECE, conformal abstention and
semantic entropy.

    out = generate(model, params, prompts, max_new_tokens=16, return_uncertainty=True)
    out.uncertainty.logprob / .entropy / .margin / .max_prob   # [B, N], 0 where .mask is False
    out.sequence.mean_nll, out.sequence.max_entropy              # [B]

    t = fit_temperature(valid_logits_NV, valid_labels_N)         # Guo et al. 2017
    conf, correct = top1_confidence(test_logits_NV, test_labels_N, temperature=t)
    expected_calibration_error(conf, correct)                    # 15 equal-width bins
    abstainer = calibrate_abstainer(conf_valid, ~correct_valid, alpha=0.2)
    out = generate(..., score_temperature=t, abstain=abstainer)  # out.abstain [B, N]

- Token scores are those of the distribution `generate` draws from: `process_logits` (repetition
  penalty, temperature, top-k, top-p) of the step's logits; with greedy decoding (a point mass)
  they are those of the same transforms at temperature 1, or at `score_temperature`.
- `fit_temperature` minimises the mean NLL over a scalar T by golden-section search on log T in
  `bounds` (the NLL is convex in 1/T, hence unimodal in log T).
- ECE: confidences in 15 equal-width bins [0, 1/15], (1/15, 2/15], ..., (14/15, 1]; the sum over
  bins of (bin size / n) * |accuracy - mean confidence|.
- Conformal abstention (answer iff score >= threshold): `risk="selective"` picks the smallest
  calibration score t with (errors among answered + 1) / (answered + 1) <= alpha, a plug-in bound
  on the error among answered items (Yadkori et al. 2024 style; not an exact finite-sample
  guarantee, since the answered set depends on t); `risk="joint"` is conformal risk control
  (Angelopoulos et al. 2022) of the loss 1[answered and wrong]: the smallest t with
  (errors among answered + 1) / (n + 1) <= alpha over all n calibration items, which guarantees
  P(answered and wrong) <= alpha for an exchangeable test item.
- Semantic entropy (Kuhn et al. 2023; Farquhar et al. 2024): samples are clustered by a pluggable
  equivalence (each joins the first cluster whose first member it matches) and the entropy of the
  cluster distribution is returned: cluster frequencies, or normalised sequence probabilities
  when `logprobs` are given.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import textwrap
import unicodedata
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOKEN_SCORES = ("max_prob", "margin", "logprob", "neg_entropy")


# --- Per-token scores of a processed distribution ----------------------------------------------


def token_stats(logits_BV, token_B):
  """Processed logits `[B, V]` (-inf = excluded) and the chosen tokens `[B]` ->
  dict of `[B]` float32: logprob (of the token), entropy (nats), margin (p1 - p2), max_prob."""
  logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), -1)
  p = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), -1)
  if p.shape[-1] >= 2:
    top2 = jax.lax.top_k(p, 2)[0]
    margin, max_prob = top2[:, 0] - top2[:, 1], top2[:, 0]
  else:
    margin = max_prob = p[:, 0]
  logprob = jnp.take_along_axis(logp, token_B[:, None].astype(jnp.int32), -1)[:, 0]
  return {"logprob": logprob, "entropy": entropy, "margin": margin, "max_prob": max_prob}


class SequenceUncertainty(NamedTuple):
  mean_nll: np.ndarray  # [B] mean -log p over the generated tokens (nats)
  sum_logprob: np.ndarray  # [B] total log p of the generated tokens
  max_entropy: np.ndarray  # [B] largest token entropy
  mean_entropy: np.ndarray  # [B]
  min_max_prob: np.ndarray  # [B] smallest token confidence (a sequence abstains below it)
  length: np.ndarray  # [B] generated tokens


class TokenUncertainty(NamedTuple):
  logprob: np.ndarray  # [B, N] log p of the generated token; 0 where mask is False
  entropy: np.ndarray  # [B, N] nats
  margin: np.ndarray  # [B, N] p(top-1) - p(top-2)
  max_prob: np.ndarray  # [B, N] p(top-1)
  mask: np.ndarray  # [B, N] bool: a generated token (the stop token included)

  def score(self, name: str) -> np.ndarray:
    """A confidence `[B, N]` (higher = surer): one of TOKEN_SCORES."""
    if name not in TOKEN_SCORES:
      raise ValueError(f"score must be one of {TOKEN_SCORES}; got {name!r}.")
    return -self.entropy if name == "neg_entropy" else getattr(self, name)

  def sequence(self) -> SequenceUncertainty:
    """Per-sequence aggregates over the masked tokens."""
    m = self.mask
    n = m.sum(-1)
    safe = np.maximum(n, 1)
    sum_lp = np.where(m, self.logprob, 0.0).sum(-1)
    return SequenceUncertainty(
        mean_nll=-sum_lp / safe,
        sum_logprob=sum_lp,
        max_entropy=np.where(m, self.entropy, 0.0).max(-1),
        mean_entropy=np.where(m, self.entropy, 0.0).sum(-1) / safe,
        min_max_prob=np.where(m, self.max_prob, 1.0).min(-1),
        length=n,
    )


class UncertainOutput(NamedTuple):
  """`generate(..., return_uncertainty=True)` (or `abstain=`): GenerateOutput plus scores."""

  tokens: np.ndarray  # [B, N] as GenerateOutput
  lengths: np.ndarray  # [B]
  uncertainty: TokenUncertainty
  sequence: SequenceUncertainty
  abstain: np.ndarray | None  # [B, N] bool: generated token scored below the threshold
  abstain_sequence: np.ndarray | None  # [B] bool: any of the row's tokens abstained


def uncertain_output(tokens, lengths, stats, abstainer=None) -> UncertainOutput:
  """Assembles generate's result from its per-step stats (dict of `[B, N]`)."""
  mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  unc = TokenUncertainty(
      **{k: np.where(mask, np.asarray(stats[k]), 0.0) for k in TokenUncertainty._fields[:-1]},
      mask=mask,
  )
  flags = seq_flags = None
  if abstainer is not None:
    flags = mask & (unc.score(abstainer.score) < abstainer.threshold)
    seq_flags = flags.any(-1)
  return UncertainOutput(tokens, lengths, unc, unc.sequence(), flags, seq_flags)


# --- Temperature scaling and calibration --------------------------------------------------------


def _flat_logits(logits, labels, mask=None):
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim < 2 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f"logits must be [..., V] with labels [...]; got logits {logits.shape} and labels "
        f"{labels.shape}."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
    raise ValueError(
        f"labels must lie in [0, {logits.shape[-1]}); got {labels.min()}..{labels.max()}."
    )
  if mask is not None and np.shape(mask) != labels.shape:
    raise ValueError(f"mask must have the labels' shape {labels.shape}; got {np.shape(mask)}.")
  logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
  if mask is not None:
    keep = np.asarray(mask, bool).reshape(-1)
    logits, labels = logits[keep], labels[keep]
  if labels.size == 0:
    raise ValueError("logits/labels hold no (unmasked) items.")
  return logits, labels


@jax.jit
def _nll(logits, labels, t):
  z = logits.astype(jnp.float32) / t
  return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, labels[:, None], -1)[:, 0])


def nll_at_temperature(logits, labels, temperature: float = 1.0, mask=None) -> float:
  """Mean negative log-likelihood (nats) of `softmax(logits / temperature)`."""
  logits, labels = _flat_logits(logits, labels, mask)
  return float(_nll(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), temperature))


def fit_temperature(
    logits, labels, *, mask=None, bounds: tuple[float, float] = (0.05, 20.0), iters: int = 60
) -> float:
  """The T > 0 that minimises the NLL of `softmax(logits / T)` on held-out data (Guo et al.).

  logits `[..., V]`, labels `[...]` int (optional bool `mask` `[...]`). Golden-section search on
  log T over `bounds` (`iters` steps shrink the bracket by 0.618 each); the NLL is convex in 1/T
  so the search finds the global minimum inside `bounds` (a bound is returned if it lies outside).
  """
  lo, hi = bounds
  if not 0 < lo < hi:
    raise ValueError(f"bounds must satisfy 0 < low < high; got {bounds}.")
  if iters < 1:
    raise ValueError(f"iters must be >= 1; got {iters}.")
  logits, labels = _flat_logits(logits, labels, mask)
  z, y = jnp.asarray(logits), jnp.asarray(labels, jnp.int32)
  return float(_golden(z, y, math.log(lo), math.log(hi), iters))


@functools.partial(jax.jit, static_argnums=(4,))
def _golden(z, y, a, b, iters):
  g = (math.sqrt(5) - 1) / 2
  f = lambda u: _nll(z, y, jnp.exp(u))

  def body(_, c):
    a, b, x1, x2, f1, f2 = c
    left = f1 <= f2  # the minimum lies in [a, x2]
    a, b = jnp.where(left, a, x1), jnp.where(left, x2, b)
    x1n, x2n = b - g * (b - a), a + g * (b - a)
    # left: (x1, x2) <- (new, old x1); right: (x1, x2) <- (old x2, new); one new evaluation
    nx1, nx2 = jnp.where(left, x1n, x2), jnp.where(left, x1, x2n)
    fnew = f(jnp.where(left, nx1, nx2))
    f1, f2 = jnp.where(left, fnew, f2), jnp.where(left, f1, fnew)
    return a, b, nx1, nx2, f1, f2

  a, b = jnp.float32(a), jnp.float32(b)
  x1, x2 = b - g * (b - a), a + g * (b - a)
  a, b, x1, x2, f1, f2 = jax.lax.fori_loop(0, iters, body, (a, b, x1, x2, f(x1), f(x2)))
  return jnp.exp((a + b) / 2)


def top1_confidence(logits, labels, *, temperature: float = 1.0, mask=None):
  """`(max softmax(logits / T) [n], argmax == label [n] bool)` over the (unmasked) items."""
  logits, labels = _flat_logits(logits, labels, mask)
  p = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, -1)
  return np.asarray(p.max(-1)), np.asarray(jnp.argmax(p, -1)) == labels


def calibration_bins(confidence, correct, num_bins: int = 15):
  """Equal-width bins (see the module docstring) -> dict of `[num_bins]` count, confidence,
  accuracy (0 in empty bins)."""
  conf, corr = _paired(confidence, correct, "confidence", "correct")
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"num_bins must be an integer >= 1; got {num_bins}.")
  if conf.min() < 0 or conf.max() > 1:
    raise ValueError(f"confidence must lie in [0, 1]; got {conf.min()}..{conf.max()}.")
  idx = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  count = np.bincount(idx, minlength=num_bins)
  safe = np.maximum(count, 1)
  return {
      "count": count,
      "confidence": np.bincount(idx, conf, num_bins) / safe,
      "accuracy": np.bincount(idx, corr.astype(np.float64), num_bins) / safe,
  }


def expected_calibration_error(confidence, correct, num_bins: int = 15) -> float:
  """ECE over `num_bins` equal-width confidence bins: sum_b |B_b| / n * |acc_b - conf_b|."""
  bins = calibration_bins(confidence, correct, num_bins)
  n = bins["count"].sum()
  return float(np.sum(bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])))


def _paired(a, b, name_a, name_b):
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b).reshape(-1)
  if np.shape(a) != np.shape(b):
    raise ValueError(f"{name_a} and {name_b} need one value per item; got {a.size} and {b.size}.")
  if a.size == 0:
    raise ValueError(f"{name_a} is empty: need at least one item.")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name_a} holds non-finite values.")
  return a, b.astype(bool)


# --- Selective prediction: conformal abstention, risk-coverage, AUROC ---------------------------


@dataclasses.dataclass(frozen=True)
class ConformalAbstainer:
  """Answer iff score >= threshold (inf: always abstain). Fields after `score` describe the fit."""

  threshold: float
  score: str = "max_prob"  # which TokenUncertainty score (TOKEN_SCORES)
  alpha: float | None = None
  risk: str = "selective"
  bound: float = float("nan")  # the calibration bound at the threshold
  calibration_coverage: float = float("nan")  # fraction of calibration items answered

  def __post_init__(self):
    if self.score not in TOKEN_SCORES:
      raise ValueError(f"score must be one of {TOKEN_SCORES}; got {self.score!r}.")

  def answers(self, scores) -> np.ndarray:
    return np.asarray(scores) >= self.threshold


def conformal_threshold(scores, errors, alpha: float, risk: str = "selective"):
  """Calibration confidences `[n]` and error flags `[n]` -> (threshold, bound, coverage).

  Candidates are the distinct calibration scores (answering all items scoring >= t) and inf
  (answering none). selective: bound(t) = (E(t) + 1) / (n(t) + 1) with E(t) the errors among the
  n(t) answered items; joint: (E(t) + 1) / (n + 1). Returns the smallest candidate with
  bound <= alpha (inf with its bound when none is: always abstain).
  """
  if not (isinstance(alpha, (float, int)) and 0 < alpha < 1):
    raise ValueError(f"alpha must lie in (0, 1); got {alpha}.")
  if risk not in ("selective", "joint"):
    raise ValueError(f"risk must be 'selective' or 'joint'; got {risk!r}.")
  s, e = _paired(scores, errors, "scores", "errors")
  order = np.argsort(-s, kind="stable")
  s, e = s[order], e[order]
  ends = np.r_[s[1:] != s[:-1], True]  # last index of each tie group (scores descending)
  cand = s[ends]
  answered = np.arange(1, len(s) + 1)[ends]
  err = np.cumsum(e)[ends]
  denom = answered + 1 if risk == "selective" else len(s) + 1
  bound = (err + 1) / denom
  ok = np.flatnonzero(bound <= alpha)
  if len(ok) == 0:
    none_bound = 1.0 if risk == "selective" else 1 / (len(s) + 1)
    return float("inf"), none_bound, 0.0
  i = ok[-1]  # candidates descend: the last feasible one is the smallest threshold
  return float(cand[i]), float(bound[i]), float(answered[i] / len(s))


def calibrate_abstainer(
    scores, errors, alpha: float, *, risk: str = "selective", score: str = "max_prob"
) -> ConformalAbstainer:
  """Fits a `ConformalAbstainer` on a calibration split (see `conformal_threshold`). For a
  per-sequence guarantee pass each calibration sequence's minimum token score (a sequence is
  answered iff all its tokens are)."""
  t, bound, cov = conformal_threshold(scores, errors, alpha, risk)
  return ConformalAbstainer(t, score, float(alpha), risk, bound, cov)


def risk_coverage_curve(scores, correct):
  """Answering the most confident items first -> (coverage [k], risk [k], AURC): one point per
  distinct score (ties enter together); risk = error rate among the answered."""
  s, c = _paired(scores, correct, "scores", "correct")
  order = np.argsort(-s, kind="stable")
  s, c = s[order], c[order]
  ends = np.r_[s[1:] != s[:-1], True]
  answered = np.arange(1, len(s) + 1)[ends]
  risk = np.cumsum(~c)[ends] / answered
  cov = answered / len(s)
  aurc = float(np.sum(np.diff(np.r_[0.0, cov]) * risk))
  return cov, risk, aurc


def accuracy_at_coverage(scores, correct, coverage: float) -> float:
  """Accuracy of the ceil(coverage * n) most confident items (ties by input order)."""
  if not 0 < coverage <= 1:
    raise ValueError(f"coverage must lie in (0, 1]; got {coverage}.")
  s, c = _paired(scores, correct, "scores", "correct")
  k = max(1, math.ceil(coverage * len(s)))
  return float(c[np.argsort(-s, kind="stable")[:k]].mean())


def auroc(scores, positive) -> float:
  """Area under the ROC curve of `scores` ranking positives above negatives (ties count 1/2)."""
  s, y = _paired(scores, positive, "scores", "positive")
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"positive needs both classes; got {n_pos} positives and {n_neg} negatives.")
  _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
  ranks = (np.cumsum(counts) - (counts - 1) / 2)[inv]  # 1-based average ranks
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- Semantic entropy ---------------------------------------------------------------------------


def normalize_text(s: str) -> str:
  """NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
  return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def exact_match(a: str, b: str) -> bool:
  """Normalised exact match (`normalize_text`)."""
  return normalize_text(a) == normalize_text(b)


@functools.lru_cache(maxsize=4096)
def _ast_key(s: str) -> str | None:
  try:
    return ast.dump(ast.parse(textwrap.dedent(s)))
  except (SyntaxError, ValueError):
    return None


def python_ast_equal(a: str, b: str) -> bool:
  """Equal `ast.dump` (formatting and comments ignored); two unparsable snippets compare by
  `exact_match`, a parsable one never equals an unparsable one."""
  ka, kb = _ast_key(a), _ast_key(b)
  if ka is None and kb is None:
    return exact_match(a, b)
  return ka == kb


def semantic_clusters(
    samples: Sequence[str], equivalent: Callable[[str, str], bool] = exact_match
) -> np.ndarray:
  """Cluster id per sample `[M]` int: each sample joins the first cluster whose first member it
  is `equivalent` to, else starts a new one. An `equivalent` that raises, or returns something
  other than a bool, is reported as a ValueError naming it and the two samples."""
  name = getattr(equivalent, "__name__", repr(equivalent))
  reps, ids = [], []
  for s in samples:
    for i, r in enumerate(reps):
      try:
        same = equivalent(r, s)
      except Exception as e:  # a user's function: name it instead of a deep traceback
        raise ValueError(
            f"equivalent={name} raised {type(e).__name__}: {e} on samples {r!r} and {s!r}."
        ) from e
      if not isinstance(same, (bool, np.bool_)):
        raise ValueError(
            f"equivalent={name} must return a bool; got {type(same).__name__} for {r!r}, {s!r}."
        )
      if same:
        ids.append(i)
        break
    else:
      ids.append(len(reps))
      reps.append(s)
  return np.asarray(ids, np.int64)


def semantic_entropy(
    samples: Sequence[str],
    logprobs=None,
    *,
    equivalent: Callable[[str, str], bool] = exact_match,
) -> float:
  """Entropy (nats) of the meaning clusters of M sampled answers to one prompt.

  logprobs None: cluster frequencies (Farquhar et al.'s discrete estimator); else p(cluster) is
  the sum of exp(logprob) of its samples over that of all samples (Kuhn et al.; pass
  length-normalised log-probabilities for their normalised variant).
  """
  if len(samples) == 0:
    raise ValueError("samples is empty: semantic entropy needs at least one sampled answer.")
  ids = semantic_clusters(samples, equivalent)
  if logprobs is None:
    w = np.ones(len(ids))
  else:
    lp = np.asarray(logprobs, np.float64).reshape(-1)
    if lp.shape != ids.shape:
      raise ValueError(f"logprobs needs one value per sample; got {lp.size} for {len(ids)}.")
    w = np.exp(lp - lp.max())
  p = np.bincount(ids, w) / w.sum()
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())
