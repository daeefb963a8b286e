"""The chat loop: streamed replies that end at the stop text (never printing a part of it), Ctrl-C
stopping one reply and not the conversation, /reset, /quit, unknown commands, end of input, and a
transcript that slides to fit the cache. A scripted StepModel makes the replies exact."""

import io

import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.cli.chat import ChatSession, _held_back, chat_loop
from nexus_jax.inference.generate import Sampling, StepModel

V = 256


class Bytes:
  kind, vocab_size = "byte", V

  def encode(self, data: bytes):
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def token_bytes(self, token: int) -> bytes:
    return bytes([token])


def scripted(script: bytes, cache_len: int = 64) -> StepModel:
  """Greedy decoding of this model writes `script` (then repeats its last byte), whatever the prompt."""
  table = jnp.asarray(list(script), jnp.int32)

  def apply(params, state, tokens, positions, cache_mask, first):
    n = jnp.where(first, 0, state["n"] + 1)
    nxt = table[jnp.minimum(n, len(script) - 1)]
    logits = jnp.where(jnp.arange(V) == nxt, 10.0, -10.0)
    return jnp.broadcast_to(logits, (*tokens.shape, V)), {"n": n}

  return StepModel(
      vocab_size=V,
      cache_len=cache_len,
      init=lambda params, batch, source=None: {"n": jnp.int32(0)},
      apply=apply,
      reorder=lambda s, i: s,
      rewind=lambda s, i: s,
  )


def session(script: bytes, tokenizer=None, **kw) -> ChatSession:
  kw = {"max_new_tokens": 20, "context": 64, "sampling": Sampling(temperature=0.0), **kw}
  return ChatSession(scripted(script, kw["context"]), {}, tokenizer or Bytes(), **kw)


def test_reply_streams_until_the_stop_text_and_never_prints_part_of_it():
  s = session(b"hi there\n\nignored")
  pieces = []
  text, interrupted = s.reply("hello", pieces.append)
  assert (text, interrupted) == ("hi there", False)
  assert "".join(pieces) == "hi there" and len([p for p in pieces if p]) > 1
  assert s.transcript == b"hello\nhi there\n\n"


def test_held_back_keeps_a_possible_start_of_the_stop_text():
  assert _held_back(b"abc\n", b"\n\n") == 1
  assert _held_back(b"abc", b"\n\n") == 0
  assert _held_back(b"ab<e", b"<end>") == 2


def test_multibyte_characters_are_printed_whole():
  s = session("é—ok\n\n".encode())
  pieces = []
  s.reply("x", pieces.append)
  assert "".join(pieces) == "é—ok"
  assert all("\ufffd" not in p for p in pieces)


class InterruptAt(Bytes):
  """The user presses Ctrl-C while the reply's `n`-th token is printed."""

  def __init__(self, n):
    self.n, self.seen = n, 0

  def token_bytes(self, token):
    self.seen += 1
    if self.seen == self.n:
      raise KeyboardInterrupt
    return super().token_bytes(token)


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on():
  s = session(b"abcdefgh", tokenizer=InterruptAt(4))
  out = io.StringIO()
  lines = iter(["first", "second", "/quit"])
  assert chat_loop(s, read=lambda _: next(lines), out=out) == 0
  shown = out.getvalue()
  assert "model> abc [stopped]" in shown
  assert s.turns == 2  # the second line was answered after the interrupt
  assert s.transcript.startswith(b"first\nabc\n\nsecond\n")


def test_commands_and_end_of_input():
  s = session(b"ok\n\n")
  out = io.StringIO()
  lines = iter(["hi", "/reset", "/bogus", "", "again"])

  def read(_):
    try:
      return next(lines)
    except StopIteration:
      raise EOFError

  assert chat_loop(s, read=read, out=out, banner="test model") == 0
  shown = out.getvalue()
  assert shown.startswith("test model\n")
  assert "(conversation cleared)" in shown and "unknown command '/bogus'" in shown
  assert shown.count("model> ok") == 2
  assert s.transcript == b"again\nok\n\n"  # /reset forgot the first turn


def test_ctrl_c_at_the_prompt_does_not_exit():
  s = session(b"ok\n\n")
  out = io.StringIO()
  events = iter([KeyboardInterrupt, "/quit"])

  def read(_):
    e = next(events)
    if e is KeyboardInterrupt:
      raise e
    return e

  assert chat_loop(s, read=read, out=out) == 0
  assert "/quit exits" in out.getvalue()


def test_a_long_conversation_slides_to_fit_the_cache():
  s = session(b"0123456789\n\n", context=48, max_new_tokens=16)
  for i in range(6):
    s.reply(f"question {i}", lambda _: None)
  assert len(s.transcript) > 48
  ids = s.prompt_ids("last")
  assert len(ids) == 48 - 16 and bytes(ids).endswith(b"last\n")


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match="--context 16 must exceed --max-new-tokens 16"):
    session(b"x", context=16, max_new_tokens=16)
