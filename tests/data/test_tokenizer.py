"""Byte and byte-level BPE tokenizers: lossless on any bytes, exact vocabulary, deterministic,
saved as one JSON file, and one-line errors for bad files / sizes."""

import functools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import pre_tokenizers

from nexus_jax.data.datasets import text
from nexus_jax.data.tokenizer import (
    BYTE_TO_CHAR,
    BPETokenizer,
    ByteTokenizer,
    TokenizerError,
    check_vocab,
    load_tokenizer,
    resolve_vocab_size,
    train_tokenizer,
)

FIXED = [
    b"",
    b"\x00",
    b"\xff",
    b"\xc3",  # a truncated 2-byte UTF-8 character
    b"caf\xc3\xa9 \xe9t\xe9\n",  # valid "é", then latin-1 bytes
    "naïve 😀 — ok".encode(),
    b"\xed\xa0\x80",  # an encoded surrogate: not valid UTF-8
    b"def f(x):\r\n\treturn x  \n\n\n# \x1c\x85 trailing   ",
    bytes(range(256)) * 2,
]


@functools.cache
def _corpus() -> bytes:
  """About 300 KB of the stdlib's training split."""
  splits, _ = text.load_text_splits(None)
  return splits["train"][:300_000].tobytes()


@functools.cache
def _bpe(vocab_size: int = 600) -> BPETokenizer:
  return train_tokenizer("bpe", [_corpus()], vocab_size)


def test_byte_tokenizer_is_the_identity():
  tok = ByteTokenizer()
  data = bytes(range(256))
  ids = tok.encode(data)
  assert tok.kind == "byte" and tok.vocab_size == 256
  assert ids.dtype == np.int32 and ids.tolist() == list(range(256))
  assert tok.decode(ids) == data and tok.token_bytes(65) == b"A"
  assert train_tokenizer("byte", [b"ignored"], 0).vocab_size == 256


@pytest.mark.parametrize("data", FIXED)
def test_bpe_round_trip_fixed_cases(data):
  tok = _bpe()
  ids = tok.encode(data)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert tok.decode(ids) == data
  assert b"".join(tok.token_bytes(int(i)) for i in ids) == data


