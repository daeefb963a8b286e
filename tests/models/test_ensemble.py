"""MemberEnsemble: members get their own params; outputs combine probabilities as documented."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models.tabular.ensemble import MemberEnsemble, combine_outputs


class _Member(nn.Module):
  n_out: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.n_out)(x), {
        "score": x.sum(-1),
        "count": jnp.ones(x.shape[:1], jnp.int32),
        "present": x[:, 0] > 0,
    }


@pytest.mark.parametrize("task,n_out", [("binary", 1), ("multiclass", 3), ("regression", 1)])
def test_ensemble_combines_member_predictions(task, n_out):
  x = jax.random.normal(jax.random.key(1), (5, 4))
  model = MemberEnsemble(_Member(n_out), size=3, task=task)
  variables = model.init(jax.random.key(0), x)
  assert sorted(variables["params"]) == ["member_0", "member_1", "member_2"]
  outs = [
      np.asarray(_Member(n_out).apply({"params": variables["params"][f"member_{i}"]}, x)[0])
      for i in range(3)
  ]
  assert not np.allclose(outs[0], outs[1])  # independent initialisations
  got, aux = model.apply(variables, x)
  if task == "binary":
    want = np.mean([1 / (1 + np.exp(-o)) for o in outs], 0)
    np.testing.assert_allclose(1 / (1 + np.exp(-np.asarray(got))), want, rtol=1e-5)
  elif task == "multiclass":
    want = np.mean([np.exp(o) / np.exp(o).sum(-1, keepdims=True) for o in outs], 0)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)), want, rtol=1e-5)
    np.testing.assert_allclose(
        np.exp(np.asarray(got)).sum(-1), 1.0, rtol=1e-5
    )  # log mean probabilities
  else:
    np.testing.assert_allclose(got, np.mean(outs, 0), rtol=1e-5)
  np.testing.assert_allclose(aux["score"], x.sum(-1), rtol=1e-6)
  assert aux["count"].dtype == jnp.float32 and aux["present"].dtype == jnp.bool_


def test_single_member_and_bad_settings():
  x = jnp.ones((2, 4))
  one = MemberEnsemble(_Member(1), size=1, task="binary")
  v = one.init(jax.random.key(0), x)
  np.testing.assert_allclose(
      one.apply(v, x)[0], _Member(1).apply({"params": v["params"]["member_0"]}, x)[0], rtol=1e-5
  )
  with pytest.raises(ValueError, match="task"):
    MemberEnsemble(_Member(1), size=2, task="ranking").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="size"):
    MemberEnsemble(_Member(1), size=0, task="binary").init(jax.random.key(0), x)
  # Extreme member logits stay finite (probabilities are clipped before the logit).
  assert np.isfinite(combine_outputs(jnp.array([[[80.0]], [[90.0]]]), "binary")).all()
