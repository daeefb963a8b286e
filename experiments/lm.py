"""Language modelling (bytes or BPE tokens): MoE LM vs a dense LM of equal active params vs xz -9e.

`run(config, workdir)` (config: configs/lm.py):
  1. read the corpus (stdlib .py files by default), split by file-path hash;
  2. tokenize it with `data.tokenizer` ("byte", or "bpe" with `data.vocab_size` tokens trained on
     the training split); the tokenizer is saved as workdir/tokenizer.json and reused on a rerun;
  3. train the MoE `LanguageModel` (vocab_size = the tokenizer's) and, with the same batches, its
     `dense_equivalent` (workdir/moe, workdir/dense; rerunning resumes), selecting the best
     validation checkpoint; with `train.init_from` the MoE model starts from a saved model
     folder (`nexus_jax/train/init_from.py`: same architecture and vocabulary required);
  4. score the `data.test_bytes` test bytes: bits/byte of each model (total test nats / (log 2 *
     bytes scored), so byte-level and BPE runs compare) and of lzma preset 9|EXTREME (what
     `xz -9e` does) on exactly those bytes (`nexus_jax/data/datasets/byte_lm.py`);
  5. sample text from the MoE model; write results.json and lm_curves.png.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import time
from typing import Any

import jax

from nexus_jax.data.datasets import text
from nexus_jax.data.datasets.byte_lm import LMData, load_lm_data, xz_bits_per_byte
from nexus_jax.inference.generate import Sampling, generate
from nexus_jax.models import compressive_lm
from nexus_jax.models.anytime import anytime_lm_objective
from nexus_jax.models.ponder_lm import ponder_lm_objective
from nexus_jax.models.lm import active_params, count_params, dense_equivalent, lm_from_config
from nexus_jax.models.saving import save_model
from nexus_jax.models.seq_objectives import lm_objective
from nexus_jax.train import distributed
from nexus_jax.train.config import compute_dtype
from nexus_jax.train.continual_fit import check_continual_config, run_domains
from nexus_jax.train.init_from import init_from_saved
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.metrics import read_metrics


def _plot(
    workdir: pathlib.Path, runs: dict[str, pathlib.Path], xz: float, bytes_per_token: dict
) -> pathlib.Path:
  """Train / valid bits per byte (logged bits per token / the split's bytes per token)."""
  from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for i, (name, path) in enumerate(runs.items()):
    for split, style in (("train", "-"), ("valid", "o-")):
      rows = read_metrics(path, split)
      ax.plot(
          [r["step"] for r in rows],
          [r["bits_per_token"] / bytes_per_token[split] for r in rows],
          style,
          color=f"C{i}",
          alpha=0.5 if split == "train" else 1.0,
          label=f"{name} {split}",
      )
  ax.axhline(xz, color="k", ls="--", label="xz -9e (test bytes)")
  ax.set_xlabel("step"), ax.set_ylabel("bits / byte"), ax.grid(alpha=0.3), ax.legend()
  fig.tight_layout()
  out = workdir / "lm_curves.png"
  fig.savefig(out, dpi=110)
  return out


def sample_and_corpus_report(config: Any, generate_fn: Any, data: LMData) -> dict[str, Any]:
  """A text sample from `generate_fn(prompts, max_new_tokens=, rng=, sampling=)` plus corpus facts.

  Shared by the LM experiments (lm, hybrid); keys: sample, sample_seconds, corpus, preset. The
  prompt is encoded and the sample decoded by `data.tokenizer`; `sample.num_bytes` bytes are
  generated (with BPE: num_bytes / the test bytes per token tokens, cut to num_bytes bytes).
  """
  t1 = time.perf_counter()
  tok = data.tokenizer
  prompt_bytes = config.sample.prompt.encode()
  if not prompt_bytes:
    raise ValueError("config.sample.prompt is empty: the sample needs a prompt to continue.")
  num_bytes = int(config.sample.num_bytes)
  # The sample's own uncertainty (inference/uncertainty.py), scored inside the decoding loop.
  scored = bool(config.sample.get("uncertainty", False))
  out = generate_fn(
      [tok.encode(prompt_bytes).tolist()],
      max_new_tokens=max(1, math.ceil(num_bytes / data.bytes_per_token["test"])),
      rng=jax.random.PRNGKey(int(config.seed)),
      sampling=Sampling(
          temperature=float(config.sample.temperature), top_p=float(config.sample.top_p)
      ),
      **({"return_uncertainty": True} if scored else {}),
  )
  continuation = tok.decode(out.tokens[0, : out.lengths[0]])[:num_bytes]
  report = {}
  if scored:
    seq = out.sequence
    report["sample_uncertainty"] = {
        "mean_nll_nats": round(float(seq.mean_nll[0]), 4),
        "mean_entropy_nats": round(float(seq.mean_entropy[0]), 4),
        "max_entropy_nats": round(float(seq.max_entropy[0]), 4),
        "min_token_prob": round(float(seq.min_max_prob[0]), 4),
        "tokens": int(seq.length[0]),
    }
  return {
      **report,
      "sample": (prompt_bytes + continuation).decode("utf-8", "replace"),
      "sample_seconds": round(time.perf_counter() - t1, 2),
      "corpus": {
          "root": config.data.root or str(text.stdlib_dir()),
          "files": {s: len(f) for s, f in data.files.items()},
          "bytes": {s: int(len(d)) for s, d in data.splits.items()},
          "test_bytes_scored": len(data.test_bytes) - 1,
          "test_tokens_scored": data.test_tokens,
          "bytes_per_token": {k: round(v, 4) for k, v in data.bytes_per_token.items()},
          "data_seconds": round(sum(data.seconds.values()), 2),
          "tokenizer_train_seconds": round(data.seconds["tokenizer"], 2),
      },
      "preset": config.preset,
  }


def save_trained_lm(
    path: pathlib.Path, model: Any, params: Any, data: LMData, config: Any, bits_per_byte: float
) -> str:
  """Writes the trained LM with its tokenizer (`models.saving.save_model`, what `nexus-lm` loads).

  Rerunning in the same workdir replaces a model saved there before (never another folder).
  """
  tokenizer = data.tokenizer
  assets = {"tokenizer.json": tokenizer.path} if tokenizer.kind != "byte" else {}
  metadata = {
      "experiment": config.experiment,
      "test_bits_per_byte": bits_per_byte,
      "tokenizer": tokenizer.kind,
      "seq_len": int(config.data.seq_len),
      "config": json.loads(config.to_json_best_effort()),
  }
  saved = save_model(
      path, model, {"params": params}, metadata=metadata, assets=assets, overwrite=True
  )
  return str(saved)


def run_continual(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`config.continual.domains`: the MoE LM trained on the domains in sequence
  (`train/continual_fit.run_domains`: EWC with `optim.ewc_lambda > 0`, replay with
  `continual.replay_capacity > 0`); results.json gets the bits/byte matrix under "continual"."""
  dtype = compute_dtype(config.train.compute_dtype)
  model = lm_from_config(config.model, 256, dtype)
  if (
      model.ponder_steps > 0
      or config.model.get("anytime_loss", False)
      or config.model.get("context_memory", "")
  ):
    raise ValueError(
        "config.continual.domains trains the MoE LM on the plain LM objective: turn off "
        "config.model.ponder_steps, config.model.anytime_loss and config.model.context_memory."
    )
  out = run_domains(lambda: lm_objective(model), config, workdir)
  cc = config.continual
  results: dict[str, Any] = {
      "continual": {
          **out.report(),
          "ewc_lambda": float(config.optim.get("ewc_lambda", 0.0)),
          "ewc_online": bool(config.optim.get("ewc_online", False)),
          "ewc_gamma": float(config.optim.get("ewc_gamma", 1.0)),
          "replay_capacity": int(cc.get("replay_capacity", 0)),
          "replay_fraction": float(cc.get("replay_fraction", 0.0)),
      },
      "params": {"moe": {"total": count_params(out.state.params)}},
  }
  last = out.data[-1]
  results["model_dir"] = save_trained_lm(
      workdir / "model", model, out.state.params, last, config, float(out.matrix[-1, -1])
  )
  results.update(
      sample_and_corpus_report(
          config, lambda *args, **kw: generate(model, out.state.params, *args, **kw), last
      )
  )
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def run_context_memory(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`config.model.context_memory` set: a segment-recurrent `CompressiveLM` (window of
  `model.segment_len` tokens + the chosen memory) instead of the MoE / dense pair; test bits/byte
  next to xz -9e and a sample decoded with the constant-size cache (workdir/tcc)."""
  if config.model.get("anytime_loss", False) or config.model.get("ponder_steps", 0):
    raise ValueError(
        "config.model.context_memory builds a CompressiveLM: turn off config.model.anytime_loss "
        "and config.model.ponder_steps."
    )
  if config.train.get("init_from", ""):
    raise ValueError(
        "config.train.init_from loads a LanguageModel; clear config.model.context_memory."
    )
  seq = int(config.data.seq_len)
  data = load_lm_data(config, workdir, [workdir / "tcc"])
  model = compressive_lm.compressive_lm_from_config(config.model, data.tokenizer.vocab_size, seq)
  fit_result = fit(lm_objective(model), data.train, data.valid, config, workdir / "tcc")
  state = restore_best(fit_result)
  bpb = data.test_bits_per_byte(lambda d: fit_result.trainer.evaluate(state, d)[0]["loss"])
  xz = xz_bits_per_byte(data.test_bytes[1:])
  cache = compressive_lm.init_cache(model, state.params, 1)
  results: dict[str, Any] = {
      "test_bits_per_byte": {"tcc": bpb, "xz_9e": xz},
      "params": {"tcc": {"total": count_params(state.params)}},
      "context_memory": {
          "memory": model.memory,
          "segment_len": model.segment_length,
          "memory_slots": model.memory_slots,
          "compression_rate": model.compression_rate,
          "decode_cache_bytes_per_row": compressive_lm.cache_bytes(cache),
      },
      "train": {
          "tcc": {
              "best_step": fit_result.best_step,
              "train_seconds": round(fit_result.train_seconds, 1),
              "tokens_per_second": round(fit_result.rows_per_second * seq, 1),
          }
      },
      "tokenizer": data.tokenizer_report(),
  }
  sample_config = copy.deepcopy(config)
  sample_config.sample.uncertainty = False  # the scored decoding loop is LanguageModel's
  results.update(
      sample_and_corpus_report(
          sample_config,
          lambda prompts, **kw: compressive_lm.generate(model, state.params, prompts, **kw),
          data,
      )
  )
  results["plot"] = str(_plot(workdir, {"tcc": workdir / "tcc"}, xz, data.bytes_per_token))
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  continual = bool(check_continual_config(config))  # domain-incremental training
  context_memory = bool(config.model.get("context_memory", ""))  # CompressiveLM
  if (continual or context_memory) and distributed.is_multiprocess():
    raise ValueError(
        "config.continual.domains and config.model.context_memory run in one process only; "
        "clear them or the distributed settings."
    )
  if continual:
    return run_continual(config, workdir)
  if context_memory:
    return run_context_memory(config, workdir)
  names = ["moe", "dense"] if config.model.train_dense_baseline else ["moe"]
  with distributed.primary_first("lm tokenizer"):  # process 0 writes workdir/tokenizer.json
    data = load_lm_data(config, workdir, [workdir / n for n in names])
  seq = int(config.data.seq_len)
  train_bpt = data.bytes_per_token["train"]

  dtype = compute_dtype(config.train.compute_dtype)
  moe = lm_from_config(config.model, data.tokenizer.vocab_size, dtype)
  init_params = None
  if config.train.get("init_from", ""):  # a saved model (e.g. `nexus-lm import-hf`): fine-tune it
    moe, init_params = init_from_saved(config.train.init_from, moe)
  models = {"moe": moe}
  if config.model.train_dense_baseline:
    models["dense"] = dense_equivalent(moe)
  results: dict[str, Any] = {"test_bits_per_byte": {}, "params": {}, "train": {}}
  states = {}
  anytime = bool(config.model.get("anytime_loss", False))  # CALM loss over layers (anytime.py)
  ponder = moe.ponder_steps > 0  # PonderNet head: expected loss (ponder_lm.py)
  if anytime and ponder:
    raise ValueError(
        "config.model.anytime_loss and config.model.ponder_steps > 0 exclude each other."
    )
  # Test nats/token of what generation uses: full depth, or each token's halting step.
  test_metric = "last_layer_loss" if anytime else ("halt_loss" if ponder else "loss")
  for name, model in models.items():
    start = init_params if name == "moe" else None  # the dense baseline starts from scratch
    if anytime:
      objective = anytime_lm_objective(model)
    else:
      objective = ponder_lm_objective(model) if ponder else lm_objective(model)
    fit_result = fit(objective, data.train, data.valid, config, workdir / name, init_params=start)
    state = restore_best(fit_result)
    states[name] = state
    results["test_bits_per_byte"][name] = data.test_bits_per_byte(
        lambda d: fit_result.trainer.evaluate(state, d)[0][test_metric]
    )
    results["params"][name] = {
        "total": count_params(state.params),
        "active_per_byte": active_params(model, state.params),  # per token with BPE
    }
    results["train"][name] = {
        "best_step": fit_result.best_step,
        "train_seconds": round(fit_result.train_seconds, 1),
        "bytes_per_second": round(fit_result.rows_per_second * seq * train_bpt, 1),
        "tokens_per_second": round(fit_result.rows_per_second * seq, 1),
    }
  # The MoE model (best validation checkpoint) with its tokenizer, for `nexus-lm generate / chat`;
  # across processes its params are gathered on every process and process 0 writes it.
  moe_params = distributed.host_local(states["moe"].params)
  results["model_dir"] = str(workdir / "model")
  if distributed.is_primary():
    results["model_dir"] = save_trained_lm(
        workdir / "model",
        moe,
        moe_params,
        data,
        config,
        results["test_bits_per_byte"]["moe"],
    )
  xz = xz_bits_per_byte(data.test_bytes[1:])
  results["test_bits_per_byte"]["xz_9e"] = xz
  results["tokenizer"] = data.tokenizer_report()

  if distributed.is_primary():  # the sample is local (gathered params): process 0 reports it
    results.update(
        sample_and_corpus_report(
            config, lambda *args, **kw: generate(moe, moe_params, *args, **kw), data
        )
    )
  results["plot"] = str(workdir / "lm_curves.png")
  if distributed.is_primary():  # metrics.jsonl, the plot and results.json: process 0 only
    _plot(workdir, {n: workdir / n for n in models}, xz, data.bytes_per_token)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results
