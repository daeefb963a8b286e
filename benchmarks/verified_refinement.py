"""Verified refinement vs single-shot vs best-of-n at the same token budget: missing-line repair.

    python benchmarks/verified_refinement.py [--steps 300] [--problems 50] [--token_budget 160]

Trains a byte-level `LanguageModel` on the standard library's .py sources (training split only):
plain random windows, mixed (`--sft_fraction` of each batch) with supervised line completions
built from training-split files, half plain (context -> line) and half in the refinement format of
`nexus_jax.inference.refine` (a corrupted attempt that fails to compile + its compiler message +
context -> the correct line), so conditioning on a failed attempt can be learned.

Problems come from held-out test-split files: a top-level def/class block (4-30 lines, compiles
alone) with one non-blank line removed; the model sees the file up to that line and writes one
line. The verifier is external: `compile(block with the line inserted, "<x>", "exec")`, plus
"not blank". Methods share the token budget (generated tokens) and the per-round cap:
  single      one sample (round 1 of both loops below: the same key, so the same sample)
  best_of_n   independent samples until one compiles or the budget is spent
  refine      each round sees the previous attempt and the compiler message
Reports compile rate, mean generated / prompt tokens, exact match with the removed line, the
compile rate of a `pass` placeholder (how much is syntax alone), and paired bootstrap 95%
intervals of the compile-rate gains. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention_memory import machine_info  # noqa: E402
from benchmarks.lm_training import lm_optimizer, make_train_step  # noqa: E402
from nexus_jax.data.datasets import text  # noqa: E402
from nexus_jax.inference.generate import Sampling  # noqa: E402
from nexus_jax.inference.refine import best_of_n, refine, refine_header  # noqa: E402
from nexus_jax.models.lm import LanguageModel, count_params  # noqa: E402
from nexus_jax.models.seq_objectives import token_cross_entropy  # noqa: E402

NEWLINE = 10


def blocks_of(source: str):
  """(start, end) 0-based line ranges of top-level defs/classes with 4-30 lines."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  out = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
      if 4 <= node.end_lineno - start <= 30:
        out.append((start, node.end_lineno))
  return out


