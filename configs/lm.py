"""MoE language model (byte-level, or BPE tokens) on the Python standard library's own .py sources.

Run:  python -m experiments.run --config configs/lm.py
      python -m experiments.run --config configs/lm.py --config.data.tokenizer=bpe \
          --config.data.vocab_size=4096 --config.data.seq_len=36 --workdir runs/lm_bpe
      python -m experiments.run --config configs/lm.py --config.preset=full --workdir runs/lm_full
      python -m experiments.run --config configs/lm.py --config.data.root=/path/to/text_folder

Trains a MoE LM and a dense LM with the same active parameters per byte on the same batches,
reports test bits/byte of both next to `xz -9e` (Python's lzma, preset 9 | PRESET_EXTREME) on the
same test bytes, samples text from the MoE model and writes results.json + lm_curves.png.
With `data.tokenizer="bpe"` the models read BPE tokens (3.4-3.5 bytes each on this corpus at
4096 tokens, so seq_len=36 tokens cover about as many bytes as 128 byte tokens do; measured:
benchmarks/tokenizer_lm.py).
`--config.preset=full` applies `PRESETS["full"]` (below: a bigger model, a longer run) to the
fields you did not set on the command line. Timing of the default is in the closing note of issue 7's work (CPU shared).
"""

import ml_collections

