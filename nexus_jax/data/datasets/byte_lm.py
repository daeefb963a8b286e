"""LM data of the lm and hybrid experiments (any tokenizer) and of the byte-level LM benchmarks.

    data = load_lm_data(config, workdir, run_dirs)   # tokenizer from config.data, kept in workdir
    data.test_bits_per_byte(lambda d: trainer.evaluate(state, d)[0]["loss"])
    xz_bits_per_byte(data.test_bytes[1:])            # the compression baseline on the same bytes
    splits, files, train, valid, test, test_bytes, seconds = load_byte_lm_data(config)  # bytes only

Bits per byte are comparable across tokenizers: `data.test_bytes` is the first `data.test_bytes`
bytes of the test split (all of it for 0); its first byte is context and every model scores
exactly the other bytes. The stream `encode(b[:1]) + encode(b[1:])` of those bytes `b` (one token,
then the rest encoded as one stream) is cut into windows of `seq_len + 1` tokens overlapping by one,
the last one right-padded and masked, so every token after the first is a target exactly once and
bits/byte = total nats / (log 2 * (len(test_bytes) - 1)).
"""

from __future__ import annotations

import dataclasses
import lzma
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from nexus_jax.data.datasets import text
from nexus_jax.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    resolve_vocab_size,
    train_tokenizer,
)
from nexus_jax.train.data import ArrayDataset

TOKENIZER_FILE = "tokenizer.json"


def xz_bits_per_byte(data: bytes) -> float:
  """8 * len(lzma.compress(data, preset=9 | PRESET_EXTREME)) / len(data)."""
  return 8.0 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


def eval_windows(data: np.ndarray, num_bytes: int, seq_len: int, batch: int) -> ArrayDataset:
  """Consecutive windows of `seq_len + 1` bytes of the first `num_bytes` (0 = all) of `data`."""
  data = data[:num_bytes] if num_bytes else data
  return ArrayDataset({"tokens": text.windows(data, seq_len + 1)}, batch)


def corpus_splits(dc: Any) -> tuple[dict, dict]:
  """(splits {name: uint8 bytes}, files {name: paths}) of a `config.data` section's corpus."""
  return text.load_text_splits(
      dc.root or None,
      pattern=dc.pattern,
      valid_fraction=dc.valid_fraction,
      test_fraction=dc.test_fraction,
  )


def load_byte_lm_data(
    config: Any,
) -> tuple[dict, dict, ArrayDataset, ArrayDataset, ArrayDataset, bytes, float]:
  """The byte-level LM data of `config.data` for the byte-level benchmarks (quantize_lm, ...;
  the experiments use `load_lm_data`): the test windows end at the last full window.

  Returns (splits {name: uint8 bytes}, files {name: paths}, train (random windows of seq_len + 1,
  num_steps * batch_size of them), valid, test (consecutive windows), the test bytes scored, seconds).
  """
  dc, tc = config.data, config.train
  t0 = time.perf_counter()
  splits, files = corpus_splits(dc)
  seq, bs = int(dc.seq_len), int(tc.batch_size)
  train = ArrayDataset(
      {
          "tokens": text.random_windows(
              splits["train"], seq + 1, int(tc.num_steps) * bs, int(config.seed)
          )
      },
      bs,
      seed=int(config.seed),
  )
  valid = eval_windows(splits["valid"], int(dc.valid_bytes), seq, bs)
  test = eval_windows(splits["test"], int(dc.test_bytes), seq, bs)
  scored = test.arrays["tokens"]
  test_bytes = np.concatenate([scored[0], scored[1:, 1:].reshape(-1)]).tobytes()
  return splits, files, train, valid, test, test_bytes, time.perf_counter() - t0


