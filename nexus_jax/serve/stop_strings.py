"""Stop strings matched on the decoded bytes of generated tokens (the engine stops on token ids).

    stops = StopStrings(["\\n\\n"], tokenizer.token_bytes)
    stops.feed(token, logprob)            # True once the text so far contains a stop string
    tokens, logprobs, hit = stops.cut(all_tokens, all_logprobs)

A stream holds back the last `held_bytes()` bytes (they may begin a stop string) until the next
token shows they do not. The cut keeps the tokens whose bytes end at or before the first match, so the returned text never
contains a stop string (nor the part of a token that begins one).
"""

from __future__ import annotations

from typing import Callable, Sequence


class StopStrings:
  """Watches a stream of tokens for any of `stops` (text, compared as UTF-8 bytes)."""

  def __init__(self, stops: Sequence[str], token_bytes: Callable[[int], bytes]):
    self.stops = [s.encode("utf-8") for s in stops if s]
    self.token_bytes = token_bytes
    self.text = b""
    self.hit = False

  def feed(self, token: int) -> bool:
    """Adds one token; whether a stop string has appeared (stays True once it has)."""
    if self.stops and not self.hit:
      self.text += self.token_bytes(int(token))
      self.hit = any(s in self.text for s in self.stops)
    return self.hit

  def first_match(self) -> int | None:
    """Byte offset of the first stop string in the text so far (None: no match)."""
    found = [at for at in (self.text.find(s) for s in self.stops) if at >= 0]
    return min(found) if found else None

  def held_bytes(self) -> int:
    """How many trailing bytes of the text so far could begin a stop string (hold them back)."""
    return max(
        (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0
    )

  def cut(self, tokens: Sequence[int], logprobs: Sequence[float]):
    """(tokens, logprobs, hit): the prefix before the first stop string in their text."""
    tokens, logprobs = list(tokens), list(logprobs)
    if not self.stops:
      return tokens, logprobs, False
    text, ends = b"", []
    for t in tokens:
      text += self.token_bytes(int(t))
      ends.append(len(text))
    found = [at for at in (text.find(s) for s in self.stops) if at >= 0]
    if not found:
      return tokens, logprobs, False
    keep = sum(1 for end in ends if end <= min(found))
    return tokens[:keep], logprobs[:keep], True
