"""Function -> docstring summary: a real seq2seq task built offline from the standard library.

`run(config, workdir)` (config: configs/seq2seq.py):
  1. parse every stdlib .py file with `ast` (files split into train/valid/test by path hash, as in
     the LM experiment); each function with a docstring gives one pair: source = the function
     unparsed without its docstring (first `source_bytes` bytes), target = the docstring's first
     line (`min..max_target_bytes`);
  2. train a byte-level `EncoderDecoder` (teacher forcing, validation loss selects the step);
  3. generate summaries for the test functions (greedy, or beam search with `beam_width` > 1;
     encoder run once, cached cross-attention);
  4. score chrF (character n-grams 1..6, beta 2, corpus level) and exact match next to a
     nearest-neighbour baseline (TF-IDF of the source's character 3-5-grams, cosine; the nearest
     training function's summary); results.json + seq2seq.png;
  5. save the selected checkpoint's model to `workdir/model` (`models/saving.py`; metadata: the
     byte vocabulary's PAD / BOS / EOS ids, the source / target lengths and the test scores),
     recorded as `results["model_dir"]`.
"""

from __future__ import annotations

import ast
import collections
import copy
import json
import textwrap
import pathlib
from typing import Any

import numpy as np

from nexus_jax.data.datasets import text
from nexus_jax.inference.generate import beam_search, generate
from nexus_jax.models.saving import save_model
from nexus_jax.train import distributed
from nexus_jax.models.seq_objectives import seq2seq_objective
from nexus_jax.models.transformer import EncoderDecoder
from nexus_jax.train.config import compute_dtype
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.plots import plot_learning_curves

PAD, BOS, EOS, VOCAB = 256, 257, 258, 259


def function_pairs(source: str, source_bytes: int, min_target: int, max_target: int):
  """(function text without its docstring, first docstring line) for each documented function.

  The text is the function's own source lines (dedented), docstring lines dropped, cut to
  `source_bytes` bytes.
  """
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  lines = source.splitlines()
  pairs = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node)
    if not doc or not doc.strip() or len(node.body) < 2:
      continue
    summary = doc.strip().splitlines()[0].strip()
    if not min_target <= len(summary.encode()) <= max_target:
      continue
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    head = lines[first - 1 : node.body[0].lineno - 1]
    body = lines[node.body[0].end_lineno : node.end_lineno]
    code = textwrap.dedent("\n".join(head + body))
    pairs.append((code.encode()[:source_bytes].decode("utf-8", "ignore"), summary))
  return pairs


def load_pairs(dc) -> dict[str, list[tuple[str, str]]]:
  root = text.stdlib_dir()
  out = {s: [] for s in text.SPLITS}
  files = text.list_files(root, exclude=tuple(dc.exclude))
  for rel in files[: int(dc.max_files)] if dc.max_files else files:
    split = text.split_of(rel, dc.valid_fraction, dc.test_fraction)
    src = (root / rel).read_text("utf-8", "ignore")
    out[split] += function_pairs(
        src, int(dc.source_bytes), int(dc.min_target_bytes), int(dc.max_target_bytes)
    )
  rng = np.random.default_rng(0)
  for split, limit in (("valid", dc.max_eval), ("test", dc.max_eval)):
    if limit and len(out[split]) > limit:
      keep = np.sort(rng.choice(len(out[split]), int(limit), replace=False))
      out[split] = [out[split][i] for i in keep]
  return out


def encode(pairs, source_bytes: int, target_bytes: int) -> dict[str, np.ndarray]:
  n = len(pairs)
  source = np.full((n, source_bytes), PAD, np.int32)
  targets = np.full((n, target_bytes + 2), PAD, np.int32)
  for i, (s, t) in enumerate(pairs):
    sb, tb = list(s.encode())[:source_bytes], [BOS, *t.encode()[:target_bytes], EOS]
    source[i, : len(sb)], targets[i, : len(tb)] = sb, tb
  return {
      "source": source,
      "source_mask": source != PAD,
      "targets": targets,
      "target_mask": targets != PAD,
  }


def chrf(hypotheses, references, max_n: int = 6, beta: float = 2.0) -> float:
  """Corpus-level chrF (Popovic 2015), spaces removed, as sacrebleu's default; 0..100."""
  match, hyp_total, ref_total = np.zeros(max_n), np.zeros(max_n), np.zeros(max_n)
  for h, r in zip(hypotheses, references):
    h, r = h.replace(" ", ""), r.replace(" ", "")
    for n in range(1, max_n + 1):
      hc = collections.Counter(h[i : i + n] for i in range(len(h) - n + 1))
      rc = collections.Counter(r[i : i + n] for i in range(len(r) - n + 1))
      match[n - 1] += sum((hc & rc).values())
      hyp_total[n - 1] += sum(hc.values())
      ref_total[n - 1] += sum(rc.values())
  p = np.where(hyp_total > 0, match / np.maximum(hyp_total, 1), 0).mean()
  r = np.where(ref_total > 0, match / np.maximum(ref_total, 1), 0).mean()
  return 0.0 if p + r == 0 else float(100 * (1 + beta**2) * p * r / (beta**2 * p + r))


