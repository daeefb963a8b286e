"""Feature tokenizer: one row's numeric and categorical features -> one `dim`-vector per feature.

As in FT-Transformer (Gorishniy et al. 2021) with the periodic numeric embeddings of Gorishniy et al.
2022 ("On Embeddings for Numerical Features in Tabular Deep Learning"):

- numeric, ``"linear"``:  ``t_f = x_f * W_f + b_f``                                 `W, b: [Fn, dim]`
- numeric, ``"plr"``:     ``t_f = relu([cos(2 pi c_f x_f), sin(2 pi c_f x_f)] @ L_f + b_f)``,
  trainable frequencies ``c_f ~ N(0, plr_sigma^2)`` `[Fn, K]`, per-feature linear `L_f: [2K, dim]`.
- numeric, ``"plr_lite"``: the same with ONE linear `L: [2K, dim]` shared by all features (per-feature
  frequencies and bias kept; "PLR(lite)" of the TabM paper, Gorishniy et al. 2024): one `[B*Fn, 2K]`
  matmul instead of Fn tiny ones, which XLA:CPU runs several times faster once rows carry hundreds
  of numeric features (e.g. child-table summaries).
- missing numeric values (``num_missing`` True) take a learned per-feature token `[Fn, dim]`
  instead, whatever the imputed value was.
- categorical: ``t_f = E[offset_f + code_f] + b_f`` with one stacked table `E: [sum(card), dim]`;
  codes follow `TabularPreprocessor` (0 missing, 1 unknown, >= 2 categories); codes outside
  ``[0, card_f)`` are read as unknown (1).
- a learned CLS token `[dim]` goes FIRST when ``cls_token``.

Output tokens ``[..., T, dim]`` with ``T = cls_token + Fn + Fc`` in the order CLS, numeric, categorical;
``...`` is any leading shape, e.g. `[batch]` or `[batch, rows]`. `token_missing_mask` gives the
matching `[..., T]` mask of missing feature values. Params carry logical axis names
(``feature``, ``vocab``, ``embed``) for `train/sharding.py`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NUMERIC_EMBEDDINGS = ("linear", "plr", "plr_lite")


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def _truncated_normal(stddev: float):
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)

  return init


def token_missing_mask(
    num_missing: Array | None, x_cat: Array | None, cls_token: bool = True
) -> Array:
  """True where a token's feature value is missing, aligned with `FeatureTokenizer`'s output.

  Args:
    num_missing: bool `[..., Fn]` or None (no numeric features).
    x_cat: int `[..., Fc]` or None; code 0 is missing.
    cls_token: whether the tokens start with CLS (never missing).
  Returns:
    bool `[..., cls_token + Fn + Fc]`.
  """
  parts = []
  if num_missing is not None:
    parts.append(num_missing.astype(bool))
  if x_cat is not None:
    parts.append(x_cat == 0)
  if not parts:
    raise ValueError("token_missing_mask: pass num_missing or x_cat")
  lead = parts[0].shape[:-1]
  if cls_token:
    parts.insert(0, jnp.zeros(lead + (1,), bool))
  return jnp.concatenate(parts, axis=-1)


class FeatureTokenizer(nn.Module):
  """Per-feature embeddings + optional CLS.

  Attributes:
    num_numeric: Fn, numeric features per row.
    cat_cardinalities: codes per categorical feature (Fc entries), reserved codes included.
    dim: token width.
    numeric_embedding: ``"linear"``, ``"plr"`` (periodic -> linear -> relu) or ``"plr_lite"`` (one
      linear shared by all features).
    plr_frequencies: K, frequencies per numeric feature for ``"plr"``.
    plr_sigma: init std of the frequencies (rtdl's ``frequency_init_scale``).
    cls_token: prepend a learned CLS token.
    dtype: dtype of the returned tokens (the periodic argument is always computed in float32).
    param_dtype: dtype of the params.
  """

  num_numeric: int
  cat_cardinalities: Sequence[int]
  dim: int
  numeric_embedding: str = "linear"
  plr_frequencies: int = 48
  plr_sigma: float = 0.01
  cls_token: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    """T = cls_token + Fn + Fc."""
    return int(self.cls_token) + self.num_numeric + len(self.cat_cardinalities)

  def _param(self, name: str, init, shape: tuple[int, ...], names: tuple[str | None, ...]) -> Array:
    return self.param(name, nn.with_logical_partitioning(init, names), shape, self.param_dtype)

  def _check(self, x_num, x_cat, num_missing) -> tuple[int, ...]:
    if self.numeric_embedding not in NUMERIC_EMBEDDINGS:
      raise ValueError(
          f"FeatureTokenizer.numeric_embedding={self.numeric_embedding!r}; "
          f"choose from {NUMERIC_EMBEDDINGS}"
      )
    if any(int(c) < 1 for c in self.cat_cardinalities):
      raise ValueError(
          f"FeatureTokenizer.cat_cardinalities must be >= 1, got {tuple(self.cat_cardinalities)}"
      )
    if self.num_tokens == 0:
      raise ValueError(
          "FeatureTokenizer: no numeric features, no categorical features and no CLS token"
      )
    lead = None
    for name, x, width in (
        ("x_num", x_num, self.num_numeric),
        ("x_cat", x_cat, len(self.cat_cardinalities)),
        ("num_missing", num_missing, self.num_numeric),
    ):
      if x is None:
        if width and name != "num_missing":
          raise ValueError(f"FeatureTokenizer: {name} is None but {width} features were declared")
        continue
      if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"FeatureTokenizer: {name} has shape {x.shape}; expected [..., {width}]")
      if lead is not None and x.shape[:-1] != lead:
        raise ValueError(
            f"FeatureTokenizer: {name} leading shape {x.shape[:-1]} differs from {lead}"
        )
      lead = x.shape[:-1]
    if lead is None:
      raise ValueError("FeatureTokenizer: pass x_num or x_cat to know the leading shape")
    if x_cat is not None and not jnp.issubdtype(x_cat.dtype, jnp.integer):
      raise TypeError(f"FeatureTokenizer: x_cat must be integer codes, got {x_cat.dtype}")
    return lead

  @nn.compact
  def __call__(
      self, x_num: Array | None, x_cat: Array | None, num_missing: Array | None = None
  ) -> Array:
    """Tokenizes rows.

    Args:
      x_num: float `[..., Fn]` (any float dtype; imputed values where missing).
      x_cat: int `[..., Fc]` codes.
      num_missing: optional bool `[..., Fn]`, True where the numeric value was missing.
    Returns:
      tokens `[..., T, dim]` in `dtype`, T = cls_token + Fn + Fc, CLS first.
    """
    lead = self._check(x_num, x_cat, num_missing)
    d, fn = self.dim, self.num_numeric
    tokens = []
    if self.cls_token:
      cls = self._param("cls", _uniform(1.0 / np.sqrt(d)), (d,), ("embed",))
      tokens.append(jnp.broadcast_to(cls.astype(self.dtype), lead + (1, d)))
    if fn:
      x = x_num.astype(jnp.float32)[..., None]  # [..., Fn, 1]
      if self.numeric_embedding == "linear":
        w = self._param("num_weight", _uniform(1.0 / np.sqrt(d)), (fn, d), ("feature", "embed"))
        b = self._param("num_bias", _uniform(1.0 / np.sqrt(d)), (fn, d), ("feature", "embed"))
        t_num = (x * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(self.dtype)
      else:
        k = self.plr_frequencies
        c = self._param(
            "plr_frequencies", _truncated_normal(self.plr_sigma), (fn, k), ("feature", None)
        )
        angle = 2.0 * jnp.pi * c.astype(jnp.float32) * x  # [..., Fn, K], float32 always
        periodic = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1).astype(self.dtype)
        b = self._param("plr_bias", _uniform(1.0 / np.sqrt(2 * k)), (fn, d), ("feature", "embed"))
        if self.numeric_embedding == "plr_lite":
          w = self._param("plr_weight", _uniform(1.0 / np.sqrt(2 * k)), (2 * k, d), (None, "embed"))
          t_num = jnp.einsum("...fk,kd->...fd", periodic, w.astype(self.dtype))
        else:
          w = self._param(
              "plr_weight",
              _uniform(1.0 / np.sqrt(2 * k)),
              (fn, 2 * k, d),
              ("feature", None, "embed"),
          )
          t_num = jnp.einsum("...fk,fkd->...fd", periodic, w.astype(self.dtype))
        t_num = t_num + b.astype(self.dtype)
        t_num = nn.relu(t_num)
      # Created even without a mask so params do not depend on whether one is passed.
      m = self._param("missing", _uniform(1.0 / np.sqrt(d)), (fn, d), ("feature", "embed"))
      if num_missing is not None:
        t_num = jnp.where(num_missing[..., None], m.astype(self.dtype), t_num)
      tokens.append(t_num)
    if self.cat_cardinalities:
      cards = np.asarray(self.cat_cardinalities, dtype=np.int32)
      offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int32)
      # Rows: the data's category counts (no mesh axis would reliably divide them): replicated.
      table = self._param(
          "cat_embedding", _uniform(1.0 / np.sqrt(d)), (int(cards.sum()), d), (None, "embed")
      )
      bias = self._param(
          "cat_bias", _uniform(1.0 / np.sqrt(d)), (len(cards), d), ("feature", "embed")
      )
      codes = x_cat.astype(jnp.int32)
      codes = jnp.where((codes >= 0) & (codes < cards), codes, np.minimum(1, cards - 1))
      t_cat = jnp.take(table, codes + offsets, axis=0) + bias  # [..., Fc, dim]
      tokens.append(t_cat.astype(self.dtype))
    return jnp.concatenate(tokens, axis=-2)