def make_problems(files, count, seed, context_chars):
  """Missing-line problems: dicts with context (file up to the line), the line, block halves."""
  rng = np.random.default_rng(seed)
  root = text.stdlib_dir()
  cands = []
  for f in files:
    try:
      src = (root / f).read_text("utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    lines = src.splitlines(keepends=True)
    for start, end in blocks_of(src):
      if all(ln.endswith("\n") for ln in lines[start:end]):
        cands.append((lines, start, end))
  problems = []
  for j in rng.permutation(len(cands)):
    lines, start, end = cands[j]
    block = lines[start:end]
    try:
      compile("".join(block), "<x>", "exec")
    except (SyntaxError, ValueError):
      continue
    rows = [i for i, ln in enumerate(block) if ln.strip() and len(ln) < 80]
    if not rows:
      continue
    i = int(rng.choice(rows))
    context = "".join(lines[: start + i])[-context_chars:]
    if len(context) < context_chars // 2:
      continue
    problems.append(
        dict(
            context=context,
            line=block[i][:-1],
            before="".join(block[:i]),
            after="".join(block[i + 1 :]),
            row=i,
        )
    )
    if len(problems) == count:
      break
  return problems


def verifier(p):
  """compile() of the block with `attempt` as the missing line -> (ok, message)."""

  def verify(attempt):
    if not attempt.strip():
      return False, "blank line"
    try:
      compile(p["before"] + attempt + "\n" + p["after"], "<x>", "exec")
      return True, "compiles"
    except SyntaxError as e:
      rel = (e.lineno or p["row"] + 1) - (p["row"] + 1)
      return False, f"{e.msg} (line {rel:+d} from the attempt)"
    except ValueError as e:  # e.g. a null byte
      return False, str(e)

  return verify


def corrupt(line, rng):
  """A plausible broken version of `line` (truncated, a character dropped, re-indented)."""
  kind = rng.integers(4)
  if kind == 0 and len(line.strip()) > 2:
    return line[: rng.integers(len(line) - len(line.lstrip()) + 1, len(line))]
  if kind == 1 and len(line) > 1:
    k = rng.integers(len(line))
    return line[:k] + line[k + 1 :]
  if kind == 2:
    return "    " + line
  return line[4:] if line.startswith("    ") else line + ")"


def sft_examples(problems, seed, prompt_len, seq):
  """[N, seq + 1] ids and [N, seq] target masks: prompt (exactly prompt_len tokens) + line + \\n;
  every other example has a refinement header with a corrupted attempt that fails to compile."""
  rng = np.random.default_rng(seed)
  ids, masks = [], []
  for k, p in enumerate(problems):
    head = ""
    if k % 2:
      attempt = corrupt(p["line"], rng)
      ok, msg = verifier(p)(attempt)
      if ok:
        continue
      head = refine_header(attempt, msg)
    h, c = list(head.encode()), list(p["context"].encode())
    answer = list((p["line"] + "\n").encode())
    if len(h) + len(c) < prompt_len or prompt_len + len(answer) > seq + 1:
      continue
    row = h + c[len(c) - (prompt_len - len(h)) :] + answer
    m = np.zeros(seq, np.float32)
    m[prompt_len - 1 : len(row) - 1] = 1.0  # predict the answer bytes only
    ids.append(row + [0] * (seq + 1 - len(row)))
    masks.append(m)
  return np.asarray(ids, np.int32), np.stack(masks)


def train(model, data, sft, args):
  """AdamW on random windows, `sft_fraction` of each batch replaced by SFT rows."""
  n_sft = int(round(args.batch * args.sft_fraction)) if len(sft[0]) else 0
  windows = text.random_windows(data, args.seq + 1, args.steps * args.batch, 0).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(windows[:1, :-1]))["params"]
  tx = lm_optimizer(args.steps, lr=args.lr)

  def loss_fn(p, tokens, mask):
    logits, _ = model.apply({"params": p}, tokens[:, :-1])
    loss = token_cross_entropy(logits, tokens[:, 1:], mask)[0]
    return loss, loss

  step = jax.jit(make_train_step(loss_fn, tx))

  rng = np.random.default_rng(1)
  opt, losses = tx.init(params), []
  for i in range(args.steps):
    tok = windows[i * args.batch : (i + 1) * args.batch].copy()
    mask = np.ones((args.batch, args.seq), np.float32)
    if n_sft:
      pick = rng.integers(0, len(sft[0]), n_sft)
      tok[:n_sft], mask[:n_sft] = sft[0][pick], sft[1][pick]
    params, opt, loss = step(params, opt, jnp.asarray(tok), jnp.asarray(mask))
    losses.append(float(loss))
  return params, float(np.mean(losses[-20:]) / np.log(2))


def bootstrap_gain(a, b, reps=4000, seed=0):
  """Mean of a - b (paired per problem) and its percentile-bootstrap 95% interval."""
  d = np.asarray(a, float) - np.asarray(b, float)
  idx = np.random.default_rng(seed).integers(0, len(d), (reps, len(d)))
  means = d[idx].mean(1)
  return {
      "gain": round(float(d.mean()), 4),
      "ci95": [
          round(float(np.percentile(means, 2.5)), 4),
          round(float(np.percentile(means, 97.5)), 4),
      ],
  }


