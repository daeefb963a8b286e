"""An interactive terminal conversation with a saved language model (`nexus-lm chat`).

The conversation is one running transcript of bytes: every user line is appended (with
`user_prefix` before it and a newline after it, then `reply_prefix`) and the model continues the
transcript until it writes the `stop` bytes, reaches `max_new_tokens` or the user presses Ctrl-C.
Each reply is streamed as its tokens are sampled (`inference.stream.stream_tokens`), decoded as
UTF-8 incrementally so a multi-byte character is printed once complete. The prompt is the last
`context - max_new_tokens` tokens of the transcript, so a long conversation slides instead of
failing; the KV cache has the static length `context`, so every turn reuses the compiled steps.

Commands: `/reset` forgets the conversation, `/quit` (or Ctrl-D) ends it, `/help` lists them.
Ctrl-C while a reply streams stops that reply (its text so far stays in the transcript); Ctrl-C at
the prompt only prints a reminder. While a reply streams, SIGINT only sets a flag that the loop
reads after each token: a KeyboardInterrupt raised inside a running XLA computation can leave the
runtime unable to shut down cleanly (we saw the process segfault at exit).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import signal
import sys
import threading
from typing import Any, Callable

import jax

from nexus_jax.inference.generate import Sampling
from nexus_jax.inference.stream import stream_tokens

HELP = "commands: /reset clears the conversation, /quit exits (or Ctrl-D), /help shows this"


def _held_back(buffer: bytes, stop: bytes) -> int:
  """Length of the longest suffix of `buffer` that is a proper prefix of `stop` (kept unprinted)."""
  for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
    if buffer.endswith(stop[:n]):
      return n
  return 0


@dataclasses.dataclass
class ChatSession:
  """One conversation with `model` (see the module docstring).

  tokenizer: an object with `encode(bytes) -> ids`, `token_bytes(id) -> bytes`, `vocab_size`.
  """

  model: Any
  params: Any
  tokenizer: Any
  sampling: Sampling = Sampling(temperature=0.8, top_p=0.95)
  max_new_tokens: int = 200
  context: int = 1024
  stop: bytes = b"\n\n"
  user_prefix: bytes = b""
  reply_prefix: bytes = b""
  seed: int = 0
  transcript: bytes = b""
  turns: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"--max-new-tokens must be >= 1; got {self.max_new_tokens}")
    if self.context <= self.max_new_tokens:
      raise ValueError(
          f"--context {self.context} must exceed --max-new-tokens {self.max_new_tokens} "
          "(the prompt needs room in the cache)"
      )

  def reset(self) -> None:
    self.transcript, self.turns = b"", 0

  def _turn(self, user_text: str) -> bytes:
    """The bytes a user line adds to the transcript before the reply."""
    return self.user_prefix + user_text.encode("utf-8") + b"\n" + self.reply_prefix

  def prompt_ids(self, user_text: str) -> list[int]:
    """Token ids of the transcript plus the new user turn, the oldest dropped to fit the cache."""
    ids = list(self.tokenizer.encode(self.transcript + self._turn(user_text)))
    return ids[-(self.context - self.max_new_tokens) :]

  def reply(
      self,
      user_text: str,
      write: Callable[[str], Any],
      stop_requested: Callable[[], bool] = lambda: False,
  ) -> tuple[str, bool]:
    """Streams the model's reply to `write` (text pieces); returns (reply text, interrupted).

    `stop_requested()` is polled after every token (Ctrl-C sets it, see `sigint_flag`).
    """
    turn = self._turn(user_text)
    ids = self.prompt_ids(user_text)
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.turns)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    reply, printed, interrupted = b"", 0, False
    tokens = stream_tokens(
        self.model,
        self.params,
        ids,
        max_new_tokens=self.max_new_tokens,
        rng=rng,
        sampling=self.sampling,
        cache_len=self.context,
        pad_to_multiple=64,
    )
    try:
      for token in tokens:
        if stop_requested():
          interrupted = True
          break
        reply += self.tokenizer.token_bytes(token)
        if self.stop and self.stop in reply:
          reply = reply[: reply.index(self.stop)]
          break
        keep = _held_back(reply, self.stop) if self.stop else 0
        write(decoder.decode(reply[printed : len(reply) - keep]))
        printed = len(reply) - keep
    except KeyboardInterrupt:
      interrupted = True
    finally:
      tokens.close()
    write(decoder.decode(reply[printed:], final=True))
    self.transcript += turn + reply + (self.stop or b"\n")
    self.turns += 1
    return reply.decode("utf-8", "replace"), interrupted


@contextlib.contextmanager
def sigint_flag():
  """While active, Ctrl-C (SIGINT) sets the yielded event instead of raising KeyboardInterrupt
  (only in the main thread, where Python delivers signals; elsewhere the event is never set)."""
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield event
    return
  previous = signal.signal(signal.SIGINT, lambda *_: event.set())
  try:
    yield event
  finally:
    signal.signal(signal.SIGINT, previous)


def chat_loop(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out=None,
    banner: str = "",
) -> int:
  """Reads user lines with `read(prompt)` until /quit or end of input; returns the exit code 0."""
  out = out or sys.stdout

  def write(text: str) -> None:
    out.write(text)
    out.flush()

  if banner:
    write(banner + "\n" + HELP + "\n")
  while True:
    try:
      line = read("you> ")
    except EOFError:
      write("\n")
      return 0
    except KeyboardInterrupt:
      write("\n(Ctrl-C stops a reply; /quit exits)\n")
      continue
    command = line.strip()
    if command in ("/quit", "/exit"):
      return 0
    if command == "/reset":
      session.reset()
      write("(conversation cleared)\n")
      continue
    if command == "/help":
      write(HELP + "\n")
      continue
    if command.startswith("/"):
      write(f"unknown command {command.split()[0]!r}; {HELP}\n")
      continue
    if not command:
      continue
    write("model> ")
    with sigint_flag() as stop:
      _, interrupted = session.reply(line, write, stop.is_set)
    write(" [stopped]\n" if interrupted else "\n")
