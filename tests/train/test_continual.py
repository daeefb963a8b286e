"""Continual learning: the Fisher against a hand computation (per-example, not of the mean), the
EWC transform's exact added term, EWC / online-EWC consolidation, a uniform reservoir (binomial
bounds), accuracy-matrix metrics against a hand example, ValueErrors naming the field, checkpoint
round trip of an EWC state, and one tiny end-to-end sequence per method."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.train import continual
from nexus_jax.train.checkpoint import Checkpointer
from nexus_jax.train.continual import ContinualConfig, Task
from nexus_jax.train.ewc import EWCState, consolidate, ewc, ewc_penalty, find_ewc_state
from nexus_jax.train.fisher import diagonal_fisher, per_example_grads
from nexus_jax.train.replay import ReservoirBuffer
from nexus_jax.train.state import TrainState
from nexus_jax.train.steps import Objective

# --- Fisher -------------------------------------------------------------------------------------


def logistic_logits(params, batch):
  """Logistic regression with 2 weights as 2 logits [0, w . x]: p(y=1) = sigmoid(w . x)."""
  z = batch["x"] @ params["w"]
  return jnp.stack([jnp.zeros_like(z), z], -1)


def logistic_data():
  x = np.array([[1.0, 2.0], [-0.5, 1.0], [2.0, -1.0], [0.3, 0.7]], np.float32)
  y = np.array([1, 0, 0, 1], np.int32)
  return {"x": x, "label": y}, {"w": jnp.array([0.4, -0.3], jnp.float32)}


def test_empirical_fisher_is_the_mean_of_squared_per_example_grads_by_hand():
  data, params = logistic_data()
  p = 1 / (1 + np.exp(-(data["x"] @ np.asarray(params["w"]))))
  g = (data["label"] - p)[:, None] * data["x"]  # d log p(y|x) / dw = (y - p) x, per example
  fisher = diagonal_fisher(
      logistic_logits, params, data, lambda b: b["label"], variant="empirical", chunk_size=3
  )
  np.testing.assert_allclose(fisher["w"], np.mean(g**2, 0), rtol=1e-5)
  # The classic bug (square of the batch-mean gradient) is a different, smaller number.
  assert not np.allclose(fisher["w"], np.mean(g, 0) ** 2, rtol=1e-2)
  grads = per_example_grads(logistic_logits, params, data, lambda b: b["label"], "empirical")
  np.testing.assert_allclose(grads["w"], g, rtol=1e-5)


def test_sampled_fisher_by_hand_and_its_expectation():
  data, params = logistic_data()
  p = 1 / (1 + np.exp(-(data["x"] @ np.asarray(params["w"]))))
  rng = jax.random.PRNGKey(3)
  fisher = diagonal_fisher(
      logistic_logits, params, data, lambda b: b["label"], variant="sampled", rng=rng
  )
  # The labels it drew: example n uses fold_in(rng, n) on the model's own log-probabilities.
  logp = jax.nn.log_softmax(logistic_logits(params, data), -1)
  ys = np.array(
      [jax.random.categorical(jax.random.fold_in(rng, n), logp[n : n + 1])[0] for n in range(4)]
  )
  g = (ys - p)[:, None] * data["x"]
  np.testing.assert_allclose(fisher["w"], np.mean(g**2, 0), rtol=1e-5)
  # Averaged over many draws it approaches the true Fisher E_y[g^2] = mean_n p(1-p) x^2.
  many = {k: np.repeat(v, 2000, 0) for k, v in data.items()}
  estimate = diagonal_fisher(
      logistic_logits, params, many, lambda b: b["label"], rng=rng, chunk_size=2000
  )
  exact = np.mean((p * (1 - p))[:, None] * data["x"] ** 2, 0)
  np.testing.assert_allclose(estimate["w"], exact, rtol=0.05)


def test_sequence_fisher_averages_over_weighted_positions():
  data, params = logistic_data()
  seq = {"x": data["x"][:, None, :].repeat(3, 1), "label": data["label"][:, None].repeat(3, 1)}
  mask = np.array([[1, 1, 0]] * 4, np.float32)
  seq_logits = lambda prm, b: logistic_logits(prm, {"x": b["x"]})
  fisher = diagonal_fisher(
      seq_logits,
      params,
      {**seq, "mask": mask},
      lambda b: (b["label"], b["mask"]),
      variant="empirical",
  )
  flat = diagonal_fisher(logistic_logits, params, data, lambda b: b["label"], variant="empirical")
  np.testing.assert_allclose(fisher["w"], flat["w"], rtol=1e-5)  # mean of identical positions


# --- EWC ----------------------------------------------------------------------------------------


def tree(a, b):
  return {"dense": {"kernel": jnp.asarray(a, jnp.float32)}, "bias": jnp.asarray(b, jnp.float32)}


def test_ewc_adds_exactly_lambda_fisher_times_displacement():
  lam = 2.5
  tx = ewc(lam)
  anchor, params = tree([[1.0, 2.0]], [0.5]), tree([[1.5, 1.0]], [-0.5])
  fisher = tree([[0.2, 3.0]], [1.0])
  grads = tree([[0.1, -0.1]], [0.3])
  state = tx.init(anchor)
  out, _ = tx.update(grads, state, params)  # before any task: identity
  jax.tree.map(np.testing.assert_array_equal, out, grads)
  state = consolidate(state, anchor, fisher)
  out, _ = tx.update(grads, state, params)
  want = jax.tree.map(lambda g, f, p, a: g + lam * f * (p - a), grads, fisher, params, anchor)
  jax.tree.map(lambda o, w: np.testing.assert_allclose(o, w, rtol=1e-6), out, want)
  penalty = 0.5 * lam * (0.2 * 0.25 + 3.0 * 1.0 + 1.0 * 1.0)
  np.testing.assert_allclose(ewc_penalty(state, params), penalty, rtol=1e-6)
  # Chained before an optimizer: SGD(1) then applies exactly -(g + lambda F (theta - theta*)).
  chained = optax.chain(ewc(lam), optax.sgd(1.0))
  cstate = consolidate(chained.init(anchor), anchor, fisher)
  upd, _ = chained.update(grads, cstate, params)
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -w, rtol=1e-6), upd, want)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state)


def test_ewc_consolidation_keeps_every_task_penalty_exactly():
  lam = 1.0
  tx = ewc(lam)
  t1, t2, theta = tree([[1.0, -2.0]], [0.0]), tree([[3.0, 0.0]], [1.0]), tree([[0.5, 0.5]], [2.0])
  f1, f2 = tree([[1.0, 0.0]], [2.0]), tree([[3.0, 4.0]], [0.0])
  state = consolidate(consolidate(tx.init(t1), t1, f1), t2, f2)
  out, _ = tx.update(jax.tree.map(jnp.zeros_like, theta), state, theta)
  # Kirkpatrick et al.: the gradient of sum_i lambda/2 F_i (theta - theta*_i)^2.
  want = jax.tree.map(
      lambda a, b, fa, fb, p: lam * (fa * (p - a) + fb * (p - b)), t1, t2, f1, f2, theta
  )
  jax.tree.map(lambda o, w: np.testing.assert_allclose(o, w, rtol=1e-6), out, want)
  assert int(find_ewc_state(state).num_tasks) == 2


def test_online_ewc_decays_the_old_fisher_and_moves_the_anchor():
  gamma = 0.5
  tx = optax.chain(ewc(3.0, online=True, gamma=gamma), optax.adam(1e-3))
  t1, t2 = tree([[1.0, 2.0]], [0.0]), tree([[0.0, 1.0]], [1.0])
  f1, f2 = tree([[2.0, 4.0]], [8.0]), tree([[1.0, 1.0]], [1.0])
  state = consolidate(tx.init(t1), t1, f1)
  state = consolidate(state, t2, f2)
  s = find_ewc_state(state)
  jax.tree.map(lambda f, a, b: np.testing.assert_allclose(f, gamma * a + b), s.fisher, f1, f2)
  jax.tree.map(np.testing.assert_array_equal, s.anchor, t2)
  assert isinstance(state[0], EWCState) and int(s.num_tasks) == 2
  # the anchor owns its buffers (a donated TrainState must not alias params)
  assert s.anchor["bias"] is not t2["bias"]


def test_ewc_state_round_trips_through_the_checkpointer(tmp_path):
  tx = optax.chain(ewc(4.0, online=True, gamma=0.8), optax.adam(1e-2))
  params = tree([[1.0, 2.0]], [3.0])
  state = TrainState.create(apply_fn=None, params=params, tx=tx, rng=jax.random.PRNGKey(0))
  state = state.replace(opt_state=consolidate(state.opt_state, params, tree([[1.0, 0.5]], [2.0])))
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(state, {})
  fresh = TrainState.create(apply_fn=None, params=params, tx=tx, rng=jax.random.PRNGKey(1))
  restored, _ = ckpt.restore(ckpt.latest_step(), fresh)
  ckpt.close()
  got, want = find_ewc_state(restored.opt_state), find_ewc_state(state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, got, want)


# --- replay -------------------------------------------------------------------------------------


def test_reservoir_is_uniform_over_the_stream():
  n, capacity, trials = 60, 12, 3000
  counts = np.zeros(n)
  for seed in range(trials):
    buf = ReservoirBuffer(capacity, seed=seed)
    chunks = np.split(np.arange(n), [5, 17, 40])  # chunking must not matter
    for c in chunks:
      buf.add({"id": c})
    ids = buf.contents()["id"]
    assert buf.size == capacity and buf.num_seen == n and len(set(ids.tolist())) == capacity
    counts[ids] += 1
  p = capacity / n
  # Each item's inclusion count is Binomial(trials, p): all within 4.5 sigma (Bonferroni-safe).
  sigma = math.sqrt(trials * p * (1 - p))
  assert np.max(np.abs(counts - trials * p)) < 4.5 * sigma
  # Pearson chi-square of the counts against uniform (sum = trials * capacity), df = n - 1.
  chi2 = np.sum((counts - trials * p) ** 2 / (trials * p))
  assert chi2 < (n - 1) + 5 * math.sqrt(2 * (n - 1))
  # early and late items are equally likely (Algorithm R's whole point)
  assert abs(counts[:capacity].mean() - counts[-capacity:].mean()) < 4 * sigma / math.sqrt(capacity)


def test_reservoir_fill_sample_and_mix():
  buf = ReservoirBuffer(5, seed=0)
  rng = np.random.default_rng(0)
  batch = {"x": np.zeros((4, 2), np.float32), "weight": np.ones(4, np.float32)}
  assert buf.mix(batch, 3, rng) is batch  # empty: unchanged
  buf.add({"x": np.arange(6, dtype=np.float32).reshape(3, 2)})
  assert buf.size == 3
  np.testing.assert_array_equal(buf.contents()["x"][:, 0], [0, 2, 4])  # filling keeps all
  mixed = buf.mix(batch, 3, rng)
  assert mixed["x"].shape == (7, 2) and mixed["weight"].tolist() == [1.0] * 7
  assert set(mixed["x"][4:, 0].tolist()) <= {0.0, 2.0, 4.0}


# --- metrics and validation ---------------------------------------------------------------------


def test_accuracy_matrix_metrics_against_a_hand_example():
  r = np.array([[0.9, 0.1, 0.2], [0.6, 0.8, 0.1], [0.5, 0.7, 0.95]])
  assert continual.average_accuracy(r) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
  assert continual.backward_transfer(r) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
  assert continual.forgetting(r) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
  assert math.isnan(continual.backward_transfer([[0.7]]))
  with pytest.raises(ValueError, match="square"):
    continual.average_accuracy(np.zeros((2, 3)))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ewc(-1.0), "ewc_lambda"),
        (lambda: ewc(1.0, online=True, gamma=1.5), "gamma"),
        (lambda: ewc(1.0, online=True, gamma=-0.1), "gamma"),
        (lambda: ReservoirBuffer(0), "capacity"),
        (
            lambda: diagonal_fisher(logistic_logits, *logistic_data()[::-1], None, variant="exact"),
            "variant",
        ),
        (lambda: ContinualConfig(method="replay", replay_capacity=0).validate(), "replay_capacity"),
        (lambda: ContinualConfig(fisher_variant="true").validate(), "variant"),
        (lambda: ContinualConfig(ewc_lambda=-2.0).validate(), "ewc_lambda"),
        (lambda: ContinualConfig(gamma=2.0).validate(), "gamma"),
        (lambda: ContinualConfig(method="lwf").validate(), "method"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_field(make, field):
  with pytest.raises(ValueError, match=field):
    make()


# --- end to end ---------------------------------------------------------------------------------


class Linear(nn.Module):

  @nn.compact
  def __call__(self, x, deterministic=True):
    return nn.Dense(4)(x)


def _loss(logits, batch):
  w = batch["weight"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  acc = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.sum(w), {"accuracy": jnp.sum(acc * w) / jnp.sum(w)}


OBJECTIVE = Objective(
    model=Linear(), loss=_loss, inputs=lambda b, train: {"x": b["x"], "deterministic": not train}
)


def toy_tasks(num_tasks=3, n=96, seed=0):
  """Domain-incremental: 4 Gaussian classes, each task a fixed random rotation of the inputs."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(4, 6)) * 2
  tasks = []
  for t in range(num_tasks):
    rot = np.linalg.qr(rng.normal(size=(6, 6)))[0] if t else np.eye(6)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = ((centers[y] + rng.normal(size=(n, 6))) @ rot).astype(np.float32)
    tasks.append(Task(f"t{t}", {"x": x, "label": y}, {"x": x, "label": y}))
  return tasks


