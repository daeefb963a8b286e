"""RowPredictor: a registered encoder + linear head; encoder kwargs are checked, not filtered."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest

from tabular_testing import CARDS, synthetic_rows
from nexus_jax.models.tabular.row_predictor import RowPredictor


def test_shapes_and_encoder_kwargs_reach_the_encoder():
  x_num, x_cat, _ = synthetic_rows(8)
  model = RowPredictor(
      "lean_mlp", 3, CARDS, n_outputs=2, d_hidden=6, encoder_kwargs={"d_layers": [5]}
  )
  out, params = jax.eval_shape(
      lambda: (
          model.apply(v := nn.unbox(model.init(jax.random.key(0), x_num, x_cat)), x_num, x_cat)[0],
          v,
      )
  )
  assert out.shape == (8, 2)
  assert params["params"]["encoder"]["layer0"]["kernel"].shape == (3 + 3 + 2 * 4, 5)
  assert params["params"]["encoder"]["head"]["kernel"].shape == (5, 6)


def test_unknown_encoder_kwarg_fails_naming_key_encoder_and_fields():
  x_num, x_cat, _ = synthetic_rows(8)
  model = RowPredictor(
      "lean_mlp", 3, CARDS, encoder_kwargs={"d_layers": (5,), "numeric_embedding": "plr"}
  )
  with pytest.raises(
      ValueError,
      match=r"RowPredictor\.encoder_kwargs: encoder 'lean_mlp' \(LeanMLP\) has no "
      r"hyperparameter\(s\) \['numeric_embedding'\]; it accepts: d_embedding, d_layers, dropout\.",
  ):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x_num, x_cat))
