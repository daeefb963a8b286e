"""Verified refinement: stops at acceptance, returns every round, conditions on the previous
attempt and message, reports a raising verifier per round (continue / stop), respects the token
budget, best-of-n shares round 1 with refinement, bad arguments name their field."""

import jax
import numpy as np
import pytest

from nexus_jax.inference.generate import Sampling, generate
from nexus_jax.inference.refine import (
    best_of_n,
    refine,
    refine_header,
    refine_prompt,
    utf8_decode,
    utf8_encode,
)
from nexus_jax.models.lm import LanguageModel

CONTEXT = "def f(x):\n    return"
KW = dict(max_new_tokens=4, rng=jax.random.PRNGKey(3), sampling=Sampling(temperature=1.0))


@pytest.fixture(scope="module")
def lm():
  model = LanguageModel.from_preset("tiny", vocab_size=256)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
  return model, params


def scripted(accept_on=None, raise_on=()):
  """A verifier that accepts on call `accept_on` (1-based), raises on calls in `raise_on`."""
  calls = []

  def verify(attempt):
    calls.append(attempt)
    if len(calls) in raise_on:
      raise RuntimeError(f"checker crashed on call {len(calls)}")
    return len(calls) == accept_on, f"bad attempt {len(calls)}"

  return verify, calls


def test_prompt_builder_shows_previous_attempt_and_message():
  assert refine_prompt(CONTEXT) == CONTEXT
  p = refine_prompt(CONTEXT, "x = (1,", "'(' was never closed")
  assert p == "# previous attempt: x = (1,\n# error: '(' was never closed\n" + CONTEXT
  multi = refine_header("a\nb", "line one\nline two")
  assert multi == "# previous attempt: a\n# b\n# error: line one\n# line two\n"
  assert refine_header("y" * 50, "m", max_feedback_chars=10).startswith(
      "# previous attempt: " + "y" * 10 + "...\n"
  )


def test_stops_when_verifier_accepts_and_returns_every_round(lm):
  verify, calls = scripted(accept_on=2)
  out = refine(*lm, CONTEXT, verify, max_rounds=5, **KW)
  assert len(out.rounds) == 2 and len(calls) == 2
  assert out.stop_reason == "accepted" and out.accepted
  assert [r.verdict.ok for r in out.rounds] == [False, True]
  assert out.rounds[0].verdict.message == "bad attempt 1"
  assert [r.attempt for r in out.rounds] == calls
  assert out.answer == out.rounds[1].attempt
  assert out.tokens_used == sum(r.new_tokens for r in out.rounds)
  assert out.prompt_tokens == sum(r.prompt_tokens for r in out.rounds)


def test_next_round_is_conditioned_on_attempt_and_message(lm):
  verify, _ = scripted()
  out = refine(*lm, CONTEXT, verify, max_rounds=3, **KW)
  assert out.stop_reason == "max_rounds" and out.answer is None and len(out.rounds) == 3
  assert out.rounds[0].prompt == CONTEXT
  for prev, cur in zip(out.rounds, out.rounds[1:]):
    assert cur.prompt == refine_prompt(CONTEXT, prev.attempt, prev.verdict.message)
    assert cur.prompt_tokens == len(utf8_encode(cur.prompt))


def test_first_round_is_single_shot_sampling_and_best_of_n_round_one(lm):
  model, params = lm
  verify, _ = scripted()
  single = refine(model, params, CONTEXT, verify, max_rounds=1, **KW)
  bon = best_of_n(model, params, CONTEXT, verify, n=3, **KW)
  direct = generate(
      model,
      params,
      [utf8_encode(CONTEXT)],
      max_new_tokens=4,
      rng=jax.random.fold_in(KW["rng"], 0),
      sampling=KW["sampling"],
  )
  assert single.rounds[0].attempt == bon.rounds[0].attempt == utf8_decode(direct.tokens[0])
  assert [r.prompt for r in bon.rounds] == [CONTEXT] * 3  # independent: never conditioned


def test_best_of_n_returns_first_accepted(lm):
  verify, calls = scripted(accept_on=2)
  out = best_of_n(*lm, CONTEXT, verify, n=4, **KW)
  assert out.accepted and len(out.rounds) == 2 and out.answer == calls[1]


@pytest.mark.parametrize("mode", ["continue", "stop"])
def test_raising_verifier_is_reported_per_round(lm, mode):
  verify, _ = scripted(accept_on=3, raise_on=(1,))
  out = refine(*lm, CONTEXT, verify, max_rounds=4, on_verifier_error=mode, **KW)
  first = out.rounds[0].verdict
  assert not first.ok and first.raised
  assert first.message == "RuntimeError: checker crashed on call 1"
  if mode == "stop":
    assert out.stop_reason == "verifier_error" and len(out.rounds) == 1
  else:
    assert out.stop_reason == "accepted" and len(out.rounds) == 3
    assert not out.rounds[1].verdict.raised
    assert "# error: RuntimeError: checker crashed on call 1\n" in out.rounds[1].prompt


def test_token_budget_is_never_exceeded(lm):
  verify, _ = scripted()
  out = refine(*lm, CONTEXT, verify, max_rounds=10, token_budget=10, **KW)
  assert [r.new_tokens for r in out.rounds] == [4, 4, 2]
  assert out.tokens_used == 10 and out.stop_reason == "token_budget"
  bon = best_of_n(*lm, CONTEXT, verify, n=10, token_budget=10, **KW)
  assert bon.tokens_used == 10 and len(bon.rounds) == 3


def test_stop_token_ends_a_round_and_is_not_in_the_attempt(lm):
  model, params = lm
  verify, _ = scripted()
  greedy = dict(max_new_tokens=6, sampling=Sampling(temperature=0.0))
  first = generate(model, params, [utf8_encode(CONTEXT)], **greedy)
  stop = int(first.tokens[0, 0])  # the first greedy token becomes the stop
  out = refine(model, params, CONTEXT, verify, max_rounds=1, stop_tokens=(stop,), **greedy)
  assert out.rounds[0].attempt == "" and out.rounds[0].new_tokens == 1


def test_max_prompt_tokens_keeps_header_and_trims_old_context(lm):
  verify, _ = scripted()
  out = refine(*lm, "#" * 100 + CONTEXT, verify, max_rounds=2, max_prompt_tokens=64, **KW)
  assert [r.prompt_tokens for r in out.rounds] == [64, 64]
  with pytest.raises(ValueError, match="max_prompt_tokens"):
    refine(*lm, CONTEXT, verify, max_rounds=2, max_prompt_tokens=20, **KW)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_rounds=0), "max_rounds"),
        (dict(token_budget=0), "token_budget"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(on_verifier_error="ignore"), "on_verifier_error"),
        (dict(max_prompt_tokens=0), "max_prompt_tokens"),
    ],
)
def test_bad_arguments_name_the_field(lm, kwargs, field):
  verify, _ = scripted()
  with pytest.raises(ValueError, match=field):
    refine(*lm, CONTEXT, verify, **{**KW, **kwargs})


def test_best_of_n_bad_n_and_bad_verifier_result(lm):
  with pytest.raises(ValueError, match="n must be >= 1"):
    best_of_n(*lm, CONTEXT, lambda a: (True, ""), n=0, **KW)
  with pytest.raises(TypeError, match="verify"):
    refine(*lm, CONTEXT, lambda a: True, **KW)
  with pytest.raises(ValueError, match="rng"):
    refine(*lm, CONTEXT, lambda a: (True, ""), sampling=Sampling(temperature=1.0))
