"""NexusFlow, the product: prediction over several related tables, from raw DataFrames or a folder.

    from nexus_jax.nexusflow import NexusFlowClassifier, NexusFlowRegressor, Schema

| module | what it holds |
|---|---|
| `estimator` | `NexusFlowClassifier` / `NexusFlowRegressor`: fit on DataFrames + schema, predict, optimize, save, load |
| `pipeline` | the one relational pipeline, prepare -> train -> score, shared by the estimator and the runner |
| `config` | the default config ("quick") and `PRESETS`; `schedule`: the schedule scaled to the data |
| `training` | NexusFormer (or a deep ensemble) trained on `RelationalData` splits with the generic loop |
| `model_spec` | NexusFormer from config + data through a JSON spec (what an artifact stores) |
| `objectives` | losses, predictions and metrics for binary / multiclass / regression |
| `batch_inference` | batched, jitted predictions of a model on host arrays |
| `table_predictor` | `TabularPredictor`: a trained model + its builder, predicting from raw tables |
| `optimization` | int8 / int4 quantisation and magnitude pruning, and the report comparing them |
| `artifact` | the integrity-checked, pickle-free artifact folder (save never deletes what is not ours) |
| `predict_cli` | `python -m nexus_jax.nexusflow.predict_cli --artifact DIR --data DIR --output preds.csv` |
| `scoring` | metrics of a predictor on labelled tables (an evaluation folder) |
| `artifact_optimize` | optimised copies of an artifact folder and their size on disk |
| `size_target` | the least lossy optimisation whose params fit a size (`optimize --target-size-mb`) |
| `model_card` / `package` | model card; one integrity-checked folder / .zip to ship (`nexusflow package`) |
| `server` | the FastAPI app of `nexusflow serve` (/health, /schema, /predict) |
| `flat` | data and model pieces of the flat feature-set-A baseline (`config.model.name = "row"`) |
| `plots` | which tables mattered: per-context attention and fusion gates as a PNG |
"""

from nexus_jax.data.schema import Schema, SchemaError
from nexus_jax.nexusflow.artifact import ArtifactError, load_artifact
from nexus_jax.nexusflow.estimator import NexusFlowClassifier, NexusFlowRegressor
from nexus_jax.nexusflow.table_predictor import TabularPredictor

__all__ = [
    "ArtifactError",
    "NexusFlowClassifier",
    "NexusFlowRegressor",
    "Schema",
    "SchemaError",
    "TabularPredictor",
    "load_artifact",
]
