"""Hybrid attention/SSM language model (HybridLM; bytes or BPE tokens) on the stdlib's .py files.

Run:  python -m experiments.run --config configs/hybrid.py --workdir runs/hybrid
      python -m experiments.run --config configs/hybrid.py --config.preset=full --workdir runs/hybrid_full
      python -m experiments.run --config configs/hybrid.py --config.jepa.weight=0.1   # + JEPA aux loss
      python -m experiments.run --config configs/hybrid.py --config.data.root=/path/to/text_folder
      python -m experiments.run --config configs/hybrid.py --config.data.tokenizer=bpe \
          --config.data.seq_len=19 --workdir runs/hybrid_bpe   # 4096 BPE tokens of ~3.4 bytes

Trains `HybridLM` (the `model.preset` size, tiny by default: 16 layers, attention : SSM = 1 : 7)
on the same file-level split and corpus loader as configs/lm.py, reports test bits/byte next to
`xz -9e` on exactly the same test bytes, samples text, writes results.json + hybrid_curves.png.
With `jepa.weight > 0` a JEPA auxiliary loss (EMA target encoder, VICReg terms; see
models/hybrid_jepa.py) is added. `--config.preset=full` applies `PRESETS["full"]` (below) to the fields you did not set.
"""

import ml_collections

from nexus_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.experiment = "hybrid"  # experiments/registry.py entry
  c.preset = "default"  # "default" | "full" (PRESETS below; command-line overrides win)

  c.data = ml_collections.ConfigDict()
  c.data.root = ""  # folder or single text file; "" = this interpreter's standard library
  c.data.pattern = "*.py"  # file glob inside a folder
  c.data.valid_fraction = 0.05  # files (by path hash) in the validation split
  c.data.test_fraction = 0.05  # files (by path hash) in the test split
  # "byte": 256 tokens, one per byte. "bpe": a byte-level BPE trained on the train split
  # (nexus_jax/data/tokenizer.py), saved as workdir/tokenizer.json; bits/byte stay comparable.
  c.data.tokenizer = "byte"
  c.data.vocab_size = 0  # tokens incl. the 256 bytes; 0 = default (byte 256, bpe 4096); byte: 0|256
  c.data.seq_len = 64  # TOKENS of context per training window (bytes with the byte tokenizer)
  c.data.valid_bytes = 8_192  # validation bytes scored at each evaluation (from the split's start)
  c.data.test_bytes = 32_768  # test bytes scored by the model and by xz; 0 = the whole split

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # tiny | small | base | large | xl (models/hybrid.py PRESETS)
  c.model.d_model = 0  # 0 = the preset's width; > 0 overrides it
  c.model.num_heads = 0  # 0 = the preset's attention heads
  c.model.num_blocks = 0  # 0 = the preset's number of blocks
  c.model.layers_per_block = 8  # layers per HybridBlock (Jamba: 8)
  c.model.attention_index = -1  # attention layer inside a block; -1 = layers_per_block // 2
  c.model.moe_every = 0  # 0 = dense SwiGLU; e = MoE on every e-th layer (Jamba: 2)
  c.model.num_experts = 4  # experts per MoE layer (when moe_every > 0)
  c.model.use_memory = False  # Titans neural memory after each block's attention mixer
  c.model.ssm_state_dim = 16  # SSM state size N
  # SSM scan: "sequential" | "chunked" | "associative"; at 64-byte windows on this CPU the
  # sequential lax.scan trains fastest (tiny, batch 8: 4.5 s/step vs 6.1 s chunked, loaded core).
  c.model.ssm_scan_method = "sequential"
  c.model.ssm_chunk_size = 64  # chunk of the chunked associative scan
  c.model.dropout_rate = 0.0  # residual dropout

  c.jepa = ml_collections.ConfigDict()
  c.jepa.weight = 0.0  # > 0 adds the JEPA auxiliary loss with this weight
  c.jepa.horizon = 4  # predict the EMA target's latent this many bytes ahead
  c.jepa.ema_decay = 0.99  # target encoder EMA decay
  c.jepa.inv_coef = 25.0  # VICReg invariance coefficient
  c.jepa.var_coef = 25.0  # VICReg variance-hinge coefficient
  c.jepa.cov_coef = 1.0  # VICReg covariance coefficient

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "  # text the sample continues
  c.sample.num_bytes = 120  # bytes generated
  c.sample.temperature = 0.8  # sampling temperature
  c.sample.top_p = 0.95  # nucleus mass

  c.train.batch_size = 8
  c.train.num_steps = 150  # optimizer steps (tiny = 16 layers: ~4.5 s/step on one loaded core)
  c.train.eval_every_steps = 50
  c.train.log_every_steps = 25
  c.train.checkpoint_keep = 1
  c.train.early_stopping.metric = "loss"  # validation nats/byte
  c.train.early_stopping.mode = "min"

  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.98

  return c


# `--config.preset=full`: longer training on longer windows (hours on a 2-core CPU). Resolved at run
# time by `nexus_jax.train.presets.resolve_preset`: command-line overrides win.
PRESETS = {
    "default": {},
    "full": {
        "data.seq_len": 256,
        "data.valid_bytes": 32_768,
        "data.test_bytes": 0,
        "train.num_steps": 4000,
        "train.eval_every_steps": 250,
        "train.batch_size": 32,
        "model.ssm_scan_method": "chunked",
    },
}
