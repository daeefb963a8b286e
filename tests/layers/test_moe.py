"""MoE: hand-computed aux losses, exact capacity drops, dropless == capacity == per-token loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers import moe as moe_lib
from nexus_jax.layers import moe_dispatch

import layers_testing as lt


def _loop_reference(params, x, idx, w, activation="swiglu"):
  """y_n = sum_k w_nk * FFN_{idx_nk}(x_n), one token at a time, in numpy."""
  swish = lambda h: h / (1 + np.exp(-h))
  gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  xs = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  out = np.zeros_like(xs)
  for n in range(xs.shape[0]):
    for e, weight in zip(np.asarray(idx[n]), np.asarray(w[n], np.float64)):
      if activation == "swiglu":
        h = swish(xs[n] @ p["wi_gate"][e]) * (xs[n] @ p["wi_up"][e])
      else:
        h = gelu(xs[n] @ p["wi"][e])
      out[n] += weight * (h @ p["wo"][e])
  return out.reshape(x.shape)


def _routing(params, x, top_k):
  logits = x.reshape(-1, x.shape[-1]).astype(jnp.float32) @ params["params"]["router"]
  w, idx = jax.lax.top_k(jax.nn.softmax(logits), top_k)
  return idx, w / w.sum(-1, keepdims=True)


def test_router_aux_losses_equal_hand_computed_values():
  logits = jnp.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
  idx = jnp.array([[0], [0], [1], [0]])
  p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True)
  f = np.array([3 / 4, 1 / 4])
  expected_lb = 2 * np.sum(f * p.mean(0))
  expected_z = np.mean(np.log(np.exp(np.asarray(logits)).sum(1)) ** 2)
  lb, z, load = moe_lib.router_statistics(logits, idx)
  np.testing.assert_allclose([lb, z], [expected_lb, expected_z], rtol=1e-6)
  np.testing.assert_allclose(load, f)
  # Masked tokens are excluded: drop token 2 (the only one routed to expert 1).
  lb_m, z_m, load_m = moe_lib.router_statistics(logits, idx, jnp.array([1, 1, 0, 1], bool))
  keep = [0, 1, 3]
  np.testing.assert_allclose(load_m, [1.0, 0.0])
  np.testing.assert_allclose(lb_m, 2 * p[keep].mean(0)[0], rtol=1e-6)
  np.testing.assert_allclose(
      z_m, np.mean(np.log(np.exp(np.asarray(logits)[keep]).sum(1)) ** 2), rtol=1e-6
  )


def test_module_sows_weighted_aux_losses():
  layer = moe_lib.MoE(num_experts=2, mlp_dim=4, top_k=1, load_balance_coef=0.1, z_loss_coef=0.01)
  x = jnp.array([[[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))
  params = {"params": {**params["params"], "router": jnp.eye(2)}}  # logits == x
  (_, aux), state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["aux_loss"]))(params, x)
  lb, z, _ = moe_lib.router_statistics(x[0], jnp.array([[0], [0], [1], [0]]))
  np.testing.assert_allclose(state["aux_loss"]["load_balance"][0], 0.1 * lb, rtol=1e-6)
  np.testing.assert_allclose(state["aux_loss"]["router_z"][0], 0.01 * z, rtol=1e-6)
  np.testing.assert_allclose(aux["load_balance_loss"], lb, rtol=1e-6)
  np.testing.assert_allclose(aux["max_load_ratio"], 1.5, rtol=1e-6)


def test_capacity_drops_exactly_the_overflow_tokens():
  layer = moe_lib.MoE(
      num_experts=2, mlp_dim=8, top_k=1, capacity_factor=0.8, activation="gelu"
  )  # capacity = ceil(0.8 * 5 * 1 / 2) = 2
  x = jnp.abs(lt.normal(1, (2, 5, 4)))
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))
  router = jnp.stack([jnp.ones(4), -jnp.ones(4)], axis=1)  # every token prefers expert 0
  params = {"params": {**params["params"], "router": router}}
  y, aux = jax.jit(layer.apply)(params, x)
  np.testing.assert_array_equal(np.asarray(y[:, 2:]), 0.0)  # tokens 2..4 overflowed
  idx = jnp.zeros((10, 1), jnp.int32)
  gate = jax.nn.softmax(x.reshape(10, 4) @ router)[:, :1]  # top-1 gate: the router prob (Switch)
  expected = _loop_reference(params, x, idx, gate, "gelu")
  np.testing.assert_allclose(np.asarray(y[:, :2]), expected[:, :2], atol=1e-5)
  np.testing.assert_allclose(aux["dropped_fraction"], 3 / 5, rtol=1e-6)


def test_capacity_ranks_first_choices_before_second_choices():
  # 3 tokens, top-2, 2 experts, capacity 2: expert 0 gets token 0 (1st), token 1 (1st);
  # token 2's 2nd choice for expert 0 overflows; expert 1 gets token 2 (1st), token 0 (2nd).
  idx = jnp.array([[[0, 1], [0, 1], [1, 0]]])
  w = jnp.full((1, 3, 2), 0.5)
  dispatch, combine, kept = moe_dispatch.capacity_masks(idx, w, 2, 2)
  np.testing.assert_array_equal(kept[0], [[True, True], [True, False], [True, False]])
  np.testing.assert_array_equal(dispatch[0, :, 0], [[1, 0], [0, 1], [0, 0]])
  np.testing.assert_array_equal(dispatch[0, :, 1], [[0, 1], [0, 0], [1, 0]])
  np.testing.assert_allclose(combine.sum(), 2.0)
  # A masked token takes no slot: with token 0 masked, token 2's 2nd choice fits in expert 0.
  _, _, kept = moe_dispatch.capacity_masks(idx, w, 2, 2, jnp.array([[False, True, True]]))
  np.testing.assert_array_equal(kept[0], [[False, False], [True, True], [True, True]])


def test_dropless_and_capacity_match_per_token_loop():
  x = lt.normal(2, (2, 7, 8))
  moe = lambda **kw: moe_lib.MoE(num_experts=4, mlp_dim=16, top_k=2, **kw)
  params = nn.unbox(jax.jit(moe().init)(lt.key(0), x))
  idx, w = _routing(params, x, 2)
  expected = _loop_reference(params, x, idx, w)
  for layer in (
      moe(gmm_impl="tiled", gmm_tile=4),
      moe(gmm_impl="ragged_dot"),
      moe(capacity_factor=2.0),
  ):  # capacity 7 = all tokens: nothing dropped
    y, aux = jax.jit(layer.apply)(params, x)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(), 1.0, rtol=1e-6)


def test_decode_mode_is_dropless_whatever_the_capacity_factor():
  """decode=True ignores capacity_factor (small tiles for few rows): nothing is dropped, so a
  token's output never depends on the other tokens of the batch."""
  x = lt.normal(3, (2, 5, 8))
  moe = lambda **kw: moe_lib.MoE(num_experts=4, mlp_dim=16, top_k=2, **kw)
  params = nn.unbox(jax.jit(moe().init)(lt.key(0), x))
  idx, w = _routing(params, x, 2)
  expected = _loop_reference(params, x, idx, w)
  _, aux = jax.jit(moe(capacity_factor=0.5).apply)(params, x)
  assert float(aux["dropped_fraction"]) > 0.0
  y, aux = jax.jit(moe(capacity_factor=0.5, decode=True).apply)(params, x)
  np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5)
  assert float(aux["dropped_fraction"]) == 0.0
  one, _ = jax.jit(moe(capacity_factor=0.5, decode=True).apply)(params, x[:1, 2:3])
  np.testing.assert_allclose(np.asarray(one[0, 0]), expected[0, 2], atol=2e-5)


