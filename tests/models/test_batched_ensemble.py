"""BatchedEnsemble: M vmapped members; combined outputs equal the members' mean; with
split_members each member sees only its own block of rows, so its gradient is its own loss's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models.tabular.ensemble import BatchedEnsemble, combine_outputs, member_loss
from nexus_jax.nexusflow.objectives import task_loss

M, B, F = 3, 6, 4


class _Member(nn.Module):
  n_out: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x["num"])))
    return nn.Dense(self.n_out)(h), {"score": x["num"].sum(-1), "present": x["num"][:, 0] > 0}


def _member_params(variables, m):
  return jax.tree.map(lambda a: a[m], variables["params"]["members"])


def _x(key=1, rows=B):
  return {"num": jax.random.normal(jax.random.key(key), (rows, F))}


@pytest.mark.parametrize("task,n_out", [("binary", 1), ("multiclass", 3), ("regression", 1)])
def test_combined_output_is_the_members_mean(task, n_out):
  model, x = BatchedEnsemble(_Member(n_out), size=M, task=task), _x()
  variables = model.init(jax.random.key(0), x)
  leaves = jax.tree.leaves(variables["params"])
  assert all(leaf.shape[0] == M for leaf in leaves)  # one leading member axis
  outs = jnp.stack(
      [_Member(n_out).apply({"params": _member_params(variables, m)}, x)[0] for m in range(M)]
  )
  assert not np.allclose(outs[0], outs[1])  # independent initialisations
  got, aux = model.apply(variables, x)
  np.testing.assert_allclose(got, combine_outputs(outs, task), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["score"], x["num"].sum(-1), rtol=1e-6)
  assert aux["present"].dtype == jnp.bool_


def test_split_members_gives_each_member_its_own_rows_and_gradient():
  model, x = BatchedEnsemble(_Member(1), size=M, task="binary"), _x()
  y = jnp.array([0, 1, 1, 0, 1, 0])
  batch = {"y": y, "weight": jnp.ones(B)}
  variables = model.init(jax.random.key(0), x)
  out, aux = model.apply(variables, x, split_members=True)
  assert out.shape == (M, B // M, 1) and aux["score"].shape == (M, B // M)
  rows = np.arange(B).reshape(M, B // M)
  for m in range(M):
    want = _Member(1).apply({"params": _member_params(variables, m)}, {"num": x["num"][rows[m]]})[0]
    np.testing.assert_allclose(out[m], want, rtol=1e-5, atol=1e-6)
  loss = member_loss(task_loss("binary"))

  def ensemble_loss(params):
    return loss(model.apply({"params": params}, x, split_members=True)[0], batch)[0]

  grads = jax.grad(ensemble_loss)(variables["params"])
  for m in range(M):

    def own(p, m=m):
      sub = {"num": x["num"][rows[m]]}
      o = _Member(1).apply({"params": p}, sub)[0]
      return task_loss("binary")(o, {"y": y[rows[m]], "weight": jnp.ones(B // M)})[0] / M

    want = jax.grad(own)(_member_params(variables, m))
    got = jax.tree.map(lambda g: g[m], grads["members"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, want)


def test_members_draw_their_own_dropout_and_bad_batch_is_named():
  model, x = BatchedEnsemble(_Member(1), size=2, task="regression"), _x(rows=4)
  variables = model.init(jax.random.key(0), x)
  same = {"params": jax.tree.map(lambda a: jnp.stack([a[0], a[0]]), variables["params"])}
  tiled = {"num": jnp.concatenate([x["num"][:2]] * 2)}
  out, _ = model.apply(
      same, tiled, train=True, split_members=True, rngs={"dropout": jax.random.key(3)}
  )
  assert not np.allclose(out[0], out[1])  # same params, same rows, different dropout masks
  with pytest.raises(ValueError, match="multiple of the member count; got 5"):
    model.apply(variables, _x(rows=5), split_members=True)
  with pytest.raises(ValueError, match="size"):
    BatchedEnsemble(_Member(1), size=0, task="binary").init(jax.random.key(0), x)


def test_member_loss_passes_combined_outputs_through():
  loss = task_loss("regression")
  out, batch = jnp.arange(4.0)[:, None], {"y": jnp.zeros(4), "weight": jnp.ones(4)}
  np.testing.assert_allclose(member_loss(loss)(out, batch)[0], loss(out, batch)[0])
  split = out.reshape(2, 2, 1)
  np.testing.assert_allclose(
      member_loss(loss)(split, batch)[0], (0.5 + 6.5) / 2
  )  # (0+1)/2, (4+9)/2


def test_member_outputs_train_every_member_on_every_row():
  model, x = BatchedEnsemble(_Member(1), size=M, task="regression"), _x()
  batch = {"y": jnp.linspace(-1.0, 1.0, B), "weight": jnp.ones(B)}
  variables = model.init(jax.random.key(0), x)
  out, aux = model.apply(variables, x, member_outputs=True)
  assert out.shape == (M, B, 1) and aux["score"].shape == (M, B)
  loss = task_loss("regression")
  own = []
  for m in range(M):
    want = _Member(1).apply({"params": _member_params(variables, m)}, x)[0]
    np.testing.assert_allclose(out[m], want, rtol=1e-5, atol=1e-6)
    own.append(loss(want, batch)[0])
  np.testing.assert_allclose(member_loss(loss)(out, batch)[0], np.mean(own), rtol=1e-5)
