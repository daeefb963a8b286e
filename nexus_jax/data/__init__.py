"""Multi-table data layer: schema, preprocessing, leakage-safe relational context sets.

    from nexus_jax.data import Schema, ContextSetBuilder
    data = ContextSetBuilder(Schema.from_json("task/schema.json"), max_history=16).fit_transform(tables)

See `schema` (contract + validation), `preprocess` (TabularPreprocessor), `relational`
(ContextSetBuilder, build_context_sets), `context_sets` (RelationalData) and `datasets`.
"""

from nexus_jax.data.context_sets import ContextArrays, ContextSpec, RelationalData
from nexus_jax.data.preprocess import FeatureInfo, TabularPreprocessor
from nexus_jax.data.relational import ContextSetBuilder, build_context_sets, discover_contexts
from nexus_jax.data.schema import Schema, SchemaError, SchemaWarning, ValidationReport

__all__ = [
    "ContextArrays",
    "ContextSetBuilder",
    "ContextSpec",
    "FeatureInfo",
    "RelationalData",
    "Schema",
    "SchemaError",
    "SchemaWarning",
    "TabularPreprocessor",
    "ValidationReport",
    "build_context_sets",
    "discover_contexts",
]