def test_grouped_matmul_tiled_matches_ragged_dot_values_and_grads():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(23, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
  gs = jnp.array([7, 0, 11, 3], jnp.int32)  # sums to 21 < 23: the last 2 rows are unused
  ct = jnp.asarray(rng.normal(size=(23, 5)), jnp.float32)
  res = {}
  for impl in ("tiled", "ragged_dot"):
    f = lambda x, w, impl=impl: jnp.sum(
        moe_dispatch.grouped_matmul(x, w, gs, impl=impl, tile=4) * ct
    )
    res[impl] = (
        moe_dispatch.grouped_matmul(x, w, gs, impl=impl, tile=4),
        *jax.jit(jax.grad(f, argnums=(0, 1)))(x, w),
    )
  ref = np.concatenate(
      [
          np.asarray(x[:7] @ w[0]),
          np.asarray(x[7:18] @ w[2]),
          np.asarray(x[18:21] @ w[3]),
          np.zeros((2, 5)),
      ]
  )
  np.testing.assert_allclose(np.asarray(res["tiled"][0]), ref, atol=1e-5)
  for a, b in zip(res["tiled"], res["ragged_dot"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_masked_tokens_output_zero():
  layer = moe_lib.MoE(num_experts=4, mlp_dim=8, top_k=2)
  x = lt.normal(3, (2, 6, 8))
  mask = jnp.arange(6)[None, :] < jnp.array([[6], [2]])
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))
  y, aux = jax.jit(lambda p, x, m: layer.apply(p, x, mask=m))(params, x, mask)
  np.testing.assert_array_equal(np.asarray(y[1, 2:]), 0.0)
  y_short, _ = jax.jit(layer.apply)(params, x[1:, :2])
  np.testing.assert_allclose(np.asarray(y[1, :2]), np.asarray(y_short[0]), atol=1e-5)


def test_bf16_training_step_and_jitter():
  layer = moe_lib.MoE(num_experts=4, mlp_dim=8, top_k=2, router_jitter=0.1, dtype=jnp.bfloat16)
  x = lt.normal(4, (2, 8, 8), jnp.bfloat16)
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))

  def loss(p):
    (y, _), aux_losses = layer.apply(
        p, x, deterministic=False, rngs={"dropout": lt.key(1)}, mutable=["aux_loss"]
    )
    total_aux = sum(jnp.sum(v) for v in jax.tree.leaves(aux_losses))
    return jnp.mean(jnp.square(y.astype(jnp.float32))) + total_aux

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["params"]["router"]).max()) > 0  # aux losses reach the router


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=5), "top_k <= num_experts"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(gmm_impl="megablox"), "Unknown gmm_impl"),
        (dict(activation="tanh"), "Unknown activation"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_p=0.5, capacity_factor=1.0), "top_p routing runs on the dropless path"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
  layer = moe_lib.MoE(**{"num_experts": 4, "mlp_dim": 8, **kwargs})
  with pytest.raises(ValueError, match=match):
    layer.init(lt.key(0), jnp.zeros((1, 4, 8)))