def tokenizer_settings(data_config: Any) -> tuple[str, int]:
  """(kind, vocab size) of `config.data.tokenizer` / `config.data.vocab_size` (0 = the default)."""
  kind, vocab = data_config.tokenizer, data_config.vocab_size
  try:
    return kind, resolve_vocab_size(kind, vocab)
  except TokenizerError as e:
    raise TokenizerError(
        f"config.data.tokenizer={kind!r}, config.data.vocab_size={vocab!r}: {e}"
    ) from None


def workdir_tokenizer(
    data_config: Any, workdir: pathlib.Path, train_bytes: np.ndarray, run_dirs: Sequence = ()
) -> tuple[Tokenizer, float]:
  """(tokenizer, seconds spent training it): `workdir/tokenizer.json` when it exists (a resumed
  run; TokenizerError unless it matches `config.data`), else trained on `train_bytes` and saved
  there. `run_dirs`: the run's training folders; a run in one of them without a tokenizer.json
  was trained byte-level, so only `tokenizer="byte"` may resume it."""
  kind, vocab = tokenizer_settings(data_config)
  path = pathlib.Path(workdir) / TOKENIZER_FILE
  if path.exists():
    tok = load_tokenizer(path)
    if (tok.kind, tok.vocab_size) != (kind, vocab):
      raise TokenizerError(
          f"{path} is a {tok.kind} tokenizer with {tok.vocab_size} tokens but config.data asks "
          f"for tokenizer={kind!r} with {vocab}: rerun with the workdir's settings or use a new "
          "workdir."
      )
    return tok, 0.0
  earlier = [d for d in run_dirs if (pathlib.Path(d) / "metrics.jsonl").exists()]
  if earlier and kind != "byte":
    raise TokenizerError(
        f"{earlier[0]} holds a run trained before tokenizers (byte-level, no {path}); "
        f"config.data.tokenizer={kind!r} needs a new workdir."
    )
  t0 = time.perf_counter()
  tok = train_tokenizer(kind, [train_bytes.tobytes()], vocab)
  seconds = time.perf_counter() - t0
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(path)
  return tok, seconds


def scoring_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> list[ArrayDataset]:
  """Every target of `tokens [N]` once: `{"tokens", "mask"} [n, seq_len + 1]` int32 windows
  overlapping by one token, as [full windows] + [the right-padded, masked tail window alone] (alone
  so that the trainer's per-batch means stay means over equally many tokens)."""
  targets = len(tokens) - 1
  if targets < 1:
    raise ValueError(f"{len(tokens)} tokens hold no next-token target.")
  full = targets // seq_len
  out = []
  if full:
    w = text.windows(tokens, seq_len + 1, full)
    out.append(ArrayDataset({"tokens": w, "mask": np.ones_like(w)}, batch_size))
  rest = tokens[full * seq_len :]
  if len(rest) > 1:
    w = np.zeros((1, seq_len + 1), np.int32)
    w[0, : len(rest)] = rest
    mask = (np.arange(seq_len + 1) < len(rest)).astype(np.int32)[None]
    out.append(ArrayDataset({"tokens": w, "mask": mask}, batch_size))
  return out


