"""Tabular tasks over one or several related tables.

- `objectives`: losses, predictions and metrics for binary / multiclass / regression (flat and relational inputs).
- `config`: the tabular config (quick preset) + presets; `model_spec`: NexusFormer from config + data (JSON spec).
- `training`: train NexusFormer on `RelationalData` splits with the generic loop; `runtime`: batched jitted predict.
- `estimator`: `NexusFlowClassifier` / `NexusFlowRegressor` (fit on DataFrames + schema, predict, save, load, optimize).
- `predictor` / `artifact`: prediction from raw tables and the integrity-checked, pickle-free artifact.
- `predict`: `python -m nexus_jax.nexusflow.predict_cli --artifact DIR --data DIR --output preds.csv`.
- `flat`: the single-table feature-set-A path of the experiment (`config.model.name = "row"`); `plots`.
"""