from nexus_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.experiment = "lm"  # experiments/registry.py entry
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
  c.data.seq_len = 128  # TOKENS of context per training window (bytes with the byte tokenizer)
  c.data.valid_bytes = 32_768  # validation bytes scored at each evaluation (from the split's start)
  c.data.test_bytes = 131_072  # test bytes scored by the models and by xz; 0 = the whole split

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 2  # transformer blocks
  c.model.embed_dim = 96  # model width
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 2  # key/value heads (GQA)
  c.model.mlp_dim = 128  # per-expert hidden width (the dense baseline uses mlp_dim * top_k)
  c.model.num_experts = 4  # experts per MoE layer
  c.model.moe_top_k = 2  # experts per byte
  c.model.moe_load_balance_coef = 0.01  # Switch load-balancing loss weight
  # 0.0: dropless (sorted grouped matmul); > 0: capacity-limited einsum dispatch (slots per expert
  # = factor * tokens * top_k / experts), the one partitioned on the `expert` mesh axis
  c.model.moe_capacity_factor = 0.0
  c.model.dropout_rate = 0.0  # residual dropout
  c.model.attention_backend = "xla"  # xla | chunked | pallas
  c.model.position_embedding = "rope"  # rope | learned (a [max_len, embed] table, RoPE off)
  c.model.max_len = 0  # longest sequence (prompt + sample too); 0 = unbounded (rope only)
  c.model.use_final_norm = True  # RMSNorm after the last block (pre-norm stack)
  c.model.norm_epsilon = 1e-6  # epsilon of every RMSNorm (Llama / Mistral / Mixtral use 1e-5)
  c.model.rope_theta = 10000.0  # RoPE base (Mistral / Mixtral: 1e6)
  c.model.tie_embeddings = False  # LM head = input embedding transposed (scaled by 1/sqrt(embed))
  c.model.head_bias = True  # untied LM head has a bias (pretrained Llama / Mixtral: False)
  c.model.moe_renormalize = True  # top-k router weights renormalised to sum to 1 (Mixtral: True)
  # Dynamic experts (top-p routing, Huang et al. 2024): a byte takes experts until their router
  # probability mass reaches p, at most moe_top_k of them; 0.0 = plain top-k routing.
  c.model.moe_top_p = 0.0
  # Mixture-of-Depths (Raposo et al. 2024): every mod_every-th block processes only the top
  # ceil(mod_capacity * seq_len) bytes of each window (a router picks them); 1.0 = off.
  c.model.mod_capacity = 1.0
  c.model.mod_every = 2  # routed-block spacing (num_layers must be a multiple)
  c.model.train_dense_baseline = True  # also train the dense model with equal active params
  # CALM anytime objective: loss at every layer through the final norm + head, weights l / sum(l)
  # (nexus_jax/models/anytime.py); test bits/byte stay the last layer's. For early-exit decoding.
  c.model.anytime_loss = False
  # PonderNet adaptive depth (nexus_jax/models/ponder_lm.py): one more block shared over up to
  # ponder_steps steps with per-byte halting, trained on the expected loss; 0 = off.
  c.model.ponder_steps = 0
  c.model.ponder_prior = 0.5  # lambda_p of the geometric prior over steps (mean 1 / prior)
  c.model.ponder_beta = 0.01  # weight of the KL-to-prior aux loss
  # Temporal context compression (nexus_jax/models/compressive_lm.py): "" = the MoE/dense pair;
  # "compressive" | "summary" | "titans" | "none" trains one segment-recurrent CompressiveLM
  # (num_layers, embed_dim, num_heads, num_kv_heads, mlp_dim as above; no MoE) whose segments of
  # segment_len tokens see the previous segment raw plus that memory of older ones.
  c.model.context_memory = ""
  c.model.segment_len = 32  # tokens per segment (must divide data.seq_len)
  c.model.memory_slots = 8  # compressive / summary slots per layer (ignored by titans, none)
  c.model.compression_rate = 0  # compressive: evicted tokens per slot; 0 = fit every segment
  c.model.compression = "mean"  # compressive: "mean" pooling | "conv" (learned)

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "  # text the sample continues
  c.sample.num_bytes = 200  # bytes generated
  c.sample.temperature = 0.8  # sampling temperature
  c.sample.top_p = 0.95  # nucleus mass
  # Score the sample inside the decoding loop (per-token log-prob / entropy under the processed
  # distribution, inference/uncertainty.py): results.json gets "sample_uncertainty".
  c.sample.uncertainty = True

  c.train.batch_size = 32
  c.train.num_steps = 150  # optimizer steps per model
  c.train.eval_every_steps = 75
  c.train.log_every_steps = 50
  c.train.checkpoint_keep = 1
  # A saved model folder (a run's <workdir>/model, or `nexus-lm import-hf --out DIR`) the MoE model
  # starts from; its architecture and vocabulary must match config.model and the tokenizer.
  c.train.init_from = ""
  c.train.early_stopping.metric = "loss"  # validation nats/byte
  c.train.early_stopping.mode = "min"

  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.98
  # Elastic weight consolidation (train/ewc.py, chained before the optimizer): penalty strength
  # (0 = off); online EWC (decayed Fisher, latest anchor) and its decay; a saved prior to start
  # from ("" = none; set per domain by the continual runner below).
  c.optim.ewc_lambda = 0.0
  c.optim.ewc_online = False
  c.optim.ewc_gamma = 1.0
  c.optim.ewc_prior = ""

  # Continual learning (nexus_jax/train/continual_fit.py): train the MoE LM on the sub-folders
  # of data.root (or the stdlib) in sequence, e.g. --config.continual.domains=asyncio,email,xml;
  # results.json gets the bits/byte matrix R[i][j] (domain j after training domain i).
  # Each domain trains train.num_steps steps; EWC: optim.ewc_lambda > 0; replay: capacity > 0.
  c.continual = ml_collections.ConfigDict()
  c.continual.domains = ""  # comma-separated folder names; "" = off (the usual MoE-vs-dense run)
  c.continual.valid_fraction = 0.2  # files of each domain in its validation split
  c.continual.test_fraction = 0.2  # files of each domain in its test split
  c.continual.fisher_examples = 256  # training windows of a finished domain the Fisher averages
  c.continual.fisher_variant = "sampled"  # "sampled" (true Fisher) | "empirical"
  c.continual.replay_capacity = 0  # reservoir windows kept from earlier domains; 0 = no replay
  c.continual.replay_fraction = 0.25  # share of each batch replaced by replayed windows

  return c


# `--config.preset=full`: a wider MoE trained longer (not run here; hours on a 2-core CPU). Resolved
# at run time by `nexus_jax.train.presets.resolve_preset`: command-line overrides win.
PRESETS = {
    "default": {},
    "full": {
        "model.embed_dim": 192,
        "model.num_layers": 4,
        "model.mlp_dim": 384,
        "model.num_experts": 8,
        "data.seq_len": 256,
        "train.num_steps": 3000,
        "train.eval_every_steps": 250,
        "data.test_bytes": 0,  # the whole test split
    },
}
