"""HTTP serving of an artifact with FastAPI: what `nexusflow serve --model DIR` runs under uvicorn.

    app = create_app("runs/x/artifact")              # loads (and verifies) the artifact once
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints:
  GET  /health   {"status": "ok", "model_sha256", "format_version", "task", "parameters",
                  "optimization"}; `model_sha256` is the sha256 of the artifact's manifest, which
                  lists the sha256 of every file: one value per exact model.
  GET  /schema   {"schema", "columns" (table -> columns at fit time), "target", "task", "classes"}
  POST /predict  body {"tables": {table: [{column: value, ...}, ...]}, "predict_from": null | time}
                 -> {"predictions": [...], "probabilities": [[p per class], ...] | null,
                     "classes": [...] | null, "key": column | null, "keys": [...] | null}
                 Every table of the schema is given as a list of row objects; the target table's
                 rows are predicted (those before `predict_from` only serve as history), with the
                 same numbers as `predict_cli.predict_folder` on the same rows.

Errors: 422 for a body of the wrong shape ({"detail": one line naming the field, "errors": [...]}),
400 {"detail": one line naming the table / column} for tables the model cannot predict on (an
unknown table or column, a missing one, values of the wrong type, no rows). FastAPI is imported
when `create_app` runs: without the serve extra the ImportError says what to install.
"""

import json
import pathlib
import threading
from typing import Any, Dict, List, Optional

import jax
import numpy as np
import pandas as pd

from nexus_jax.data.schema import SchemaError
from nexus_jax.nexusflow.artifact import MANIFEST_FILE, load_artifact, sha256_file
from nexus_jax.nexusflow.predict_cli import predict_tables

INSTALL_HINT = "pip install 'nexus_jax[serve]' (FastAPI and uvicorn)"


def require_fastapi():
  """The fastapi module; an ImportError naming the extra to install when it is missing."""
  try:
    import fastapi  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ImportError(f"serving needs the serve extra: {INSTALL_HINT}; {err}") from None
  return fastapi


def frame(table: str, rows: List[Dict[str, Any]]) -> pd.DataFrame:
  """JSON rows of `table` as a DataFrame (missing keys become missing values)."""
  if not rows:
    return pd.DataFrame()
  return pd.DataFrame.from_records(rows)


def response(predictor: Any, out: pd.DataFrame) -> Dict[str, Any]:
  """The /predict response of `predict_tables`' frame."""
  key = predictor.schema.target_table.primary_key
  probs = [c for c in out.columns if str(c).startswith("proba_")]
  return {
      "predictions": _plain(out["prediction"].tolist()),
      "probabilities": None if not probs else out[probs].to_numpy(np.float64).tolist(),
      "classes": None if predictor.classes is None else _plain(list(predictor.classes)),
      "key": key if key in out.columns else None,
      "keys": _plain(out[key].tolist()) if key in out.columns else None,
  }


def _plain(values: List[Any]) -> List[Any]:
  return [v.item() if isinstance(v, np.generic) else v for v in values]


def create_app(artifact_dir: str):
  """The FastAPI app serving the artifact at `artifact_dir` (see the module docstring)."""
  fastapi = require_fastapi()
  from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
  from fastapi.responses import JSONResponse  # noqa: PLC0415
  from pydantic import BaseModel, ConfigDict  # noqa: PLC0415 (comes with fastapi)

  path = pathlib.Path(artifact_dir).absolute()
  predictor = load_artifact(path)
  meta = json.loads((path / "artifact.json").read_text())
  health = {
      "status": "ok",
      "model_sha256": sha256_file(path / MANIFEST_FILE),
      "format_version": meta["format_version"],
      "task": predictor.task,
      "parameters": int(sum(np.size(x) for x in jax.tree.leaves(predictor.variables["params"]))),
      "optimization": [o["method"] for o in predictor.optimization],
  }
  schema = {
      "schema": predictor.schema.to_dict(),
      "columns": predictor.fit_columns,
      "target": predictor.schema.to_dict()["target"],
      "task": predictor.task,
      "classes": None if predictor.classes is None else _plain(list(predictor.classes)),
  }
  lock = threading.Lock()  # one prediction at a time: the model is compiled once, then reused

  class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tables: Dict[str, List[Dict[str, Any]]]
    predict_from: Optional[str] = None

  app = fastapi.FastAPI(
      title=f"NexusFlow: {predictor.schema.target.table}.{predictor.schema.target.column}",
      description=__doc__.split("\n")[0],
  )

  @app.exception_handler(RequestValidationError)
  def _invalid_body(request, exc):
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse(
        status_code=422,
        content={
            "detail": f"{where}: {first.get('msg')}",
            "errors": json.loads(json.dumps(exc.errors(), default=str)),
        },
    )

  @app.get("/health")
  def get_health() -> Dict[str, Any]:
    return health

  @app.get("/schema")
  def get_schema() -> Dict[str, Any]:
    return schema

  @app.post("/predict")
  def post_predict(body: PredictRequest):
    tables = {name: frame(name, rows) for name, rows in body.tables.items()}
    try:
      with lock:
        out = predict_tables(predictor, tables, body.predict_from)
    except (SchemaError, ValueError) as err:
      return JSONResponse(status_code=400, content={"detail": " ".join(str(err).split())})
    return response(predictor, out)

  return app