def summarize(results, problems):
  ok = np.array([r.accepted for r in results])
  exact = [
      r.accepted and r.answer.rstrip() == p["line"].rstrip() for r, p in zip(results, problems)
  ]
  return {
      "compile_rate": round(float(ok.mean()), 4),
      "exact_match": round(float(np.mean(exact)), 4),
      "mean_generated_tokens": round(float(np.mean([r.tokens_used for r in results])), 1),
      "mean_prompt_tokens": round(float(np.mean([r.prompt_tokens for r in results])), 1),
      "mean_rounds": round(float(np.mean([len(r.rounds) for r in results])), 2),
  }, ok


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--sft_fraction", type=float, default=0.5, help="0: plain LM training only")
  ap.add_argument("--sft_problems", type=int, default=4000)
  ap.add_argument("--problems", type=int, default=50)
  ap.add_argument("--max_new_tokens", type=int, default=48, help="per-round cap")
  ap.add_argument("--token_budget", type=int, default=160, help="generated tokens per problem")
  ap.add_argument("--max_rounds", type=int, default=8, help="also best-of-n's n")
  ap.add_argument("--temperature", type=float, default=0.8)
  args = ap.parse_args()

  t0 = time.perf_counter()
  splits, files = text.load_text_splits()
  prompt_len = args.seq - args.max_new_tokens
  train_problems = make_problems(files["train"], args.sft_problems, 1, 2 * args.seq)
  sft = sft_examples(train_problems, 2, prompt_len, args.seq)
  test_problems = make_problems(files["test"], args.problems, 3, 2 * args.seq)
  model = LanguageModel(
      vocab_size=256,
      num_layers=args.layers,
      embed_dim=args.dim,
      num_heads=max(args.dim // 32, 2),
      num_kv_heads=1,
      mlp_dim=4 * args.dim,
      num_experts=0,
  )
  t1 = time.perf_counter()
  params, bpb = train(model, splits["train"], sft, args)
  train_seconds = time.perf_counter() - t1

  kw = dict(
      token_budget=args.token_budget,
      max_new_tokens=args.max_new_tokens,
      sampling=Sampling(temperature=args.temperature),
      stop_tokens=(NEWLINE,),
      max_prompt_tokens=prompt_len,
  )
  t2 = time.perf_counter()
  ref, bon = [], []
  for i, p in enumerate(test_problems):
    key, verify = jax.random.PRNGKey(1000 + i), verifier(p)
    ref.append(
        refine(model, params, p["context"], verify, max_rounds=args.max_rounds, rng=key, **kw)
    )
    bon.append(best_of_n(model, params, p["context"], verify, n=args.max_rounds, rng=key, **kw))
  eval_seconds = time.perf_counter() - t2
  assert all(a.rounds[0].attempt == b.rounds[0].attempt for a, b in zip(ref, bon))

  single = [first_round(r) for r in bon]
  table, oks = {}, {}
  for name, res in (("single", single), ("best_of_n", bon), ("refine", ref)):
    table[name], oks[name] = summarize(res, test_problems)
  placeholder = np.mean(
      [
          verifier(p)(p["line"][: len(p["line"]) - len(p["line"].lstrip())] + "pass")[0]
          for p in test_problems
      ]
  )
  print(
      json.dumps(
          {
              "benchmark": "verified_refinement",
              "machine": machine_info(),
              "note": "CPU shared with other jobs; times are inflated and noisy",
              "config": {**vars(args), "params": count_params(params), "prompt_tokens": prompt_len},
              "data": {
                  "sft_examples": int(len(sft[0])),
                  "test_problems": len(test_problems),
                  "placeholder_pass_compile_rate": round(float(placeholder), 4),
              },
              "training": {
                  "train_bits_per_byte_last20": round(bpb, 3),
                  "seconds": round(train_seconds, 1),
              },
              "results": table,
              "refine_vs_single": bootstrap_gain(oks["refine"], oks["single"]),
              "refine_vs_best_of_n": bootstrap_gain(oks["refine"], oks["best_of_n"]),
              "best_of_n_vs_single": bootstrap_gain(oks["best_of_n"], oks["single"]),
              "refine_rounds_accepted_at": np.bincount(
                  [len(r.rounds) for r in ref if r.accepted], minlength=args.max_rounds + 1
              )[1:].tolist(),
              "seconds": {"setup": round(t1 - t0, 1), "eval": round(eval_seconds, 1)},
          }
      )
  )


def first_round(result):
  """Single-shot sampling read off a loop's first round (the same key and prompt)."""
  first = result.rounds[0]
  return dataclasses.replace(
      result,
      rounds=(first,),
      stop_reason="accepted" if first.verdict.ok else "max_rounds",
      tokens_used=first.new_tokens,
      prompt_tokens=first.prompt_tokens,
  )


if __name__ == "__main__":
  main()