@dataclasses.dataclass
class LMData:
  """The tokenized corpus of an LM experiment (`load_lm_data`)."""

  tokenizer: Tokenizer  # its file: `tokenizer.path` (workdir/tokenizer.json)
  splits: dict[str, np.ndarray]  # split -> bytes, uint8 [n]
  files: dict[str, list[str]]  # split -> relative file paths
  train: ArrayDataset  # tokens [num_steps * batch_size, seq_len + 1] int32, random windows
  # tokens + mask [n, seq_len + 1] int32: the full windows of the valid slice (the same structure
  # as `test`, so one compiled evaluation step serves both)
  valid: ArrayDataset
  test: list[ArrayDataset]  # scoring_windows of the test stream (tokens + mask)
  test_bytes: bytes  # byte 0 is context; the models and xz score test_bytes[1:]
  test_tokens: int  # tokens scored; their bytes are exactly test_bytes[1:]
  bytes_per_token: dict[str, float]  # train | valid | test
  seconds: dict[str, float]  # read (files), tokenizer (training; 0 when reused), encode

  def test_bits_per_byte(self, mean_nats: Callable[[ArrayDataset], float]) -> float:
    """Total test nats / (log 2 * scored bytes); `mean_nats(dataset)`: mean nats per target token
    of one of `self.test` (e.g. `lambda d: trainer.evaluate(state, d)[0]["loss"]`)."""
    nats = sum(float(mean_nats(d)) * int(d.arrays["mask"][:, 1:].sum()) for d in self.test)
    return nats / (math.log(2.0) * (len(self.test_bytes) - 1))

  def tokenizer_report(self) -> dict[str, Any]:
    """`results["tokenizer"]`: kind, vocab_size, file, bytes_per_token (of the test bytes)."""
    t = self.tokenizer
    return {
        "kind": t.kind,
        "vocab_size": t.vocab_size,
        "file": str(t.path),
        "bytes_per_token": round(self.bytes_per_token["test"], 4),
    }


def _slice(data: np.ndarray, num_bytes: int) -> np.ndarray:
  return data[:num_bytes] if num_bytes else data


def load_lm_data(config: Any, workdir: str | pathlib.Path, run_dirs: Sequence = ()) -> LMData:
  """`config.data`'s corpus, tokenized by `workdir_tokenizer` (see the module docstring).

  `data.seq_len` and the windows are in tokens; `data.valid_bytes` / `data.test_bytes` are bytes.
  """
  dc, tc = config.data, config.train
  tokenizer_settings(dc)  # a bad kind / vocab_size fails before the corpus is read
  t0 = time.perf_counter()
  splits, files = corpus_splits(dc)
  t1 = time.perf_counter()
  tok, tokenizer_seconds = workdir_tokenizer(dc, pathlib.Path(workdir), splits["train"], run_dirs)
  t2 = time.perf_counter()
  seq, bs = int(dc.seq_len), int(tc.batch_size)

  def encode(data: np.ndarray, what: str) -> np.ndarray:
    ids = tok.encode(data.tobytes())
    if len(ids) < seq + 1:
      raise ValueError(
          f"{what} ({len(data)} bytes) encodes to {len(ids)} tokens, too few for one window of "
          f"data.seq_len + 1 = {seq + 1} tokens."
      )
    return ids

  train_ids = encode(splits["train"], "the train split")
  valid_slice = _slice(splits["valid"], int(dc.valid_bytes))
  valid_ids = encode(valid_slice, "config.data.valid_bytes of the valid split")
  test_slice = _slice(splits["test"], int(dc.test_bytes))
  if len(test_slice) < 2:
    raise ValueError(f"config.data.test_bytes={dc.test_bytes} leaves {len(test_slice)} test bytes.")
  test_ids = np.concatenate(
      [tok.encode(test_slice[:1].tobytes()), tok.encode(test_slice[1:].tobytes())]
  )
  train = ArrayDataset(
      {"tokens": text.random_windows(train_ids, seq + 1, int(tc.num_steps) * bs, int(config.seed))},
      bs,
      seed=int(config.seed),
  )
  return LMData(
      tokenizer=tok,
      splits=splits,
      files=files,
      train=train,
      valid=scoring_windows(valid_ids, seq, bs)[0],
      test=scoring_windows(test_ids, seq, bs),
      test_bytes=test_slice.tobytes(),
      test_tokens=len(test_ids) - 1,
      bytes_per_token={
          "train": len(splits["train"]) / len(train_ids),
          "valid": len(valid_slice) / len(valid_ids),
          "test": (len(test_slice) - 1) / (len(test_ids) - 1),
      },
      seconds={
          "read": t1 - t0,
          "tokenizer": tokenizer_seconds,
          "encode": time.perf_counter() - t2,
      },
  )
