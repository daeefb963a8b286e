"""The model card of an artifact: what it predicts from, what it was trained on, how well, how big.

    card = model_card(predictor, artifact_dir, results)   # JSON-ready dict
    text = render_markdown(card)                          # MODEL_CARD.md

Sections: "model" (task, classes, format version, parameter count, optimisations applied),
"schema" (per table: keys, time column, columns at fit time and the feature type of each; the
target and the split), "training_data" (rows per table and per split, as far as the artifact or
the run's results.json knows them), "metrics" (the run's test and validation metrics with the
reference baselines next to them, and the int8 / pruning change it measured; absent without a
results.json), "size" (bytes on disk), "libraries" (versions of the stack that wrote it) and, once
packaged, "files" (bytes and sha256 of every file of the package but the card and SHA256SUMS).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform
from typing import Any, Mapping

import jax
import numpy as np

from nexus_jax.nexusflow.artifact import ARTIFACT_FILE
from nexus_jax.nexusflow.artifact_optimize import folder_bytes, params_bytes
from nexus_jax.nexusflow.table_predictor import TabularPredictor

LIBRARIES = ("nexus_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "pandas")
RESULT_KEYS = (
    "test",
    "valid_at_best",
    "baselines_test_auc",
    "beats_lightgbm_set_a",
    "beats_catboost_set_b",
)


def library_versions() -> dict[str, str | None]:
  """Installed versions of `LIBRARIES` (None for one not installed) and of Python."""
  out: dict[str, str | None] = {"python": platform.python_version()}
  for name in LIBRARIES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def schema_summary(predictor: TabularPredictor) -> dict[str, Any]:
  """Tables (keys, time column, columns, feature types), target and split of the artifact."""
  schema = predictor.schema.to_dict()
  tables = {}
  for name, spec in schema["tables"].items():
    pre = predictor.builder.preprocessors.get(name)
    types = dict(pre.get_feature_info().types) if pre is not None else {}
    tables[name] = {
        **{k: v for k, v in spec.items() if k in ("primary_key", "time_column", "foreign_keys")},
        "columns": list(predictor.fit_columns.get(name, [])),
        "feature_types": {str(c): str(t) for c, t in types.items()},
    }
  return {"tables": tables, "target": schema["target"], "split": schema["split"]}


def training_summary(predictor: TabularPredictor, results: Mapping[str, Any] | None) -> dict:
  """Rows per table and per split, from the artifact and (when given) the run's results."""
  out: dict[str, Any] = {"table_rows": predictor.training.get("table_rows")}
  rows = predictor.training.get("rows_per_split") or (results or {}).get("rows")
  out["rows_per_split"] = rows
  if results and "validation_carved_from_train" in results:
    out["validation_carved_from_train"] = results["validation_carved_from_train"]
  if results and "task" in results:
    out["description"] = results["task"]
  return out