def _task_loss_router_grad(layer, x, target):
  """Norm of d(task loss)/d(router) with every aux loss switched off."""
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))

  def loss(p):
    y, _ = layer.apply(p, x)
    return jnp.mean(jnp.square(y - target))

  return float(jnp.linalg.norm(jax.jit(jax.grad(loss))(params)["params"]["router"]))


@pytest.mark.parametrize(
    "top_k,renormalize,top_p",
    [(k, r, None) for k in (1, 2, 4) for r in (True, False)] + [(4, True, 0.5), (4, False, 0.5)],
)
def test_task_loss_reaches_the_router(top_k, renormalize, top_p):
  """The task loss alone (no load-balance / z / entropy loss) trains the router for every
  (top_k, renormalize, top_p): top-1 gates by the router probability (Switch), not by 1.0."""
  x, target = lt.normal(5, (2, 16, 8)), lt.normal(6, (2, 16, 8))
  layer = moe_lib.MoE(
      num_experts=4, mlp_dim=16, top_k=top_k, renormalize=renormalize, top_p=top_p,
      load_balance_coef=0.0, z_loss_coef=0.0, entropy_coef=0.0,
  )  # fmt: skip
  grad = _task_loss_router_grad(layer, x, target)
  # The renormalised top-1 router (gate == 1.0) measured 5.8e-6 here; others are 1e-2 or more.
  assert grad > 1e-3, grad


def test_top_p_routing_matches_per_token_reference():
  """Each token takes experts in descending probability until their mass reaches p (at most
  top_k), weights renormalised over the kept ones (a lone expert keeps its probability)."""
  x = lt.normal(7, (2, 9, 8))
  layer = moe_lib.MoE(num_experts=4, mlp_dim=16, top_k=4, top_p=0.6, gmm_impl="tiled", gmm_tile=4)
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))
  # A sharper router so tokens differ in how many experts they need.
  params = {"params": {**params["params"], "router": params["params"]["router"] * 60}}
  logits = np.asarray(x.reshape(-1, 8) @ params["params"]["router"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  idx, w, counts = [], [], []
  for p_n in probs:
    order = np.argsort(-p_n)
    kept = [order[0]]
    while p_n[kept].sum() < 0.6:
      kept.append(order[len(kept)])
    weights = p_n[kept] / p_n[kept].sum() if len(kept) > 1 else p_n[kept]
    idx.append(kept + [0] * (4 - len(kept)))
    w.append(list(weights) + [0.0] * (4 - len(kept)))
    counts.append(len(kept))
  assert len(set(counts)) > 1, counts  # the test covers tokens with different expert counts
  expected = _loop_reference(params, x, np.array(idx), np.array(w))
  y, aux = jax.jit(layer.apply)(params, x)
  np.testing.assert_allclose(np.asarray(y), expected, atol=3e-5)
  np.testing.assert_allclose(float(aux["experts_per_token"]), np.mean(counts), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(), 1.0, rtol=1e-6)
  # top_p=1.0 with top_k=2 is plain top-2 routing.
  dense, _ = jax.jit(moe_lib.MoE(num_experts=4, mlp_dim=16, top_k=2).apply)(params, x)
  capped, aux = jax.jit(moe_lib.MoE(num_experts=4, mlp_dim=16, top_k=2, top_p=1.0).apply)(params, x)
  np.testing.assert_allclose(np.asarray(capped), np.asarray(dense), atol=1e-5)
  assert float(aux["experts_per_token"]) == 2.0


def test_top_p_sows_the_router_entropy_loss():
  x = lt.normal(8, (1, 6, 8))
  layer = moe_lib.MoE(num_experts=4, mlp_dim=8, top_k=4, top_p=0.5, entropy_coef=0.1)
  params = nn.unbox(jax.jit(layer.init)(lt.key(0), x))
  _, sown = layer.apply(params, x, mutable=["aux_loss"])
  logits = x.reshape(-1, 8) @ params["params"]["router"]
  entropy = -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1).mean()
  np.testing.assert_allclose(float(sown["aux_loss"]["router_entropy"][0]), 0.1 * entropy, rtol=1e-5)
