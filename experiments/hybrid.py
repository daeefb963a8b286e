"""Language modelling (bytes or BPE tokens) with the hybrid attention/SSM model vs xz -9e.

`run(config, workdir)` (config: configs/hybrid.py):
  1. read and tokenize the corpus with the LM experiment's loader (stdlib .py files by default,
     split by file-path hash; `data.tokenizer` "byte" or "bpe" trained on the training split,
     saved as workdir/tokenizer.json and reused on a rerun);
  2. train `HybridLM` with the tokenizer's vocab_size (wrapped in `HybridJEPA` when
     `jepa.weight > 0`) with `train.loop.fit` and `lm_objective`, selecting the best validation
     checkpoint (rerunning resumes);
  3. score the `data.test_bytes` test bytes: bits/byte of the model (total test nats / (log 2 *
     bytes scored)) and of lzma preset 9|EXTREME (`byte_lm.xz_bits_per_byte`) on exactly
     those bytes;
  4. sample text with incremental decoding (KV + SSM caches); write results.json and
     hybrid_curves.png.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from experiments.lm import sample_and_corpus_report, save_trained_lm
from nexus_jax.data.datasets.byte_lm import load_lm_data, xz_bits_per_byte
from nexus_jax.models import hybrid
from nexus_jax.models.hybrid import HybridLM
from nexus_jax.models.hybrid_jepa import HybridJEPA
from nexus_jax.models.seq_objectives import lm_objective
from nexus_jax.train.config import compute_dtype
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.metrics import read_metrics
from nexus_jax.train.plots import plot_learning_curves
from nexus_jax.train import distributed


def build_model(mc, jc, seq_len: int, vocab_size: int = 256, dtype=None):
  """(`HybridLM` from `config.model` with `vocab_size` tokens and compute `dtype`, the trained
  model: that LM wrapped in `HybridJEPA` when `config.jepa.weight > 0`, else the LM itself)."""
  if mc.preset not in hybrid.PRESETS:
    raise ValueError(f"config.model.preset={mc.preset!r}; choose one of {list(hybrid.PRESETS)}.")
  if jc.weight < 0:
    raise ValueError(f"config.jepa.weight must be >= 0 (0 = off); got {jc.weight}.")
  sizes = {k: int(mc[k]) for k in ("d_model", "num_heads", "num_blocks") if mc[k] > 0}
  lm = HybridLM.from_preset(
      mc.preset,
      vocab_size=int(vocab_size),
      **sizes,
      layers_per_block=int(mc.layers_per_block),
      attention_index=None if mc.attention_index < 0 else int(mc.attention_index),
      moe_every=int(mc.moe_every),
      num_experts=int(mc.num_experts),
      use_memory=bool(mc.use_memory),
      ssm_state_dim=int(mc.ssm_state_dim),
      ssm_scan_method=str(mc.ssm_scan_method),
      ssm_chunk_size=int(mc.ssm_chunk_size),
      dropout_rate=float(mc.dropout_rate),
      dtype=dtype,
  )
  if jc.weight == 0:
    return lm, lm
  if not 1 <= jc.horizon < seq_len:
    raise ValueError(
        f"config.jepa.horizon must be in [1, data.seq_len={seq_len}); got {jc.horizon}."
    )
  wrapped = HybridJEPA(
      lm=lm,
      weight=float(jc.weight),
      horizon=int(jc.horizon),
      ema_decay=float(jc.ema_decay),
      inv_coef=float(jc.inv_coef),
      var_coef=float(jc.var_coef),
      cov_coef=float(jc.cov_coef),
  )
  return lm, wrapped


def run(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  data = load_lm_data(config, workdir, [workdir])
  seq = int(config.data.seq_len)

  dtype = compute_dtype(config.train.compute_dtype)
  lm, model = build_model(config.model, config.jepa, seq, data.tokenizer.vocab_size, dtype)
  fit_result = fit(lm_objective(model), data.train, data.valid, config, workdir)
  state = restore_best(fit_result)
  lm_params = state.params["lm"] if model is not lm else state.params
  results: dict[str, Any] = {
      "test_bits_per_byte": {
          "hybrid": data.test_bits_per_byte(
              lambda d: fit_result.trainer.evaluate(state, d)[0]["loss"]
          ),
          "xz_9e": xz_bits_per_byte(data.test_bytes[1:]),
      },
      "params": hybrid.count_params(lm_params),
      "model": {
          "preset": config.model.preset,
          "vocab_size": lm.vocab_size,
          "d_model": lm.d_model,
          "num_heads": lm.num_heads,
          "num_blocks": lm.num_blocks,
          "layers": lm.num_blocks * lm.layers_per_block,
          "moe_every": lm.moe_every,
          "use_memory": lm.use_memory,
          "jepa_weight": float(config.jepa.weight),
      },
      "train": {
          "best_step": fit_result.best_step,
          "steps_run": fit_result.steps_run,
          "train_seconds": round(fit_result.train_seconds, 1),
          "bytes_per_second": round(
              fit_result.rows_per_second * seq * data.bytes_per_token["train"], 1
          ),
          "tokens_per_second": round(fit_result.rows_per_second * seq, 1),
      },
      "tokenizer": data.tokenizer_report(),
  }
  # The LM (without the JEPA wrapper), best validation checkpoint, with its tokenizer.
  lm_params = distributed.host_local(lm_params)  # every process (a gather)
  results["model_dir"] = str(workdir / "model")
  if distributed.is_primary():  # across processes only process 0 writes files
    results["model_dir"] = save_trained_lm(
        workdir / "model", lm, lm_params, data, config, results["test_bits_per_byte"]["hybrid"]
    )
  train_log = read_metrics(workdir, "train")
  if config.jepa.weight > 0 and train_log:
    results["train"]["final_aux_jepa"] = train_log[-1].get("aux/jepa")

  results.update(
      sample_and_corpus_report(
          config, lambda *args, **kw: hybrid.generate(lm, lm_params, *args, **kw), data
      )
  )
  results["plot"] = str(workdir / "hybrid_curves.png")
  if distributed.is_primary():
    results["plot"] = str(plot_learning_curves(workdir, "bits_per_token", "hybrid_curves.png"))
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results
