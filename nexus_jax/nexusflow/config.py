"""NexusFlow's default config (the "quick" preset) and its presets, shared by the runner and the estimator.

`tabular_config()` returns defaults chosen for any schema: a batched ensemble of 4 NexusFormers over
every discovered context (one model where the members would see under an epoch each), one epoch (at
least `train.min_steps` steps), sized to train + evaluate in minutes on a 2-core CPU. Nothing here is specific to one dataset: `configs/tabular.py` adds the bundled
nycflights13 task's fields (dataset name, per-table encoder choices), and the dataset module's
recommendations (`data/datasets/nycflights13.py`) fill the `data.*` fields left at 0 / "".

`PRESETS` are resolved at run time by `nexus_jax.train.presets.resolve_preset` (command-line values
and estimator arguments always win over the preset). `PRESETS["full"]` trains a wider model longer,
three times one after another (a sequential deep ensemble of 3 seeds), for best quality: on nycflights13 (an H200) its members
reached test AUC 0.709 / 0.707 / 0.711 and their ensemble 0.716 (benchmarks/README.md, "Count
features"). "quick" changes nothing.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from nexus_jax.train.config import base_config

DEFAULT_MAX_CATEGORIES = 1000  # data.max_categories = 0 without a dataset recommendation
# data.summaries = "" without a dataset recommendation (chosen on benchmarks/relational_suite.py)
DEFAULT_SUMMARIES: tuple[str, ...] = ("count", "mean", "min", "max", "sum", "last", "levels")

# field path -> value, applied by apply_preset where the field still holds its QUICK value.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": {
        "model.ensemble_size": 3,
        "model.ensemble_mode": "sequential",
        "train.num_epochs": 4,
        "train.early_stopping.patience": 1,
        "model.d_model": 64,
        "model.d_head": 128,
        "model.ffn_factor": 2.0,
        "model.refine_iterations": 3,
        "model.target_encoder_kwargs.d_layers": (256, 256),
        "model.target_encoder_kwargs.d_embedding": 16,
        "model.context_encoder_kwargs.d_layers": (64,),
        "model.context_encoder_kwargs.d_embedding": 8,
        "optim.learning_rate": 5e-4,
    },
}


def tabular_config() -> ml_collections.ConfigDict:
  """Quick defaults (every field commented); see `configs/tabular.py` for the command line."""
  c = base_config()
  c.experiment = "tabular"  # experiments/registry.py entry
  c.preset = "quick"  # "quick" | "full": resolved at run time by apply_preset (see its rule)

  c.data = ml_collections.ConfigDict()
  c.data.name = ""  # bundled dataset, e.g. "nycflights13" (configs/tabular.py); the runner only
  c.data.path = ""  # runner only: folder with schema.json + CSV/Parquet tables; wins over data.name
  c.data.max_rows = 0  # subsample the target rows to this many for quick runs; 0 = all
  c.data.numeric_transform = "quantile"  # "quantile" (rtdl quantile-to-normal) | "standard"
  # Most frequent categories kept per column (the rest map to "unknown"); 0 = the dataset's recommended
  # value (nycflights13: 50) or DEFAULT_MAX_CATEGORIES for a data.path folder and the flat row model.
  c.data.max_categories = 0
  c.data.max_history = 16  # rows per history context for datasets without recommended settings
  c.data.contexts = (
      ""  # comma-separated context names to build; "" = the dataset's recommended (or all)
  )
  c.data.history_rows = 0  # if > 0: M for every history context (overrides the dataset's settings)
  # Extra columns to drop, "table.column,..." (added to the schema's drop_columns), e.g. "flights.month".
  c.data.drop_columns = ""
  # Trailing windows of the history contexts' row-count features, e.g. "1,3,24" (hours for datetimes);
  # "" = the dataset's recommendation (none for a data.path folder), "none" = no count features.
  c.data.count_windows = ""
  # Aggregates over ALL visible rows of every history context as target-row features (pooling sees
  # only the M most recent; data/summaries.py): a subset of count,mean,min,max,sum,last,levels, or
  # "all"; "" = the dataset's recommendation, else DEFAULT_SUMMARIES; "none" = no summaries.
  c.data.summaries = ""
  # Parts of datetime columns used as features ("" = the dataset's default). Not "yearday" or "epoch":
  # under a time split no validation / test day of the year (or date) occurs in training.
  c.data.datetime_parts = "hour,weekday"
  # History indexes and window counts: "numpy" (in memory) | "duckdb" (out of core, the same rows;
  # pip install "nexus_jax[duckdb]"), under data.engine_memory_limit (DuckDB's SET memory_limit).
  c.data.engine = "numpy"
  c.data.engine_memory_limit = "1GB"

  c.model = ml_collections.ConfigDict()
  c.model.name = (
      "nexus_former"  # "nexus_former" (multi-table) | "row" (flat feature set A, nycflights13)
  )
  c.model.d_model = 32  # token width of every table token
  c.model.n_heads = 4  # heads of the cross-table attention
  c.model.pool_heads = 2  # heads of the attention pooling over history rows
  c.model.ffn_factor = 1.0  # cross-table FFN hidden width / d_model
  c.model.refine_iterations = 2  # R: shared-weight cross-table iterations while training
  c.model.max_inference_iterations = 0  # cap on iterations at inference; 0 = refine_iterations
  c.model.convergence_tol = 1e-3  # inference stops when the relative token change is below this
  c.model.top_k_contexts = 0  # keep only the k best-scoring contexts per row; 0 = all
  # True: the target encoder also reads row 0 of every context (parent row / most recent history row),
  # a one-to-one join learned from the schema. Off by default: on nycflights13 it did not raise
  # validation or test AUC (benchmarks/README.md, "NexusFormer variants").
  c.model.join_context_rows = False
  # True: the output also gets a linear function of the target row's own features (numeric values,
  # missing flags, a weight per category; zero at init): wide and deep (NexusFormer.linear_head).
  c.model.linear_head = False
  c.model.share_table_encoders = (
      True  # contexts of one table with one feature layout share an encoder
  )
  # M > 1: a deep ensemble of M NexusFormers predicting their mean probability (4 batched members:
  # chosen on the relational suite, benchmarks/README.md "Batched ensemble"), trained as
  # ensemble_mode says: "batched" = all M in one compiled step (models/tabular/ensemble.py
  # BatchedEnsemble: each member sees its own B / M rows of every batch, one early stopping on the
  # ensemble; about one model's compute per step) | "sequential" = one after another (seeds seed ..
  # seed+M-1, each early-stopped on validation; M times the training time).
  c.model.ensemble_size = 4
  c.model.ensemble_mode = "batched"
  # Batched ensembles: fewer members (down to 1) when each of ensemble_size would see fewer than this
  # many epochs of the training rows (nexusflow/schedule.py); 0 = always ensemble_size.
  c.model.min_member_epochs = 1.0
  # Batched ensembles: each member trains on its own B / M rows of every batch while that is at least
  # this many rows; a smaller batch (a table of a few hundred rows) trains every member on every row
  # (M times one model's compute on that small batch); 0 = always split (the default: 32 helped
  # pbc_death and hurt ohio_wheeze over 3 seeds, benchmarks/README.md "Fourth round").
  c.model.min_member_batch = 0
  c.model.d_head = 64  # hidden width of the prediction head
  c.model.dropout = 0.1  # dropout of the cross-table block and the head
  c.model.attention_dropout = 0.0  # dropout on cross-table attention probabilities
  c.model.encoders = ml_collections.ConfigDict()
  # encoder of context rows: lean_mlp | mlp | resnet | tabm | ft_transformer | tabnet | standard
  c.model.encoders.default = "lean_mlp"
  c.model.encoders.target = "mlp"  # encoder of the target row's own features
  # Per-table choices, `encoders.<table> = "tabnet"` ("" = default): the estimator adds one field per
  # table of the schema it is fitted on; configs/tabular.py adds nycflights13's tables.
  # Hyperparameters of the target encoder. A key that encoder lacks is left out while it holds its
  # default here (it serves another encoder kind); set to another value, it is an error.
  c.model.target_encoder_kwargs = ml_collections.ConfigDict()
  c.model.target_encoder_kwargs.d_layers = (128,)  # hidden widths (mlp, lean_mlp)
  c.model.target_encoder_kwargs.d_embedding = 8  # per-feature embedding width
  # "plr_lite" (periodic, one shared linear) | "plr" (per-feature linear) | "linear". plr_lite with 16
  # frequencies: the target row carries hundreds of summary features (benchmarks/README.md,
  # "Relational benchmark suite": plr's per-feature linears took a 2.4k-row fit past 90 s).
  c.model.target_encoder_kwargs.numeric_embedding = "plr_lite"
  c.model.target_encoder_kwargs.plr_frequencies = 16  # periodic frequencies per feature (plr*)
  c.model.target_encoder_kwargs.dropout = 0.1  # encoder dropout (mlp, tabm, lean_mlp)
  # Hyperparameters of the context-row encoders, same rule as target_encoder_kwargs, per context
  # encoder: the default lean_mlp has no numeric_embedding / plr_frequencies, so those two defaults
  # are left out for it (they apply when encoders.* picks mlp / resnet / tabm).
  c.model.context_encoder_kwargs = ml_collections.ConfigDict()
  # hidden widths: small, there are ~50 context rows per target row
  c.model.context_encoder_kwargs.d_layers = (32,)
  c.model.context_encoder_kwargs.d_embedding = 4  # per-feature embedding width
  c.model.context_encoder_kwargs.numeric_embedding = "plr"  # "plr" | "linear" (not lean_mlp)
  c.model.context_encoder_kwargs.plr_frequencies = 16  # periodic frequencies per feature (plr)
  c.model.context_encoder_kwargs.dropout = 0.0  # encoder dropout
  # model.name = "row": one row encoder on flat feature set A. Besides encoder and d_hidden these are
  # the encoder's hyperparameters, same rule as target_encoder_kwargs (a key the encoder lacks is
  # left out while it holds its default here, an error otherwise).
  c.model.row = ml_collections.ConfigDict()
  c.model.row.encoder = "mlp"  # registered row encoder: mlp | resnet | tabm | ft_transformer | ...
  c.model.row.d_hidden = 128  # encoder output width before the linear head
  c.model.row.d_embedding = 16  # per-feature embedding width
  c.model.row.numeric_embedding = "plr"  # "plr" (periodic) | "linear"
  c.model.row.dropout = 0.1  # encoder dropout
  c.model.row.d_layers = (256, 256)  # hidden widths (mlp)

  c.eval = ml_collections.ConfigDict()
  c.eval.plot_attention = (
      True  # runner: write context_attention.png (which tables mattered, test rows)
  )
  c.eval.optimize = True  # also report int8 quantisation and magnitude pruning on test
  c.eval.prune_amount = 0.5  # share of prunable weights zeroed for that report
  c.eval.save_artifact = (
      True  # write workdir/artifact (predict with python -m nexus_jax.nexusflow.predict_cli)
  )

  # The schedule scales to the data (`nexusflow/schedule.py`, the same for runner and estimator):
  # batch capped at max(8, train rows / 4), at least `min_steps` steps, warmup at most 10% of them.
  c.train.batch_size = 512
  c.train.num_epochs = 1  # passes over the training rows (at least min_steps / the epoch budget)
  # small tables: repeat epochs until this many steps (num_steps > 0 wins); 400 chosen on the
  # relational suite (200: mid-size tasks still improving at the last step)
  c.train.min_steps = 400
  # Size-aware step budget (schedule.py): whole epochs, up to min_epochs, as many as fit in
  # max_repeat_steps (at least one; 0 = no cap). Chosen on the relational suite: mid-size tables
  # (lahman_salary 17k, lahman_position 13k training rows) were still improving at step 800 (their
  # batched members best at steps 960-1120 of 1474-1600); below 10,240 rows (20 steps an epoch)
  # min_steps wins; a 273k-row table (533 steps an epoch) trains 3 epochs.
  c.train.min_epochs = 20
  c.train.max_repeat_steps = 1600
  c.train.eval_every_steps = 0  # 0 = min(one epoch, a quarter of the run)
  c.train.log_every_steps = 100
  c.train.early_stopping.metric = "auc"  # validation ROC AUC selects the checkpoint (binary tasks)
  c.train.early_stopping.mode = "max"
  c.train.early_stopping.patience = 2

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 1e-5
  return c
