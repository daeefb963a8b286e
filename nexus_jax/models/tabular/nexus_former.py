"""NexusFormer: prediction for one target row from its own features and its relational context sets.

Inputs follow `nexus_jax.data.context_sets.RelationalData.arrays()` (B target rows, C contexts):

    target   = {"numeric": f32[B, Fn], "numeric_missing": bool[B, Fn], "categorical": i32[B, Fc]}
    contexts = {name: {"numeric": f32[B, M, Fn_c], "numeric_missing": bool[B, M, Fn_c],
                       "categorical": i32[B, M, Fc_c], "mask": bool[B, M], "ages": f32[B, M]}}

Pipeline (every step is a named submodule; widths are `d_model`):

1. Per-table encoders (`registry.get_encoder`): the target row -> token t0 [B, d]; each context's
   rows -> [B, M, d]. Contexts of the same table with the same feature layout share one encoder
   (`share_table_encoders`), e.g. ``origin->airports`` and ``dest->airports``.
   With ``join_context_rows`` the target encoder also reads row 0 of every context -- the parent
   row, or the most recent history row with its ``__age__`` -- as a one-to-one join learned from
   the schema (absent rows read as missing), so the target token starts from what a flat joined
   table would give a row model; the contexts then add what no single row holds.
2. One token per context: M = 1 (a parent row) keeps its row; M > 1 (a history) is pooled by
   `ContextPooling` -- masked multi-head attention whose query comes from the target token, with
   the rows' ages as recency features (keys = values = rows + recency, split into heads, so no
   per-row projection), plus set statistics (share of slots filled, ages) that plain
   softmax pooling cannot express. A context with no row gets a learned "empty" token and is
   masked out of everything below. Registry encoders with ``pools_rows`` (e.g. "standard") pool
   themselves.
3. Optional gating: a score per context (+ log of its prior weight); with ``top_k_contexts = k``
   only the k best-scoring present contexts stay, scaled by sigmoid(score). A prior weight of 0
   removes a context.
4. Cross-table attention among [target, context_1..C] tokens (`CrossTableRefiner`): one pre-norm
   transformer block applied R times with shared weights, recycling the previous tokens
   (x_{r+1} = Block(x_0 + W LN(x_r)), W zero-initialised). At inference it stops as soon as the
   relative change of an example's tokens falls below `convergence_tol` (per example, so a
   prediction never depends on its batch mates) and reports the iterations used.
5. Gated fusion: fused = t_R + W sum_c g_c h_c / max(1, #present), g_c = sigmoid(gate(t_R, h_c)),
   then the head LN -> Dense -> ReLU -> Dense(n_outputs) in float32.

Returns ``(outputs f32[B, n_outputs], aux)`` with aux:
  ``context_attention`` f32[B, C] (the target token's attention on each context in the last
  iteration, heads averaged; the rest of its attention is on itself), ``fusion_gates`` f32[B, C],
  ``context_present`` bool[B, C], ``iterations`` i32[B], ``refine_change`` f32[B] (relative change
  of the last iteration), ``pool_attention`` {name: f32[B, M]} for pooled histories.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.models.tabular.common import dense, layer_norm, logical_init
from nexus_jax.models.tabular.cross_table import ContextPooling, CrossTableRefiner
from nexus_jax.models.tabular.registry import encoder_kwargs, get_encoder

Array = jax.Array
ROW_KEYS = ("numeric", "numeric_missing", "categorical")
CONTEXT_KEYS = ROW_KEYS + ("mask", "ages")


@dataclasses.dataclass(frozen=True)
class TableFeatures:
  """Feature layout of one table's rows: Fn numeric features and the categorical cardinalities."""

  num_numeric: int
  cat_cardinalities: tuple[int, ...]

  @classmethod
  def from_info(cls, info: Any) -> "TableFeatures":
    """From a `nexus_jax.data.preprocess.FeatureInfo`."""
    return cls(len(info.numeric_names), tuple(int(c) for c in info.categorical_cardinalities))