@settings(max_examples=200)
@given(st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_bpe_round_trip_any_bytes(data):
  tok = _bpe()
  assert tok.decode(tok.encode(data)) == data


def test_bpe_merges_and_matches_one_stream_encoding():
  tok = _bpe()
  sample = _corpus()[:200_000]
  ids = tok.encode(sample)
  assert len(sample) / len(ids) > 2.0  # merges are used: > 2 bytes per token on Python source
  # Encoding in parallel pieces gives exactly the tokens of `tokenizers` on the whole string.
  whole = tok.hf.encode(sample.decode("utf-8"), add_special_tokens=False).ids
  np.testing.assert_array_equal(ids, whole)
  # Bytes that are not valid UTF-8 get their single-byte tokens.
  assert [tok.token_bytes(int(i)) for i in tok.encode(b"\xff\xfe")] == [b"\xff", b"\xfe"]


def test_exact_vocab_size_and_the_256_bytes():
  assert set(BYTE_TO_CHAR) == set(pre_tokenizers.ByteLevel.alphabet())
  for size in (257, 600):
    tok = _bpe(size)
    spelled = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert tok.vocab_size == size == len(set(spelled))  # distinct tokens, none special
    assert {t for t in spelled if len(t) == 1} == {bytes([b]) for b in range(256)}
  with pytest.raises(TokenizerError, match="yield only .* fewer than vocab_size=5000"):
    train_tokenizer("bpe", [b"tiny text, tiny text"], 5000)


def test_training_is_deterministic_and_save_load_round_trips(tmp_path):
  a = train_tokenizer("bpe", [_corpus()[:100_000]], 400)
  b = train_tokenizer("bpe", [_corpus()[:100_000]], 400)
  a.save(tmp_path / "a.json")
  b.save(tmp_path / "b.json")
  assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
  loaded = load_tokenizer(tmp_path / "a.json")
  assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == 400
  assert loaded.path == tmp_path / "a.json"
  sample = _corpus()[100_000:120_000] + b"\xff\x00"
  np.testing.assert_array_equal(loaded.encode(sample), a.encode(sample))
  ByteTokenizer().save(tmp_path / "byte.json")
  assert load_tokenizer(tmp_path / "byte.json").kind == "byte"


def test_bad_sizes_kinds_and_inputs():
  assert resolve_vocab_size("bpe", 0) == 4096 and resolve_vocab_size("byte", 256) == 256
  with pytest.raises(TokenizerError, match="byte tokenizer has exactly 256 tokens"):
    train_tokenizer("byte", [], 4096)
  with pytest.raises(TokenizerError, match="needs vocab_size > 256"):
    train_tokenizer("bpe", [b"x"], 256)
  with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
    train_tokenizer("wordpiece", [b"x"], 1000)
  with pytest.raises(TokenizerError, match="train_tokenizer text 0 takes bytes; got str"):
    train_tokenizer("bpe", ["a str"], 300)
  tok = _bpe()
  with pytest.raises(TokenizerError, match="encode takes bytes; got str"):
    tok.encode("text")
  with pytest.raises(TokenizerError, match="token id 600 is outside"):
    tok.decode([1, 600])
  with pytest.raises(TokenizerError, match="token id -1 is outside"):
    ByteTokenizer().token_bytes(-1)


def test_load_errors_name_the_file(tmp_path):
  missing = tmp_path / "missing.json"
  with pytest.raises(TokenizerError, match=f"tokenizer file {missing} does not exist"):
    load_tokenizer(missing)
  cases = {
      "junk.json": ("{not json", "is unreadable"),
      "other.json": (json.dumps({"model": {"type": "BPE"}}), "is not a nexus_jax.tokenizer file"),
      "kind.json": (
          json.dumps({"format": "nexus_jax.tokenizer", "version": 1, "kind": "unigram"}),
          "has kind 'unigram'; known kinds: byte, bpe",
      ),
      "version.json": (
          json.dumps({"format": "nexus_jax.tokenizer", "version": 9, "kind": "byte"}),
          "has format version 9",
      ),
  }
  for name, (content, message) in cases.items():
    (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerError, match=f"tokenizer file {tmp_path / name} {message}"):
      load_tokenizer(tmp_path / name)
  # A BPE whose 'tokenizers' entry is not this module's byte-level recipe.
  payload = json.loads(json.dumps(_bpe()._payload()))
  payload["tokenizers"]["pre_tokenizer"] = {"type": "Whitespace"}
  (tmp_path / "ws.json").write_text(json.dumps(payload))
  with pytest.raises(TokenizerError, match="ws.json: it is not a byte-level BPE"):
    load_tokenizer(tmp_path / "ws.json")
  payload = json.loads(json.dumps(_bpe()._payload()))
  payload["vocab_size"] = 4096
  (tmp_path / "size.json").write_text(json.dumps(payload))
  with pytest.raises(TokenizerError, match="says vocab_size 4096 but holds 600 tokens"):
    load_tokenizer(tmp_path / "size.json")


def test_check_vocab_message(tmp_path):
  tok = _bpe()
  check_vocab(tok, 600, "runs/lm/model")  # equal: no error
  (tmp_path / "tokenizer.json").write_text(json.dumps(tok._payload()))
  tok = load_tokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(TokenizerError) as e:
    check_vocab(tok, 8192, "runs/lm/model")
  assert str(e.value) == (
      f"tokenizer {tmp_path / 'tokenizer.json'} has 600 tokens, model runs/lm/model has "
      "vocab_size 8192."
  )
  with pytest.raises(TokenizerError, match=r"tokenizer \(byte, not saved\) has 256 tokens"):
    check_vocab(ByteTokenizer(), 4096, "m")
