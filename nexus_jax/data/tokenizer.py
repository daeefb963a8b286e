"""Tokenizers for the language models: raw bytes, or a byte-level BPE (Hugging Face `tokenizers`).

    tok = train_tokenizer("bpe", [train_bytes], vocab_size=4096)  # offline, on the training split
    ids = tok.encode(data)             # int32 [N]
    tok.decode(ids) == data            # for ANY bytes, invalid UTF-8 included
    tok.token_bytes(ids[0])            # the exact bytes of one token (streaming output)
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
    check_vocab(tok, model.vocab_size, "runs/lm")   # TokenizerError on a mismatch

Kinds:
  byte  256 tokens, token id = byte value (the identity).
  bpe   exactly `vocab_size` tokens: the 256 single bytes + `vocab_size - 256` merges learned by
        `tokenizers`' BPE trainer with the GPT-2 byte-level recipe (`pre_tokenizers.ByteLevel`
        without a prefix space, no normalizer, the 256-byte initial alphabet). No special tokens:
        there is no end-of-text token, since the LM experiments model one byte stream.

Lossless on arbitrary bytes. `tokenizers` takes `str`, so bytes that are not valid UTF-8 cannot
reach it. `encode` cuts the input into maximal valid-UTF-8 runs and the bytes between them: a
run goes through the BPE (its tokens spell exactly its UTF-8 bytes), and each other byte becomes
its single-byte token; `decode` joins the tokens' bytes, so `decode(encode(x)) == x`. Valid
UTF-8 is tokenized exactly as `tokenizers` tokenizes the whole string as one stream: for speed a
long run is encoded in parallel pieces, cut only after a lone "\n" between printable ASCII
characters, which the GPT-2 split regex makes a pre-token of its own wherever the string ends.

File: one JSON object `{"format": "nexus_jax.tokenizer", "version": 1, "kind", "vocab_size"}`,
plus `"tokenizers"` (the `tokenizers` JSON of the BPE) for kind bpe.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
import re
from typing import Any, Iterable, Iterator

import numpy as np

FORMAT = "nexus_jax.tokenizer"
VERSION = 1
KINDS = ("byte", "bpe")
DEFAULT_VOCAB_SIZE = {"byte": 256, "bpe": 4096}

_ESCAPED = re.compile("([\udc80-\udcff]+)")  # bytes that are not valid UTF-8 (surrogateescape)
# A lone "\n" between printable ASCII: a pre-token of its own, so cutting after it changes none.
_CUT = re.compile(r"(?<=[!-~])\n(?=[!-~])")
_PIECE_CHARS = 1 << 16  # characters per piece handed to the parallel batch encoder


class TokenizerError(ValueError):
  """A tokenizer cannot be built, read, or used with this model / config."""


def _byte_to_char() -> list[str]:
  """GPT-2's printable stand-in character for each byte 0..255 (`ByteLevel`'s alphabet)."""
  keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


class Tokenizer(abc.ABC):
  """Bytes <-> int32 token ids. `kind` names the scheme, `vocab_size` counts every token id;
  `path` is the JSON file it was saved to or loaded from (None before either)."""

  kind: str
  vocab_size: int
  path: pathlib.Path | None = None

  @abc.abstractmethod
  def encode(self, data: bytes) -> np.ndarray:
    """`data` (any bytes) -> token ids int32 [N]."""

  def decode(self, ids: Any) -> bytes:
    """Token ids [N] -> the bytes they spell (`decode(encode(x)) == x`)."""
    return b"".join(self.token_bytes(i) for i in self._checked_ids(ids).tolist())

  @abc.abstractmethod
  def token_bytes(self, id: int) -> bytes:
    """The exact bytes of token `id` (for streaming output, one token at a time)."""

  def _payload(self) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "kind": self.kind, "vocab_size": self.vocab_size}

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer as one JSON file (atomically: a temporary file, then a rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(self._payload()))
    tmp.replace(path)
    self.path = path

  def _checked_ids(self, ids: Any) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise TokenizerError(f"token ids must be a 1-D integer sequence; got {ids.dtype}{ids.shape}.")
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise TokenizerError(
          f"token id {int(bad[0])} is outside this {self.kind} tokenizer's vocabulary "
          f"[0, {self.vocab_size})."
      )
    return ids.astype(np.int64)

  def _check_id(self, id: Any) -> int:
    if isinstance(id, (bool, np.bool_)) or not isinstance(id, (int, np.integer)):
      raise TokenizerError(f"a token id must be an int; got {type(id).__name__}.")
    if not 0 <= id < self.vocab_size:
      raise TokenizerError(
          f"token id {int(id)} is outside this {self.kind} tokenizer's vocabulary "
          f"[0, {self.vocab_size})."
      )
    return int(id)

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size}, path={self.path})"


def _as_bytes(data: Any, what: str = "encode") -> bytes:
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TokenizerError(f"{what} takes bytes; got {type(data).__name__} (encode str first).")
  return bytes(data)


class ByteTokenizer(Tokenizer):
  """256 tokens; token id = byte value."""

  kind = "byte"
  vocab_size = 256

  def encode(self, data: bytes) -> np.ndarray:
    return np.frombuffer(_as_bytes(data), np.uint8).astype(np.int32)

  def decode(self, ids: Any) -> bytes:
    return self._checked_ids(ids).astype(np.uint8).tobytes()

  def token_bytes(self, id: int) -> bytes:
    return bytes([self._check_id(id)])


def _utf8_segments(data: bytes) -> Iterator[tuple[bool, str | bytes]]:
  """`data` as (True, valid UTF-8 run as str) and (False, bytes that are not valid UTF-8)."""
  text = data.decode("utf-8", "surrogateescape")
  for i, part in enumerate(_ESCAPED.split(text)):
    if i % 2:
      yield False, part.encode("utf-8", "surrogateescape")
    elif part:
      yield True, part


def _pieces(run: str) -> Iterator[str]:
  """`run` cut into pieces of about `_PIECE_CHARS` at pre-token boundaries (`_CUT`)."""
  pos = 0
  while len(run) - pos > _PIECE_CHARS:
    cut = _CUT.search(run, pos + _PIECE_CHARS)
    if cut is None:
      break
    yield run[pos : cut.end()]
    pos = cut.end()
  yield run[pos:]


class BPETokenizer(Tokenizer):
  """Byte-level BPE around a `tokenizers.Tokenizer` (see the module docstring)."""

  kind = "bpe"

  def __init__(self, hf: Any):
    self.hf = hf
    self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
    table: list[bytes | None] = [None] * self.vocab_size
    for token, id in hf.get_vocab(with_added_tokens=True).items():
      if any(c not in CHAR_TO_BYTE for c in token):
        raise TokenizerError(f"token {id} ({token!r}) is not a byte-level BPE token.")
      table[id] = bytes(CHAR_TO_BYTE[c] for c in token)
    if any(t is None for t in table):
      raise TokenizerError(f"token ids are not contiguous in [0, {self.vocab_size}).")
    single = {t[0]: id for id, t in enumerate(table) if len(t) == 1}
    missing = sorted(set(range(256)) - set(single))
    if missing:
      raise TokenizerError(
          f"{len(missing)} of the 256 single bytes have no token (e.g. byte "
          f"{missing[0]}): it cannot encode every input."
      )
    self._table: list[bytes] = table
    self._flat = np.frombuffer(b"".join(table), np.uint8)  # every token's bytes, in id order
    self._lengths = np.array([len(t) for t in table], np.int64)
    self._starts = np.cumsum(self._lengths) - self._lengths
    self._byte_ids = np.array([single[b] for b in range(256)], np.int32)

  def encode(self, data: bytes) -> np.ndarray:
    texts: list[str] = []
    segments: list[range | np.ndarray] = []  # pieces of `texts` (a UTF-8 run) or byte-token ids
    for valid, part in _utf8_segments(_as_bytes(data)):
      if valid:
        start = len(texts)
        texts.extend(_pieces(part))
        segments.append(range(start, len(texts)))
      else:
        segments.append(self._byte_ids[np.frombuffer(part, np.uint8)])
    encoded = self.hf.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    arrays = []
    for seg in segments:
      if isinstance(seg, range):
        arrays.extend(np.asarray(encoded[i].ids, np.int32) for i in seg)
      else:
        arrays.append(seg)
    return np.concatenate(arrays) if arrays else np.zeros((0,), np.int32)

  def decode(self, ids: Any) -> bytes:
    ids = self._checked_ids(ids)
    lengths = self._lengths[ids]
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1]) if ids.size else 0) + np.repeat(
        self._starts[ids] - (ends - lengths), lengths
    )
    return self._flat[index].tobytes()

  def token_bytes(self, id: int) -> bytes:
    return self._table[self._check_id(id)]

  def _payload(self) -> dict[str, Any]:
    return {**super()._payload(), "tokenizers": json.loads(self.hf.to_str())}


def resolve_vocab_size(kind: str, vocab_size: int) -> int:
  """The vocabulary size `train_tokenizer(kind, ..., vocab_size)` builds (0 = the kind's default:
  byte 256, bpe 4096); TokenizerError for an unknown kind or a size the kind cannot have."""
  if kind not in KINDS:
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {list(KINDS)}.")
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
    raise TokenizerError(f"vocab_size must be an int; got {vocab_size!r}.")
  vocab_size = int(vocab_size) or DEFAULT_VOCAB_SIZE[kind]
  if kind == "byte" and vocab_size != 256:
    raise TokenizerError(
        f"a byte tokenizer has exactly 256 tokens; got vocab_size={vocab_size} (use 0 or 256, "
        "or kind 'bpe')."
    )
  if kind == "bpe" and vocab_size <= 256:
    raise TokenizerError(
        f"a bpe tokenizer needs vocab_size > 256 (the 256 bytes + merges); got {vocab_size}."
    )
  return vocab_size


def _training_strings(texts: Iterable[bytes]) -> Iterator[str]:
  for i, data in enumerate(texts):
    for valid, part in _utf8_segments(_as_bytes(data, f"train_tokenizer text {i}")):
      if valid:
        yield from _pieces(part)


def train_tokenizer(kind: str, texts: Iterable[bytes], vocab_size: int) -> Tokenizer:
  """A tokenizer of `kind` with exactly `vocab_size` tokens (0 = the default), trained on `texts`.

  texts: the training split as bytes (any chunking; read once). Bytes that are not valid UTF-8
  are skipped for training (they always get their single-byte tokens). Deterministic: the same
  texts give the same tokenizer. TokenizerError if the texts yield fewer merges than needed.
  """
  vocab_size = resolve_vocab_size(kind, vocab_size)
  if kind == "byte":
    return ByteTokenizer()
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

  hf = HFTokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=[],
  )
  hf.train_from_iterator(_training_strings(texts), trainer)
  got = hf.get_vocab_size(with_added_tokens=True)
  if got != vocab_size:
    raise TokenizerError(
        f"the training texts yield only {got} BPE tokens (256 bytes + {got - 256} merges), "
        f"fewer than vocab_size={vocab_size}: lower vocab_size or train on more text."
    )
  return BPETokenizer(hf)


def _is_byte_level_bpe(spec: dict[str, Any]) -> bool:
  """Whether a `tokenizers` JSON is this module's recipe (see the module docstring)."""
  return (
      (spec.get("model") or {}).get("type") == "BPE"
      and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
      and spec.get("normalizer") is None
      and not spec.get("added_tokens")
  )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer saved at `path` by `Tokenizer.save`; TokenizerError naming the file otherwise."""
  path = pathlib.Path(path)
  try:
    payload = json.loads(path.read_text())
  except FileNotFoundError:
    raise TokenizerError(f"tokenizer file {path} does not exist.") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f"tokenizer file {path} is unreadable: {e}") from None
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise TokenizerError(f"tokenizer file {path} is not a {FORMAT} file (no 'format': {FORMAT!r}).")
  if payload.get("version") != VERSION:
    raise TokenizerError(
        f"tokenizer file {path} has format version {payload.get('version')!r}; this library "
        f"reads version {VERSION}."
    )
  kind = payload.get("kind")
  if kind not in KINDS:
    raise TokenizerError(
        f"tokenizer file {path} has kind {kind!r}; known kinds: {', '.join(KINDS)}."
    )
  try:
    if kind == "byte":
      tok = ByteTokenizer()
    else:
      from tokenizers import Tokenizer as HFTokenizer

      spec = payload.get("tokenizers")
      if not isinstance(spec, dict):
        raise TokenizerError("it has no 'tokenizers' object")
      if not _is_byte_level_bpe(spec):
        raise TokenizerError("it is not a byte-level BPE without normalizer or added tokens")
      try:
        hf = HFTokenizer.from_str(json.dumps(spec))
      except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise TokenizerError(f"tokenizers cannot read it ({e})") from None
      tok = BPETokenizer(hf)
  except TokenizerError as e:
    raise TokenizerError(f"tokenizer file {path}: {str(e).rstrip('.')}.") from None
  if payload.get("vocab_size") != tok.vocab_size:
    raise TokenizerError(
        f"tokenizer file {path} says vocab_size {payload.get('vocab_size')!r} but holds "
        f"{tok.vocab_size} tokens."
    )
  tok.path = path
  return tok


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
  """TokenizerError unless `tokenizer` has exactly the model's `vocab_size` tokens (`where`:
  the model, e.g. its folder, named in the message)."""
  if tokenizer.vocab_size != int(model_vocab_size):
    name = tokenizer.path or f"({tokenizer.kind}, not saved)"
    raise TokenizerError(
        f"tokenizer {name} has {tokenizer.vocab_size} tokens, model {where} has vocab_size "
        f"{int(model_vocab_size)}."
    )
