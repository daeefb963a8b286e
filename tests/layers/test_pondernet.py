"""PonderNet: halting distribution, hand-computed KL / expected loss, halting rules, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.layers import pondernet as pn
from nexus_jax.layers.blocks import TransformerBlock

import layers_testing as lt


class Residual(nn.Module):
  """`h + Dense(tanh(Dense([h, x])))`: a small shared-weight step for the tests."""

  width: int = 16

  @nn.compact
  def __call__(self, h, x=None):
    z = h if x is None else jnp.concatenate([h, x], axis=-1)
    return h + nn.Dense(h.shape[-1])(jnp.tanh(nn.Dense(self.width)(z)))


def _constant_halting(sigma, n):
  """The halting distribution when every lambda_n = sigma (the remainder on step n), numpy."""
  p = np.array([sigma * (1 - sigma) ** i for i in range(n)], np.float64)
  p[-1] = (1 - sigma) ** (n - 1)
  return p


def test_halting_distribution_sums_to_one_and_matches_the_product_formula():
  lam = jax.random.uniform(lt.key(0), (6, 5, 3))
  p = np.asarray(pn.halting_distribution(lam))
  np.testing.assert_allclose(p.sum(0), 1.0, rtol=1e-6)
  lam = np.asarray(lam, np.float64)
  for n in range(5):
    np.testing.assert_allclose(p[n], lam[n] * np.prod(1 - lam[:n], axis=0), rtol=1e-5)
  np.testing.assert_allclose(p[5], np.prod(1 - lam[:5], axis=0), rtol=1e-5)  # the remainder


def test_truncated_geometric_and_kl_equal_hand_computed_values():
  q = pn.truncated_geometric(0.5, 3)
  np.testing.assert_allclose(q, np.array([0.5, 0.25, 0.125]) / 0.875)
  p = jnp.array([[0.2, 1.0], [0.5, 0.0], [0.3, 0.0]])  # two examples: spread, all on step 1
  kl_0 = sum(pi * np.log(pi / qi) for pi, qi in zip([0.2, 0.5, 0.3], q))
  kl_1 = np.log(1.0 / q[0])
  np.testing.assert_allclose(pn.ponder_kl(p, 0.5), (kl_0 + kl_1) / 2, rtol=1e-5)
  np.testing.assert_allclose(pn.ponder_kl(p, 0.5, mask=jnp.array([1, 0])), kl_0, rtol=1e-5)
  # prior = 1 puts all prior mass on step 1: finite, zero for p = [1, 0, 0].
  assert float(pn.ponder_kl(p[:, 1:], 1.0)) == pytest.approx(0.0, abs=1e-6)
  assert np.isfinite(float(pn.ponder_kl(p[:, :1], 1.0)))


def test_expected_loss_equals_hand_computed_value():
  losses = jnp.array([[1.0, 2.0], [3.0, 0.5], [0.0, 4.0]])  # [N=3, B=2]
  p = jnp.array([[0.2, 0.6], [0.5, 0.3], [0.3, 0.1]])
  per_example = [0.2 * 1 + 0.5 * 3 + 0.3 * 0, 0.6 * 2 + 0.3 * 0.5 + 0.1 * 4]
  np.testing.assert_allclose(pn.expected_loss(losses, p), np.mean(per_example), rtol=1e-6)
  np.testing.assert_allclose(
      pn.expected_loss(losses, p, mask=jnp.array([0.0, 1.0])), per_example[1], rtol=1e-6
  )


def test_module_sows_beta_times_the_hand_computed_kl():
  # The halting kernel starts at zero, so every lambda_n = sigmoid(bias) at init.
  bias, n, prior, beta = -1.0, 4, 0.3, 0.05
  model = pn.PonderNet(
      step=Residual(), max_steps=n, prior=prior, beta=beta, halt_bias_init=bias, head=nn.Dense(2)
  )
  x = lt.normal(0, (3, 8))
  params = model.init(lt.key(0), x)["params"]
  (y, aux), sown = model.apply({"params": params}, x, mutable=["aux_loss"])
  p = _constant_halting(1 / (1 + np.exp(-bias)), n)
  q = pn.truncated_geometric(prior, n)
  kl = np.sum(p * np.log(p / q))
  np.testing.assert_allclose(aux["halting_probs"], np.tile(p[:, None], (1, 3)), rtol=1e-5)
  np.testing.assert_allclose(aux["ponder_kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(sown["aux_loss"]["ponder_kl"][0], beta * kl, rtol=1e-5)
  np.testing.assert_allclose(aux["expected_steps"], np.sum(np.arange(1, n + 1) * p), rtol=1e-5)
  assert y.shape == (3, 2) and aux["per_step"].shape == (n, 3, 2)


def test_threshold_halting_picks_the_first_step_past_the_threshold():
  p = jnp.array([[0.1, 0.6, 0.0], [0.3, 0.1, 0.0], [0.2, 0.1, 0.2], [0.4, 0.2, 0.8]])
  np.testing.assert_array_equal(pn.halt_step_threshold(p, 0.5), [3, 1, 4])
  np.testing.assert_array_equal(pn.halt_step_threshold(p, 0.35), [2, 1, 4])
  np.testing.assert_array_equal(pn.halt_step_threshold(p, 1.0), [4, 4, 4])


def test_module_output_is_the_per_step_output_at_the_halting_step():
  model = pn.PonderNet(step=Residual(), max_steps=5, head=nn.Dense(3), threshold=0.3)
  x = lt.normal(1, (6, 4))
  variables = model.init(lt.key(1), x, x)
  # Make lambda depend on the example so halting steps differ.
  variables["params"]["halt"]["kernel"] = lt.normal(2, (4, 1)) * 3.0
  y, aux = model.apply(variables, x, x)
  steps = np.asarray(aux["halt_step"])
  assert len(np.unique(steps)) > 1, steps
  np.testing.assert_array_equal(steps, pn.halt_step_threshold(aux["halting_probs"], 0.3))
  per_step = np.asarray(aux["per_step"])
  np.testing.assert_allclose(y, per_step[steps - 1, np.arange(6)], rtol=1e-6)


def test_sampled_halting_follows_the_halting_distribution():
  lam = jnp.array([0.3, 0.5, 0.2, 0.9])[:, None] * jnp.ones((4, 20000))
  p = np.asarray(pn.halting_distribution(lam))[:, 0]
  steps = np.asarray(pn.halt_step_sample(lam, lt.key(3)))
  freq = np.bincount(steps, minlength=5)[1:] / steps.size
  np.testing.assert_allclose(freq, p, atol=0.015)
  model = pn.PonderNet(step=Residual(), max_steps=4, halt_mode="sample")
  x = lt.normal(0, (5, 4))
  params = model.init(lt.key(0), x)
  y, aux = model.apply(params, x, rngs={"ponder": lt.key(4)})
  assert aux["halt_step"].shape == (5,) and 1 <= int(aux["halt_step"].min())


def test_negative_initial_bias_halts_after_step_one_at_init():
  model = pn.PonderNet(step=Residual(), max_steps=10)  # default halt_bias_init = -2
  x = lt.normal(0, (16, 8))
  _, aux = model.apply(model.init(lt.key(0), x), x)
  assert float(aux["halt_step"].mean()) > 1.0
  assert float(aux["expected_steps"].mean()) > 3.0
  assert float(aux["halting_probs"][0].max()) < 0.2


def test_jit_matches_eager_and_params_are_shared_across_steps():
  x = lt.normal(0, (4, 8))
  sizes = []
  for n in (2, 7):
    model = pn.PonderNet(step=Residual(), max_steps=n, head=nn.Dense(2))
    variables = {"params": model.init(lt.key(0), x)["params"]}
    sizes.append(sum(a.size for a in jax.tree.leaves(variables)))
  eager = model.apply(variables, x)
  jitted = jax.jit(model.apply)(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)
  assert sizes[0] == sizes[1]


def test_token_halting_on_a_transformer_block_with_padding():
  b, t, d, n = 2, 5, 8, 3
  block = TransformerBlock(num_heads=2, mlp_dim=16, causal=True)
  model = pn.PonderNet(step=block, max_steps=n, halt_per="token", head=nn.Dense(11))
  x = lt.normal(0, (b, t, d))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  args = (None, None, None, mask)  # TransformerBlock(x, context, segment_ids, positions, mask)
  variables = {"params": model.init(lt.key(0), x, *args, mask=mask)["params"]}
  variables["params"]["halt"]["kernel"] = lt.normal(1, (d, 1))
  y, aux = model.apply(variables, x, *args, mask=mask)
  assert y.shape == (b, t, 11) and aux["per_step"].shape == (n, b, t, 11)
  assert aux["halting_probs"].shape == (n, b, t) and aux["halt_step"].shape == (b, t)
  np.testing.assert_allclose(aux["halting_probs"].sum(0), 1.0, rtol=1e-6)
  per_token_kl = np.sum(
      np.asarray(aux["halting_probs"])
      * np.log(np.asarray(aux["halting_probs"]) / pn.truncated_geometric(0.2, n)[:, None, None]),
      axis=0,
  )
  np.testing.assert_allclose(aux["ponder_kl"], per_token_kl[np.asarray(mask)].mean(), rtol=1e-5)


class SowingStep(nn.Module):
  """A step that sows its own aux loss (as an MoE block does)."""

  @nn.compact
  def __call__(self, h):
    h = nn.Dense(h.shape[-1])(h)
    self.sow("aux_loss", "inner", jnp.mean(h**2))
    return h


def test_the_steps_own_aux_losses_are_stacked_per_step_next_to_the_kl():
  model = pn.PonderNet(step=SowingStep(), max_steps=3, beta=0.1)
  x = lt.normal(0, (2, 4))
  params = model.init(lt.key(0), x)["params"]
  _, sown = model.apply({"params": params}, x, mutable=["aux_loss"])
  assert sown["aux_loss"]["step"]["inner"][0].shape == (3,)
  assert sown["aux_loss"]["ponder_kl"][0].shape == ()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"prior": 0.0}, "prior"),
        ({"prior": 1.5}, "prior"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"halt_mode": "greedy"}, "halt_mode"),
        ({"halt_per": "head"}, "halt_per"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, field):
  model = pn.PonderNet(step=Residual(), **kwargs)
  with pytest.raises(ValueError, match=f"PonderNet.{field}"):
    model.init(lt.key(0), jnp.ones((2, 4)))


def test_bad_state_rank_raises():
  with pytest.raises(ValueError, match=r"\[batch, dim\]"):
    pn.PonderNet(step=Residual()).init(lt.key(0), jnp.ones((4,)))
  with pytest.raises(ValueError, match="halt_per='token'"):
    pn.PonderNet(step=Residual(), halt_per="token").init(lt.key(0), jnp.ones((2, 4)))


def test_tiny_training_run_lowers_the_ponder_loss():
  """Regress the sum of the inputs with the expected loss + KL; the loss must drop."""
  model = pn.PonderNet(step=Residual(), max_steps=4, head=nn.Dense(1), prior=0.5)
  x = lt.normal(0, (64, 4))
  target = jnp.sum(x, axis=1)
  params = model.init(lt.key(0), jnp.zeros((64, 4)), x)["params"]
  tx = optax.adam(1e-2)

  def loss_fn(params):
    (_, aux), sown = model.apply({"params": params}, jnp.zeros((64, 4)), x, mutable=["aux_loss"])
    per_step = jnp.square(aux["per_step"][..., 0] - target)  # [N, B]
    return pn.expected_loss(per_step, aux["halting_probs"]) + sown["aux_loss"]["ponder_kl"][0]

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = tx.init(params)
  params, opt_state, first, grads = step(params, opt_state)
  assert float(jnp.abs(grads["halt"]["bias"]).max()) > 0  # the halting unit gets a gradient
  for _ in range(150):
    params, opt_state, loss, _ = step(params, opt_state)
  assert float(loss) < 0.3 * float(first)