def _featureless(features: "TableFeatures") -> bool:
  return features.num_numeric == 0 and not features.cat_cardinalities


class NexusFormer(nn.Module):
  """Target row + relational contexts -> prediction (see the module docstring for shapes).

  Attributes:
    target_features / context_features: feature layouts (one per context, in `context_names` order).
    context_names / context_tables: the contexts and the table each reads.
    target_encoder / context_encoders: registered encoder names (one per context).
    target_encoder_kwargs / context_encoder_kwargs: hyperparameters of the encoders (checked by
      `registry.encoder_kwargs`: a key the encoder does not have raises ValueError naming it);
      context_encoder_kwargs is one mapping for every context encoder or one per context.
    d_model: token width. n_heads: cross-table heads. pool_heads: heads of `ContextPooling`.
    ffn_factor: FFN hidden width of the cross-table block / d_model.
    refine_iterations: R at training. max_inference_iterations: cap at inference (0 = R).
    convergence_tol: inference early stop on the relative token change (0 = always R).
    top_k_contexts: keep only the k best-scoring present contexts (0 = all).
    join_context_rows: the target encoder also reads row 0 of every context (see step 1).
    context_priors: prior weight per context (>= 0; 0 removes it; None = all 1).
    share_table_encoders: contexts of one table with one feature layout share an encoder.
    d_head: hidden width of the head. n_outputs: 1 (binary logit / regression) or n_classes.
    dropout, attention_dropout: of the cross-table block and the head.
    linear_head: add a linear function of the target row's own features to the output (wide and
      deep: zero at init, so training starts from the deep model; `_linear_term`).
  """

  target_features: TableFeatures
  context_features: Sequence[TableFeatures]
  context_names: Sequence[str]
  context_tables: Sequence[str]
  target_encoder: str = "mlp"
  context_encoders: Sequence[str] | None = None  # None: "mlp" for every context
  target_encoder_kwargs: Mapping[str, Any] | None = None
  context_encoder_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
  d_model: int = 64
  n_heads: int = 4
  pool_heads: int = 2
  ffn_factor: float = 2.0
  refine_iterations: int = 2
  max_inference_iterations: int = 0
  convergence_tol: float = 1e-3
  top_k_contexts: int = 0
  join_context_rows: bool = False
  context_priors: Sequence[float] | None = None
  share_table_encoders: bool = True
  d_head: int = 64
  n_outputs: int = 1
  dropout: float = 0.1
  attention_dropout: float = 0.0
  linear_head: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _constant_token(self, name: str, batch: int) -> Array:
    """A learned `[B, d_model]` token for a row without features."""
    value = self.param(
        name,
        logical_init(("embed",), nn.initializers.normal(0.02)),
        (self.d_model,),
        self.param_dtype,
    )
    return jnp.broadcast_to(value.astype(self.dtype), (batch, self.d_model))

  def _linear_term(self, target: Mapping[str, Array]) -> Array:
    """Wide part `[B, n_outputs]`: a linear function of the target row's own encoded features (numeric
    values, missing flags, one weight vector per category), zero at init, added to the head."""
    feats, b = self.target_features, target["numeric"].shape[0]
    out = jnp.zeros((b, self.n_outputs), jnp.float32)
    if feats.num_numeric:
      x = jnp.concatenate([target["numeric"], target["numeric_missing"]], -1).astype(jnp.float32)
      zeros = nn.initializers.zeros_init()
      out = out + dense(self.n_outputs, ("feature", None), "linear_numeric", init=zeros)(x)
    if feats.cat_cardinalities:
      offsets = np.cumsum((0,) + tuple(feats.cat_cardinalities[:-1]))
      table = self.param(
          "linear_categorical",
          logical_init(("feature", None), nn.initializers.zeros_init()),
          (int(sum(feats.cat_cardinalities)), self.n_outputs),
          self.param_dtype,
      )
      codes = target["categorical"].astype(jnp.int32) + jnp.asarray(offsets, jnp.int32)
      out = out + jnp.take(table.astype(jnp.float32), codes, axis=0).sum(1)
    return out

  def _encoder(
      self, kind: str, features: TableFeatures, kwargs: Mapping[str, Any], name: str
  ) -> nn.Module:
    return get_encoder(kind)(
        num_numeric=features.num_numeric,
        cat_cardinalities=tuple(features.cat_cardinalities),
        d_out=self.d_model,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        **kwargs,
    )

  def _context_kwargs(self, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """`context_encoder_kwargs` checked against each context's encoder: one dict per context."""
    given = self.context_encoder_kwargs
    c = len(self.context_names)
    if not isinstance(given, (list, tuple)):  # None or one mapping for every context
      given = [given] * c
    elif len(given) != c:
      raise ValueError(
          f"NexusFormer.context_encoder_kwargs has {len(given)} entries for {c} contexts "
          f"{list(self.context_names)}; give one mapping for all or one per context."
      )
    return [
        encoder_kwargs(kind, kw, f"NexusFormer.context_encoder_kwargs (context {name!r})")
        for name, kind, kw in zip(self.context_names, kinds, given)
    ]

  def _check(self, target: Mapping[str, Array], contexts: Mapping[str, Mapping[str, Array]]) -> int:
    c = len(self.context_names)
    for field, n in (
        ("context_features", len(self.context_features)),
        ("context_tables", len(self.context_tables)),
        ("context_encoders", c if self.context_encoders is None else len(self.context_encoders)),
        ("context_priors", c if self.context_priors is None else len(self.context_priors)),
    ):
      if n != c:
        raise ValueError(
            f"NexusFormer.{field} has {n} entries for {c} contexts {list(self.context_names)}."
        )
    missing = [k for k in ROW_KEYS if k not in target]
    if missing:
      raise ValueError(f"NexusFormer: target row inputs lack {missing}; expected keys {ROW_KEYS}.")
    b = target["numeric"].shape[0]
    tf = self.target_features
    if target["numeric"].shape != (b, tf.num_numeric) or target["categorical"].shape != (
        b,
        len(tf.cat_cardinalities),
    ):
      raise ValueError(
          f"NexusFormer: target numeric {target['numeric'].shape} / categorical "
          f"{target['categorical'].shape}; expected [{b}, {tf.num_numeric}] / "
          f"[{b}, {len(tf.cat_cardinalities)}]."
      )
    absent = [n for n in self.context_names if n not in contexts]
    unknown = [n for n in contexts if n not in self.context_names]
    if absent or unknown:
      raise ValueError(
          f"NexusFormer: contexts given {sorted(contexts)} differ from the model's "
          f"{list(self.context_names)} (absent: {absent}, unknown: {unknown})."
      )
    for name, table, feats in zip(self.context_names, self.context_tables, self.context_features):
      ctx = contexts[name]
      missing = [k for k in CONTEXT_KEYS if k not in ctx]
      if missing:
        raise ValueError(f"NexusFormer: context {name!r} (table {table!r}) lacks {missing}.")
      m = ctx["mask"].shape[1] if ctx["mask"].ndim == 2 else -1
      want = {
          "numeric": (b, m, feats.num_numeric),
          "numeric_missing": (b, m, feats.num_numeric),
          "categorical": (b, m, len(feats.cat_cardinalities)),
          "mask": (b, m),
          "ages": (b, m),
      }
      for key, shape in want.items():
        if tuple(ctx[key].shape) != shape:
          raise ValueError(
              f"NexusFormer: context {name!r} (table {table!r}) {key} has shape "
              f"{tuple(ctx[key].shape)}; expected {shape} ([batch, rows, features])."
          )
    return b

  def _joined_target(
      self, target: Mapping[str, Array], contexts: Mapping[str, Mapping[str, Array]]
  ) -> tuple[TableFeatures, dict[str, Array]]:
    """The target row followed by row 0 of every context: (layout, {numeric, numeric_missing, categorical} [B, F])."""
    feats = [self.target_features, *self.context_features]
    num, missing, cat = [target["numeric"]], [target["numeric_missing"]], [target["categorical"]]
    for name in self.context_names:
      ctx = contexts[name]
      present = ctx["mask"][:, :1].astype(bool)  # [B, 1]
      num.append(jnp.where(present, ctx["numeric"][:, 0], 0.0))
      missing.append(ctx["numeric_missing"][:, 0].astype(bool) | ~present)
      cat.append(jnp.where(present, ctx["categorical"][:, 0], 0))  # code 0 = missing
    layout = TableFeatures(
        sum(f.num_numeric for f in feats), tuple(c for f in feats for c in f.cat_cardinalities)
    )
    return layout, {
        "numeric": jnp.concatenate(num, -1),
        "numeric_missing": jnp.concatenate(missing, -1),
        "categorical": jnp.concatenate(cat, -1),
    }

  @nn.compact
  def __call__(
      self,
      target: Mapping[str, Array],
      contexts: Mapping[str, Mapping[str, Array]],
      *,
      train: bool = False,
  ) -> tuple[Array, dict[str, Any]]:
    b = self._check(target, contexts)
    det, dt, pdt, d = not train, self.dtype, self.param_dtype, self.d_model
    target_layout, row = self.target_features, target
    if self.join_context_rows:
      target_layout, row = self._joined_target(target, contexts)
    target_kwargs = encoder_kwargs(
        self.target_encoder, self.target_encoder_kwargs, "NexusFormer.target_encoder_kwargs"
    )
    if _featureless(target_layout):  # only keys and the label: a learned constant token
      t0 = self._constant_token("target_token", b)
    else:
      t0, _ = self._encoder(self.target_encoder, target_layout, target_kwargs, "target_encoder")(
          row["numeric"], row["categorical"], row["numeric_missing"], deterministic=det
      )
    t0 = layer_norm("target_norm", dt, pdt)(t0.astype(dt))
    encoders: dict[Any, nn.Module] = {}
    kinds = self.context_encoders or ("mlp",) * len(self.context_names)
    tokens, present, pool_attention = [], [], {}
    for name, table, feats, kind, kwargs in zip(
        self.context_names,
        self.context_tables,
        self.context_features,
        kinds,
        self._context_kwargs(kinds),
    ):
      ctx = contexts[name]
      if _featureless(feats):  # a table with no feature columns: whether its row exists is all
        mask = ctx["mask"].astype(bool)
        token = self._constant_token(f"empty_context_{len(tokens)}", b)
        tokens.append(layer_norm(f"context_norm_{len(tokens)}", dt, pdt)(token.astype(dt)))
        present.append(jnp.any(mask, axis=1))
        continue
      key = (
          (table, feats, kind, repr(sorted(kwargs.items()))) if self.share_table_encoders else name
      )
      if key not in encoders:  # first encoder of a table: "encoder_<table>", later ones numbered
        taken = sum(n.startswith(f"encoder_{table}") for n in (e.name for e in encoders.values()))
        encoders[key] = self._encoder(
            kind, feats, kwargs, f"encoder_{table}" + (f"_{taken}" if taken else "")
        )
      encoder, mask = encoders[key], ctx["mask"].astype(bool)
      if getattr(type(encoder), "pools_rows", False):
        token, aux = encoder(
            ctx["numeric"],
            ctx["categorical"],
            ctx["numeric_missing"],
            mask,
            ages=ctx["ages"],
            deterministic=det,
        )
        pool_attention[name] = aux.get("attention")
      else:
        rows, _ = encoder(
            ctx["numeric"], ctx["categorical"], ctx["numeric_missing"], mask, deterministic=det
        )
        if mask.shape[1] == 1:
          token = rows[:, 0]
        else:
          token, pool_attention[name] = ContextPooling(
              d, self.pool_heads, dtype=dt, param_dtype=pdt, name=f"pool_{len(tokens)}"
          )(rows, mask, ctx["ages"], t0)
      tokens.append(layer_norm(f"context_norm_{len(tokens)}", dt, pdt)(token.astype(dt)))
      present.append(jnp.any(mask, axis=1))
    n_ctx = len(tokens)
    ctx_tokens = jnp.stack(tokens, axis=1) if n_ctx else jnp.zeros((b, 0, d), dt)  # [B, C, d]
    present = jnp.stack(present, axis=1) if n_ctx else jnp.zeros((b, 0), bool)
    log_prior = jnp.zeros((n_ctx,), jnp.float32)
    if self.context_priors is not None:
      priors = np.asarray(self.context_priors, np.float64)
      if (priors < 0).any():
        raise ValueError(f"NexusFormer.context_priors must be >= 0, got {list(priors)}.")
      present = present & jnp.asarray(priors > 0)
      log_prior = jnp.asarray(np.log(np.maximum(priors, 1e-30)), jnp.float32)
    selected = present
    # The scorer exists whatever top_k_contexts is, so params never depend on it (unused -> compiled away).
    score = (
        dense(1, ("embed", None), "context_score", jnp.float32, pdt)(
            layer_norm("score_norm", jnp.float32, pdt)(ctx_tokens.astype(jnp.float32))
        )[..., 0]
        + log_prior
    )
    if self.top_k_contexts and self.top_k_contexts < n_ctx:
      masked = jnp.where(present, score, -jnp.inf)
      kth = jax.lax.top_k(masked, self.top_k_contexts)[0][:, -1:]
      selected = present & (masked >= kth)
      ctx_tokens = ctx_tokens * jax.nn.sigmoid(score)[..., None].astype(dt)
    slot = self.param(
        "slot_embedding",
        logical_init(("table", "embed"), nn.initializers.normal(0.02)),
        (1 + n_ctx, d),
        pdt,
    )
    x0 = jnp.concatenate([t0[:, None], ctx_tokens], axis=1) + slot.astype(dt)
    x0 = jnp.where(jnp.concatenate([jnp.ones((b, 1), bool), selected], 1)[..., None], x0, 0)
    token_mask = jnp.concatenate(
        [jnp.ones((b, 1), bool), selected], axis=1
    )  # the target is always present
    x, probs, iterations, change = CrossTableRefiner(
        d,
        self.n_heads,
        int(d * self.ffn_factor),
        self.attention_dropout,
        self.dropout,
        self.refine_iterations,
        self.max_inference_iterations,
        self.convergence_tol,
        dt,
        pdt,
        name="refiner",
    )(x0, token_mask, deterministic=det)
    h_t, h_c = x[:, 0], x[:, 1:]
    gate_in = jnp.concatenate([jnp.broadcast_to(h_t[:, None], h_c.shape), h_c], axis=-1)
    gate_logit = dense(1, ("mlp", None), "fusion_gate", jnp.float32, pdt)(
        gate_in.astype(jnp.float32)
    )[..., 0]
    gates = jax.nn.sigmoid(gate_logit + log_prior) * selected
    summary = jnp.sum(gates[..., None].astype(dt) * h_c, axis=1) / jnp.maximum(
        jnp.sum(selected, axis=1, keepdims=True), 1
    ).astype(dt)
    fused = h_t + dense(d, ("mlp", "embed"), "fusion", dt, pdt)(summary)
    h = layer_norm("head_norm", jnp.float32, pdt)(fused.astype(jnp.float32))
    h = nn.Dropout(self.dropout)(
        jax.nn.relu(dense(self.d_head, ("embed", "mlp"), "head_hidden", jnp.float32, pdt)(h)),
        deterministic=det,
    )
    out = dense(self.n_outputs, ("mlp", None), "head", jnp.float32, pdt)(h)
    if self.linear_head:
      out = out + self._linear_term(target)
    aux = {
        "context_attention": jnp.mean(probs[:, :, 0, 1:], axis=1),
        "fusion_gates": gates,
        "context_present": selected,
        "iterations": iterations,
        "refine_change": change,
        "pool_attention": pool_attention,
    }
    return out, aux