@pytest.mark.parametrize("method", ["finetune", "ewc", "online_ewc", "replay"])
def test_run_sequence_fills_the_matrix(method):
  cfg = ContinualConfig(
      method=method,
      steps_per_task=40,
      batch_size=16,
      learning_rate=0.05,
      ewc_lambda=1.0,
      gamma=0.9,
      fisher_examples=32,
      replay_capacity=40,
      replay_batch=8,
  )
  tasks = toy_tasks()
  result = continual.run_sequence(OBJECTIVE, tasks, cfg)
  r = result.matrix
  assert r.shape == (3, 3) and np.all((r >= 0) & (r <= 1))
  assert np.all(np.diag(r) > 0.6)  # each task is learnt when it is trained
  assert result.average_accuracy == pytest.approx(r[-1].mean())
  assert result.backward_transfer == pytest.approx(np.mean([r[2, 0] - r[0, 0], r[2, 1] - r[1, 1]]))
  if method == "replay":
    assert result.buffer.size == 40 and result.buffer.num_seen == 3 * 96
  if method in ("ewc", "online_ewc"):
    assert int(find_ewc_state(result.state.opt_state).num_tasks) == 3


@pytest.mark.slow
def test_ewc_and_replay_forget_less_than_finetuning_on_toy_tasks():
  tasks = toy_tasks(num_tasks=4, n=200, seed=1)
  base = dict(steps_per_task=300, batch_size=32, learning_rate=0.05, fisher_examples=200)
  acc = {}
  for method, extra in [
      ("finetune", {}),
      ("ewc", {"ewc_lambda": 10.0}),
      ("replay", {"replay_capacity": 100, "replay_batch": 32}),
  ]:
    cfg = ContinualConfig(method=method, **base, **extra)
    acc[method] = continual.run_sequence(OBJECTIVE, tasks, cfg).average_accuracy
  assert acc["ewc"] > acc["finetune"] and acc["replay"] > acc["finetune"]