def retrieval_baseline(train, test) -> list[str]:
  from sklearn.feature_extraction.text import TfidfVectorizer

  vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True)
  x_train = vec.fit_transform([s for s, _ in train])
  x_test = vec.transform([s for s, _ in test])
  nearest = np.asarray((x_test @ x_train.T).argmax(1)).reshape(-1)
  return [train[i][1] for i in nearest]


def model_summaries(model, params, data, config) -> list[str]:
  sc, out = config.generate, []
  bs = int(config.train.batch_size)
  for i in range(0, len(data["source"]), bs):
    src, mask = data["source"][i : i + bs], data["source_mask"][i : i + bs]
    n = len(src)
    if n < bs:  # keep one compiled shape
      src, mask = (np.concatenate([x, np.repeat(x[-1:], bs - n, 0)]) for x in (src, mask))
    kw = dict(
        max_new_tokens=int(config.data.max_target_bytes) + 1,
        stop_tokens=(EOS,),
        pad_id=PAD,
        source=src,
        source_mask=mask,
    )
    if int(sc.beam_width) > 1:
      res = beam_search(
          model,
          params,
          [[BOS]] * bs,
          beam_width=int(sc.beam_width),
          length_penalty=float(sc.length_penalty),
          **kw,
      )
      rows = res.tokens[:, 0]
    else:
      rows = generate(model, params, [[BOS]] * bs, **kw).tokens
    for row in rows[:n]:
      out.append(bytes(t for t in row.tolist() if t < 256).decode("utf-8", "replace").strip())
  return out


def build_model(mc, dtype=None) -> EncoderDecoder:
  """The byte-level encoder-decoder of `config.model` with compute `dtype` (`train.compute_dtype`)."""
  return EncoderDecoder(
      dtype=dtype,
      vocab_size=VOCAB,
      num_layers=mc.num_decoder_layers,
      num_encoder_layers=mc.num_encoder_layers,
      embed_dim=mc.embed_dim,
      num_heads=mc.num_heads,
      num_kv_heads=mc.num_kv_heads,
      mlp_dim=mc.mlp_dim,
      dropout_rate=mc.dropout_rate,
      tie_embeddings=True,
  )


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  dc, mc = config.data, config.model
  pairs = load_pairs(dc)
  arrays = {s: encode(p, int(dc.source_bytes), int(dc.max_target_bytes)) for s, p in pairs.items()}
  model = build_model(config.model, compute_dtype(config.train.compute_dtype))
  bs = int(config.train.batch_size)
  train = ArrayDataset(arrays["train"], bs, seed=int(config.seed))
  result = fit(seq2seq_objective(model), train, ArrayDataset(arrays["valid"], bs), config, workdir)
  state = restore_best(result)
  test_refs = [t for _, t in pairs["test"]]
  hyps = model_summaries(model, state.params, arrays["test"], config)
  nn_hyps = retrieval_baseline(pairs["train"], pairs["test"])
  score = lambda h: {
      "chrf": round(chrf(h, test_refs), 2),
      "exact_match": round(float(np.mean([a == b for a, b in zip(h, test_refs)])), 4),
  }
  results = {
      "test": {"transformer": score(hyps), "nearest_neighbour": score(nn_hyps)},
      "pairs": {s: len(p) for s, p in pairs.items()},
      "best_step": result.best_step,
      "train_seconds": round(result.train_seconds, 1),
      "examples": [
          {"reference": r, "transformer": h, "nearest_neighbour": n}
          for r, h, n in list(zip(test_refs, hyps, nn_hyps))[:8]
      ],
  }
  metadata = {
      "experiment": "seq2seq",
      "best_step": result.best_step,
      "tokens": {"pad": PAD, "bos": BOS, "eos": EOS},
      "source_bytes": int(dc.source_bytes),
      "max_target_bytes": int(dc.max_target_bytes),
      "test": results["test"],
  }
  variables = distributed.host_local(state.variables())  # every process (a gather)
  results["model_dir"] = str(workdir / "model")
  if distributed.is_primary():  # across processes only process 0 writes files
    model_dir = save_model(workdir / "model", model, variables, metadata=metadata, overwrite=True)
    results["model_dir"] = str(model_dir)
    plot_learning_curves(workdir, valid_metric="accuracy", filename="seq2seq.png")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results
