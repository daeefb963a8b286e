"""Verified multi-turn refinement: generate -> check -> revise, and the best-of-n baseline.

    verify = lambda line: (ok, message)        # an EXTERNAL check, e.g. compile() of the block
    out = refine(model, params, context, verify, max_rounds=4, token_budget=192,
                 max_new_tokens=48, rng=key, sampling=Sampling(temperature=0.8),
                 stop_tokens=(10,))
    out.rounds[i].attempt, out.rounds[i].verdict.ok / .message, out.tokens_used, out.answer
    base = best_of_n(model, params, context, verify, n=4, token_budget=192, ...)  # same budget

Refinement is driven by the caller's verifier, never by the model judging itself (Huang et al.,
ICLR 2024: self-correction without external feedback makes answers worse; Self-Refine, Madaan et
al. 2023, is the loop). Round 1 samples from `context`; round k > 1 conditions on round k-1's
attempt and the verifier's message, in this text format (`refine_prompt`):

    # previous attempt: <attempt; a newline inside it continues as a new "# " line>
    # error: <verifier message; same rule>
    <context>

Only the LAST attempt is shown (the prompt stays bounded); attempt and message are each cut to
`max_feedback_chars`. With `max_prompt_tokens`, the oldest context tokens are dropped so the
whole prompt fits (the header is always kept), which also gives every round one prompt shape.

Stops at the first accepted attempt, after `max_rounds`, or when `token_budget` (generated tokens,
stop tokens included, summed over rounds; prompt tokens are reported as `prompt_tokens` but not
budgeted) is spent; a round never samples past the budget. The stop is budgeted only: there is no
learned "give up" signal. A verifier that raises gives that round the verdict `ok=False, raised=
True, message="<ExceptionType>: <text>"` (the message is shown to the next round like any other);
`on_verifier_error="continue"` goes on, `"stop"` ends the loop.

`best_of_n` draws up to `n` independent samples of the same prompt with the same verifier and
the same budget rule, returning at the first accepted one; round 1 of both uses the same key, so
`refine(..., max_rounds=1)` == `best_of_n(..., n=1)` == single-shot sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from nexus_jax.inference.generate import Sampling, generate

ON_VERIFIER_ERROR = ("continue", "stop")
STOP_REASONS = ("accepted", "max_rounds", "token_budget", "verifier_error")
Verifier = Callable[[str], tuple[bool, str]]


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The verifier's answer for one attempt; `raised`: the verifier raised (message = its text)."""

  ok: bool
  message: str
  raised: bool = False


@dataclasses.dataclass(frozen=True)
class Round:
  """One generate -> check step."""

  prompt: str  # the text this round was conditioned on (before `max_prompt_tokens` trimming)
  attempt: str  # decoded sample, stop token removed
  verdict: Verdict
  new_tokens: int  # tokens sampled this round (stop token included)
  prompt_tokens: int  # tokens actually fed to the model (after trimming)


@dataclasses.dataclass(frozen=True)
class RefineResult:
  rounds: tuple[Round, ...]
  stop_reason: str  # one of STOP_REASONS
  tokens_used: int  # generated tokens over all rounds (what `token_budget` bounds)
  prompt_tokens: int  # prompt tokens prefilled over all rounds

  @property
  def accepted(self) -> bool:
    return self.stop_reason == "accepted"

  @property
  def answer(self) -> str | None:
    """The accepted attempt, or None when no round was accepted."""
    return self.rounds[-1].attempt if self.accepted else None


def _feedback(text: str, max_chars: int) -> str:
  text = text if len(text) <= max_chars else text[:max_chars] + "..."
  return text.replace("\r", "").replace("\n", "\n# ")


def refine_header(attempt: str, message: str, max_feedback_chars: int = 200) -> str:
  """The comment lines that show a previous attempt and its verdict (see the module docstring)."""
  return (
      f"# previous attempt: {_feedback(attempt, max_feedback_chars)}\n"
      f"# error: {_feedback(message, max_feedback_chars)}\n"
  )


def refine_prompt(
    context: str,
    attempt: str | None = None,
    message: str | None = None,
    max_feedback_chars: int = 200,
) -> str:
  """Round prompt: `context` alone for round 1, else `refine_header(attempt, message) + context`."""
  if attempt is None:
    return context
  return refine_header(attempt, message or "", max_feedback_chars) + context


def utf8_encode(text: str) -> list[int]:
  """Byte-level token ids (vocab >= 256)."""
  return list(text.encode("utf-8"))


def utf8_decode(ids: Sequence[int]) -> str:
  return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _check_args(max_rounds, token_budget, max_new_tokens, on_verifier_error, rounds_field):
  if max_rounds < 1:
    raise ValueError(f"{rounds_field} must be >= 1; got {max_rounds}.")
  if token_budget is not None and token_budget < 1:
    raise ValueError(
        f"token_budget must be >= 1 (None: only {rounds_field} bounds the loop); "
        f"got {token_budget}."
    )
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  if on_verifier_error not in ON_VERIFIER_ERROR:
    raise ValueError(
        f"on_verifier_error={on_verifier_error!r}; choose one of {list(ON_VERIFIER_ERROR)}."
    )


def _run_verifier(verify: Verifier, attempt: str) -> Verdict:
  try:
    result = verify(attempt)
  except Exception as e:  # the verifier's own failure is this round's verdict
    return Verdict(False, f"{type(e).__name__}: {e}", raised=True)
  if not (isinstance(result, (tuple, list)) and len(result) == 2):
    raise TypeError(f"verify(attempt) must return (ok: bool, message: str); got {result!r}.")
  return Verdict(bool(result[0]), str(result[1]))