def metrics_summary(results: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """The run's metrics and baselines (None without results)."""
  if not results:
    return None
  out = {k: results[k] for k in RESULT_KEYS if k in results}
  opt = results.get("optimization")
  if opt:
    out["optimization_on_test"] = {
        m: {"change": opt[m].get("change"), "metrics": opt[m].get("metrics")}
        for m in opt
        if isinstance(opt[m], Mapping) and "change" in opt[m]
    }
  return out


def model_card(
    predictor: TabularPredictor,
    artifact: str | pathlib.Path,
    results: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
  """The card as a JSON-ready dict (see the module docstring); `extra` keys are added at the top."""
  artifact = pathlib.Path(artifact)
  meta = json.loads((artifact / ARTIFACT_FILE).read_text())
  n_params = int(sum(np.size(x) for x in jax.tree.leaves(predictor.variables["params"])))
  return _jsonable(
      {
          "kind": "nexusflow_model_card",
          **extra,
          "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "model": {
              "family": meta.get("kind"),
              "task": predictor.task,
              "classes": None if predictor.classes is None else list(predictor.classes),
              "format_version": meta.get("format_version"),
              "parameters": n_params,
              "optimization": [
                  {k: v for k, v in o.items() if k not in ("fallback", "per_leaf")}
                  for o in predictor.optimization
              ],
              "contexts": [c["name"] for c in predictor.spec.get("contexts", [])],
          },
          "schema": schema_summary(predictor),
          "training_data": training_summary(predictor, results),
          "metrics": metrics_summary(results),
          "size": {
              "params_bytes": params_bytes(artifact),
              "artifact_bytes": folder_bytes(artifact),
          },
          "libraries": library_versions(),
      }
  )


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def _metric_table(metrics: Mapping[str, Any]) -> list[str]:
  names = sorted(metrics.get("test") or {})
  if not names:
    return []
  lines = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for split, key in (("test", "test"), ("validation (chosen checkpoint)", "valid_at_best")):
    values = metrics.get(key) or {}
    lines.append(f"| {split} | " + " | ".join(_num(values.get(n)) for n in names) + " |")
  return lines


def _num(v: Any) -> str:
  return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def render_markdown(card: Mapping[str, Any]) -> str:
  """MODEL_CARD.md: the card for people (the JSON stays the reference)."""
  m, schema, data = card["model"], card["schema"], card["training_data"]
  target = schema["target"]
  out = [
      f"# Model card: {target['table']}.{target['column']} ({m['task']})",
      "",
      f"NexusFormer over {len(schema['tables'])} related tables, {m['parameters']:,} parameters, "
      f"artifact format version {m['format_version']}; created {card['created_at']}.",
  ]
  if m["classes"] is not None:
    out.append(f"Classes: {', '.join(map(str, m['classes']))}.")
  applied = [o["method"] for o in m["optimization"]]
  out.append(f"Optimisations applied: {', '.join(applied) if applied else 'none (float32)'}.")
  out += ["", "## Schema", "", "| table | keys | time column | columns |", "|---|---|---|---|"]
  for name, t in schema["tables"].items():
    keys = [f"pk {t['primary_key']}"] if t.get("primary_key") else []
    keys += [f"{c} -> {p}" for c, p in (t.get("foreign_keys") or {}).items()]
    out.append(
        f"| {name} | {', '.join(keys) or '-'} | {t.get('time_column') or '-'} | "
        f"{', '.join(t['columns'])} |"
    )
  out.append("")
  out.append(
      f"Target: `{target['table']}.{target['column']}` ({target['task']}); split: "
      f"`{json.dumps(schema['split'])}`."
  )
  out += ["", "## Training data", ""]
  if data.get("description"):
    out.append(f"{data['description']}.")
  if data.get("rows_per_split"):
    out.append(
        "Target rows per split: "
        + ", ".join(f"{k} {v:,}" for k, v in data["rows_per_split"].items())
        + "."
    )
  if data.get("table_rows"):
    out.append(
        "Rows per table at fit time: "
        + ", ".join(f"{k} {v:,}" for k, v in data["table_rows"].items())
        + "."
    )
  if not data.get("rows_per_split") and not data.get("table_rows"):
    out.append("Not recorded by this artifact.")
  out += ["", "## Metrics", ""]
  metrics = card.get("metrics")
  if not metrics:
    out.append("Not recorded: no results.json of the training run sat next to the artifact.")
  else:
    out += _metric_table(metrics) or ["No test rows were scored."]
    baselines = metrics.get("baselines_test_auc") or {}
    if baselines:
      out += [
          "",
          "Baselines (test AUC): " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()),
      ]
    else:
      out += ["", "Baselines: none recorded (the runner records them for its bundled datasets)."]
    for method, r in (metrics.get("optimization_on_test") or {}).items():
      change = ", ".join(f"{k} {v:+.4f}" for k, v in (r.get("change") or {}).items())
      out.append(f"- {method} (measured on test by the run): {change}")
  size = card["size"]
  out += [
      "",
      "## Size",
      "",
      f"Params on disk: {size['params_bytes']:,} bytes; whole artifact: "
      f"{size['artifact_bytes']:,} bytes.",
      "",
      "## Libraries",
      "",
      ", ".join(f"{k} {v}" for k, v in card["libraries"].items() if v),
  ]
  if card.get("files"):
    out += ["", "## Files (sha256)", "", "| file | bytes | sha256 |", "|---|---|---|"]
    out += [f"| {f} | {v['bytes']:,} | `{v['sha256']}` |" for f, v in card["files"].items()]
  return "\n".join(out) + "\n"
