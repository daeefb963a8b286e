"""Byte-level language modelling: MoE LM vs a dense LM with equal active params vs xz -9e.

`run(config, workdir)` (config: configs/lm.py):
  1. read the corpus (stdlib .py files by default), split by file-path hash;
  2. train the MoE `LanguageModel` and, with the same batches, its `dense_equivalent`
     (workdir/moe, workdir/dense; rerunning resumes), selecting the best validation checkpoint;
  3. score `data.test_bytes` test bytes: bits/byte of each model and of lzma preset 9|EXTREME
     (what `xz -9e` does) on exactly those bytes;
  4. sample text from the MoE model; write results.json and lm_curves.png.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax

from nexus_jax.data.datasets import text
from nexus_jax.data.datasets.byte_lm import load_byte_lm_data, xz_bits_per_byte
from nexus_jax.inference.generate import Sampling, generate
from nexus_jax.models.lm import active_params, count_params, dense_equivalent, lm_from_config
from nexus_jax.models.seq_objectives import lm_objective
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.metrics import read_metrics


def _plot(workdir: pathlib.Path, runs: dict[str, pathlib.Path], xz: float) -> pathlib.Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, path) in enumerate(runs.items()):
    train, valid = read_metrics(path, "train"), read_metrics(path, "valid")
    ax.plot(
        [r["step"] for r in train],
        [r["bits_per_token"] for r in train],
        color=f"C{i}",
        alpha=0.5,
        label=f"{name} train",
    )
    ax.plot(
        [r["step"] for r in valid],
        [r["bits_per_token"] for r in valid],
        "o-",
        color=f"C{i}",
        label=f"{name} valid",
    )
  ax.axhline(xz, color="k", ls="--", label="xz -9e (test bytes)")
  ax.set_xlabel("step"), ax.set_ylabel("bits / byte"), ax.grid(alpha=0.3), ax.legend()
  fig.tight_layout()
  out = workdir / "lm_curves.png"
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def sample_and_corpus_report(
    config: Any, generate_fn: Any, files: dict, splits: dict, test_bytes: Any, data_seconds: float
) -> dict[str, Any]:
  """A text sample from `generate_fn(prompts, max_new_tokens=, rng=, sampling=)` plus corpus facts.

  Shared by the byte-level LM experiments (lm, hybrid); keys: sample, sample_seconds, corpus, preset.
  """
  t1 = time.perf_counter()
  prompt = list(config.sample.prompt.encode())
  out = generate_fn(
      [prompt],
      max_new_tokens=int(config.sample.num_bytes),
      rng=jax.random.PRNGKey(int(config.seed)),
      sampling=Sampling(
          temperature=float(config.sample.temperature), top_p=float(config.sample.top_p)
      ),
  )
  sample = bytes(prompt + out.tokens[0, : out.lengths[0]].tolist()).decode("utf-8", "replace")
  return {
      "sample": sample,
      "sample_seconds": round(time.perf_counter() - t1, 2),
      "corpus": {
          "root": config.data.root or str(text.stdlib_dir()),
          "files": {s: len(f) for s, f in files.items()},
          "bytes": {s: int(len(d)) for s, d in splits.items()},
          "test_bytes_scored": len(test_bytes) - 1,
          "data_seconds": round(data_seconds, 2),
      },
      "preset": config.preset,
  }


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  splits, files, train, valid, test, test_bytes, data_seconds = load_byte_lm_data(config)
  seq = int(config.data.seq_len)

  moe = lm_from_config(config.model)
  models = {"moe": moe}
  if config.model.train_dense_baseline:
    models["dense"] = dense_equivalent(moe)
  results: dict[str, Any] = {"test_bits_per_byte": {}, "params": {}, "train": {}}
  states = {}
  for name, model in models.items():
    fit_result = fit(lm_objective(model), train, valid, config, workdir / name)
    state = restore_best(fit_result)
    states[name] = state
    metrics, _ = fit_result.trainer.evaluate(state, test)
    results["test_bits_per_byte"][name] = metrics["loss"] / math.log(2.0)
    results["params"][name] = {
        "total": count_params(state.params),
        "active_per_byte": active_params(model, state.params),
    }
    results["train"][name] = {
        "best_step": fit_result.best_step,
        "train_seconds": round(fit_result.train_seconds, 1),
        "bytes_per_second": round(fit_result.rows_per_second * seq, 1),
    }
  xz = xz_bits_per_byte(test_bytes)
  results["test_bits_per_byte"]["xz_9e"] = xz

  results.update(
      sample_and_corpus_report(
          config,
          lambda *args, **kw: generate(moe, states["moe"].params, *args, **kw),
          files,
          splits,
          test_bytes,
          data_seconds,
      )
  )
  results["plot"] = str(_plot(workdir, {n: workdir / n for n in models}, xz))
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results
