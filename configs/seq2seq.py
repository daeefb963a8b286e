"""Function -> first docstring line, a seq2seq task built offline from the standard library.

Run:  python -m experiments.run --config configs/seq2seq.py
      python -m experiments.run --config configs/seq2seq.py --config.generate.beam_width=4

A byte-level encoder-decoder transformer reads a function's code (docstring removed) and writes
the docstring's first line; test chrF and exact match next to a nearest-neighbour retrieval
baseline (TF-IDF over character n-grams) in results.json, learning curves in seq2seq.png.
A few minutes on a 2-core CPU (the summaries will be rough at this budget).
"""

import ml_collections

from nexus_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.experiment = "seq2seq"  # experiments/registry.py entry
  c.preset = "default"  # "default" | "full" (wider, longer: PRESETS below)

  c.data = ml_collections.ConfigDict()
  c.data.valid_fraction = 0.05  # stdlib files (by path hash) in the validation split
  c.data.test_fraction = 0.05  # stdlib files (by path hash) in the test split
  c.data.source_bytes = 256  # function code bytes read by the encoder
  c.data.min_target_bytes = 10  # shortest docstring summary kept
  c.data.max_target_bytes = 64  # longest docstring summary kept
  c.data.exclude = (
      "site-packages",
      "test",
      "tests",
  )  # stdlib folders skipped (test suites: big, slow to parse)
  c.data.max_files = 0  # parse only the first N files (sorted paths), for quick runs; 0 = all
  c.data.max_eval = 400  # valid/test pairs kept (random, seeded); 0 = all

  c.model = ml_collections.ConfigDict()
  c.model.num_encoder_layers = 2  # encoder blocks
  c.model.num_decoder_layers = 2  # decoder blocks
  c.model.embed_dim = 96  # model width
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 2  # key/value heads
  c.model.mlp_dim = 192  # feed-forward width
  c.model.dropout_rate = 0.1  # residual dropout

  c.generate = ml_collections.ConfigDict()
  c.generate.beam_width = 1  # 1: greedy; > 1: beam search
  c.generate.length_penalty = 0.6  # beam score / length ** penalty

  c.train.batch_size = 32
  c.train.num_steps = 600  # optimizer steps
  c.train.eval_every_steps = 200
  c.train.log_every_steps = 50
  c.train.checkpoint_keep = 1
  c.train.early_stopping.metric = "loss"
  c.train.early_stopping.mode = "min"

  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.01
  return c


# `--config.preset=full`: a wider model trained longer (tens of minutes on a 2-core CPU).
PRESETS = {
    "default": {},
    "full": {
        "model.embed_dim": 192,
        "model.mlp_dim": 384,
        "model.num_encoder_layers": 3,
        "model.num_decoder_layers": 3,
        "train.num_steps": 4000,
        "train.eval_every_steps": 500,
    },
}