def _loop(
    model,
    params,
    context,
    verify,
    *,
    conditioned,
    rounds_field,
    max_rounds,
    token_budget,
    max_new_tokens,
    rng,
    sampling,
    stop_tokens,
    max_prompt_tokens,
    max_feedback_chars,
    on_verifier_error,
    encode,
    decode,
) -> RefineResult:
  _check_args(max_rounds, token_budget, max_new_tokens, on_verifier_error, rounds_field)
  if max_prompt_tokens is not None and max_prompt_tokens < 1:
    raise ValueError(
        f"max_prompt_tokens must be >= 1 (None: no trimming); got {max_prompt_tokens}."
    )
  if rng is None:
    if sampling.temperature != 0:
      raise ValueError("sampling with temperature > 0 needs `rng`.")
    rng = jax.random.PRNGKey(0)
  cache_len = None if max_prompt_tokens is None else max_prompt_tokens + max_new_tokens
  context_ids = encode(context)
  rounds, used, prefilled, reason = [], 0, 0, "max_rounds"
  stops = set(int(s) for s in stop_tokens)
  for r in range(max_rounds):
    remaining = max_new_tokens if token_budget is None else min(max_new_tokens, token_budget - used)
    if remaining < 1:
      reason = "token_budget"
      break
    prev = rounds[-1] if (conditioned and rounds) else None
    header = (
        ""
        if prev is None
        else refine_header(prev.attempt, prev.verdict.message, max_feedback_chars)
    )
    header_ids = encode(header)
    room = len(context_ids)
    if max_prompt_tokens is not None:
      room = max_prompt_tokens - len(header_ids)  # the oldest context tokens go first
      if room < 1:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} leaves no room for the context after the "
            f"feedback header ({len(header_ids)} tokens); raise max_prompt_tokens or lower "
            "max_feedback_chars."
        )
    ids = header_ids + context_ids[len(context_ids) - min(room, len(context_ids)) :]
    out = generate(
        model,
        params,
        [ids],
        max_new_tokens=int(remaining),
        rng=jax.random.fold_in(rng, r),
        sampling=sampling,
        stop_tokens=stop_tokens,
        cache_len=cache_len,
    )
    n = int(out.lengths[0])
    sampled = [int(t) for t in out.tokens[0, :n]]
    if sampled and sampled[-1] in stops:
      sampled = sampled[:-1]
    attempt = decode(sampled)
    verdict = _run_verifier(verify, attempt)
    used, prefilled = used + n, prefilled + len(ids)
    rounds.append(Round(header + context, attempt, verdict, n, len(ids)))
    if verdict.ok:
      reason = "accepted"
      break
    if verdict.raised and on_verifier_error == "stop":
      reason = "verifier_error"
      break
  return RefineResult(tuple(rounds), reason, used, prefilled)


def refine(
    model,
    params,
    context: str,
    verify: Verifier,
    *,
    max_rounds: int = 4,
    token_budget: int | None = None,
    max_new_tokens: int = 64,
    rng=None,
    sampling: Sampling = Sampling(temperature=0.8),
    stop_tokens: Sequence[int] = (),
    max_prompt_tokens: int | None = None,
    max_feedback_chars: int = 200,
    on_verifier_error: str = "continue",
    encode: Callable[[str], list[int]] = utf8_encode,
    decode: Callable[[Sequence[int]], str] = utf8_decode,
) -> RefineResult:
  """Verifier-driven refinement of one prompt (module docstring). model: module or StepModel.

  Each round samples at most `max_new_tokens` (and never past `token_budget`) with `generate`,
  using key `fold_in(rng, round)`; `encode`/`decode` map text to token ids (default UTF-8 bytes).
  """
  return _loop(
      model,
      params,
      context,
      verify,
      conditioned=True,
      rounds_field="max_rounds",
      max_rounds=max_rounds,
      token_budget=token_budget,
      max_new_tokens=max_new_tokens,
      rng=rng,
      sampling=sampling,
      stop_tokens=stop_tokens,
      max_prompt_tokens=max_prompt_tokens,
      max_feedback_chars=max_feedback_chars,
      on_verifier_error=on_verifier_error,
      encode=encode,
      decode=decode,
  )


def best_of_n(
    model,
    params,
    context: str,
    verify: Verifier,
    *,
    n: int = 4,
    token_budget: int | None = None,
    max_new_tokens: int = 64,
    rng=None,
    sampling: Sampling = Sampling(temperature=0.8),
    stop_tokens: Sequence[int] = (),
    max_prompt_tokens: int | None = None,
    on_verifier_error: str = "continue",
    encode: Callable[[str], list[int]] = utf8_encode,
    decode: Callable[[Sequence[int]], str] = utf8_decode,
) -> RefineResult:
  """Up to `n` independent samples of `context` (keys `fold_in(rng, i)`), stopping at the first
  the verifier accepts or when `token_budget` is spent; the same result type as `refine`."""
  return _loop(
      model,
      params,
      context,
      verify,
      conditioned=False,
      rounds_field="n",
      max_rounds=n,
      token_budget=token_budget,
      max_new_tokens=max_new_tokens,
      rng=rng,
      sampling=sampling,
      stop_tokens=stop_tokens,
      max_prompt_tokens=max_prompt_tokens,
      max_feedback_chars=200,
      on_verifier_error=on_verifier_error,
      encode=encode,
      decode=decode,
  )
