"""POST /v1/predict for a NexusFlow tabular artifact: JSON rows per table -> one prediction per row.

Request: {"tables": {table: [{column: value}, ...]}, "predict_from": null | time}: every table of
the artifact's schema as row objects (values: string, number, boolean or null); the target table's
rows are predicted (with `predict_from`, those before it only serve as history). Response: as
`nexusflow serve`'s /predict ({"predictions", "probabilities", "classes", "key", "keys"}), the same
numbers as `nexusflow predict` on the same rows. Tables the model cannot use (an unknown or
missing table or column, values of the wrong type) get 400 naming the table and column.
"""

import asyncio
from typing import Dict, List, Optional, Union

from nexus_jax.serve.backends import ServeOptions, TabularBackend
from nexus_jax.serve.http import await_future, documented, error_response, one_line
from nexus_jax.serve.http import refuse_unless_ready


def add_predict_route(app, backend: TabularBackend, options: ServeOptions) -> None:
  from pydantic import BaseModel, ConfigDict  # noqa: PLC0415 (comes with fastapi)

  from nexus_jax.data.schema import SchemaError  # noqa: PLC0415

  Value = Union[bool, int, float, str, None]

  class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tables: Dict[str, List[Dict[str, Value]]]
    predict_from: Optional[str] = None

  class PredictResponse(BaseModel):
    predictions: List[Value]
    probabilities: Optional[List[List[float]]] = None
    classes: Optional[List[Value]] = None
    key: Optional[str] = None
    keys: Optional[List[Value]] = None

  @app.post("/v1/predict", response_model=PredictResponse, responses=documented(400, 413, 503, 504))
  async def predict(body: PredictRequest):
    if (refused := refuse_unless_ready(backend)) is not None:
      return refused
    future = backend.predict(body.tables, body.predict_from)
    try:
      return await await_future(future, options.request_timeout_s, lambda f: f.cancel())
    except asyncio.TimeoutError:
      return error_response(504)
    except (SchemaError, ValueError, TypeError, KeyError, OverflowError) as err:
      return error_response(400, one_line(err))
