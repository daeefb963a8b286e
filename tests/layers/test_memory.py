"""Titans neural memory: chunked update == per-token numpy reference with hand-derived gradients,
inner loss drops, state persists across calls, outer gradients == finite differences."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers import memory as memory_lib

C0 = np.sqrt(2 / np.pi)


def _gelu(h):  # tanh approximation, as flax's nn.gelu
  return 0.5 * h * (1 + np.tanh(C0 * (h + 0.044715 * h**3)))


def _gelu_grad(h):
  t = np.tanh(C0 * (h + 0.044715 * h**3))
  return 0.5 * (1 + t) + 0.5 * h * (1 - t**2) * C0 * (1 + 3 * 0.044715 * h**2)


def _forward(w, k):
  return _gelu(k @ w["w1"]) @ w["w2"] if "w2" in w else k @ w["w1"]


def _loss_and_grad(w, k, v):
  """0.5 ||M(k) - v||^2 and its gradient, by hand (no autodiff)."""
  if "w2" not in w:
    r = k @ w["w1"] - v
    return 0.5 * r @ r, {"w1": np.outer(k, r)}
  pre = k @ w["w1"]
  act = _gelu(pre)
  r = act @ w["w2"] - v
  return 0.5 * r @ r, {"w1": np.outer(k, (w["w2"] @ r) * _gelu_grad(pre)), "w2": np.outer(act, r)}


def _reference(weights, momentum, inputs, chunk):
  """The Titans recurrence token by token, gradients at each chunk's starting weights."""
  f64 = lambda t: {n: np.asarray(a, np.float64) for n, a in t.items()}
  weights, momentum, inp = f64(weights), f64(momentum), f64(inputs)
  b, h, length, d = inp["k"].shape
  y = np.zeros((b, h, length, d))
  stats = {s: np.zeros((b, h, length)) for s in ("grad_norm", "loss_before", "loss_after")}
  out_w = {n: np.zeros_like(a) for n, a in weights.items()}
  out_s = {n: np.zeros_like(a) for n, a in weights.items()}
  for i in range(b):
    for j in range(h):
      w = {n: a[i, j].copy() for n, a in weights.items()}
      s = {n: a[i, j].copy() for n, a in momentum.items()}
      for start in range(0, length, chunk):
        w0 = {n: a.copy() for n, a in w.items()}
        ts = range(start, min(start + chunk, length))
        for t in ts:
          loss, g = _loss_and_grad(w0, inp["k"][i, j, t], inp["v"][i, j, t])
          stats["loss_before"][i, j, t] = loss
          stats["grad_norm"][i, j, t] = np.sqrt(sum(np.sum(a**2) for a in g.values()))
          y[i, j, t] = _forward(w, inp["q"][i, j, t])  # read before write
          eta, keep = np.exp(inp["log_eta"][i, j, t]), np.exp(inp["log_keep"][i, j, t])
          for n in w:
            s[n] = eta * s[n] - inp["lr"][i, j, t] * g[n]
            w[n] = keep * w[n] + s[n]
        for t in ts:
          stats["loss_after"][i, j, t] = _loss_and_grad(w, inp["k"][i, j, t], inp["v"][i, j, t])[0]
      for n in w:
        out_w[n][i, j], out_s[n][i, j] = w[n], s[n]
  return out_w, out_s, y, stats


def _random_problem(seed, b=2, h=2, length=10, d=4, depth=2):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  shapes = {"w1": (b, h, d, 2 * d if depth == 2 else d)}
  if depth == 2:
    shapes["w2"] = (b, h, 2 * d, d)
  weights = {n: f32(0.5 * rng.normal(size=s)) for n, s in shapes.items()}
  momentum = {n: f32(0.1 * rng.normal(size=s)) for n, s in shapes.items()}
  unit = lambda a: f32(a / np.linalg.norm(a, axis=-1, keepdims=True))
  inputs = {
      "k": unit(rng.normal(size=(b, h, length, d))),
      "q": unit(rng.normal(size=(b, h, length, d))),
      "v": f32(rng.normal(size=(b, h, length, d))),
      "lr": f32(rng.uniform(0, 0.5, (b, h, length))),
      "log_eta": f32(np.log(rng.uniform(0.05, 1, (b, h, length)))),
      "log_keep": f32(np.log(1 - rng.uniform(0, 0.3, (b, h, length)))),
  }
  return weights, momentum, inputs


@pytest.mark.parametrize(
    "depth,chunk", [(2, 4), (1, 3), pytest.param(2, 1, marks=pytest.mark.slow)]
)
def test_chunked_update_matches_per_token_reference(depth, chunk):
  weights, momentum, inputs = _random_problem(depth, depth=depth)
  (w, s), (y, grad_norm, before, after) = jax.jit(memory_lib.run_memory, static_argnums=(3,))(
      weights, momentum, inputs, chunk
  )
  ref_w, ref_s, ref_y, stats = _reference(weights, momentum, inputs, chunk)
  tol = dict(rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(y, ref_y, **tol)
  for n in ref_w:
    np.testing.assert_allclose(w[n], ref_w[n], **tol)
    np.testing.assert_allclose(s[n], ref_s[n], **tol)
  for got, name in ((grad_norm, "grad_norm"), (before, "loss_before"), (after, "loss_after")):
    np.testing.assert_allclose(got, stats[name], err_msg=name, **tol)


@functools.lru_cache(maxsize=None)
def _layer_and_input(seed=0, b=2, length=16, e=8, **kw):
  layer = memory_lib.NeuralMemory(**{"num_heads": 2, "chunk_size": 4, **kw})
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, length, e)), jnp.float32)
  # rbg keys: random init compiles much faster on CPU than with threefry keys.
  return layer, x, jax.jit(layer.init)(jax.random.key(seed + 1, impl="rbg"), x)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _apply(layer, params, x):
  return layer.apply({"params": params}, x)


def test_update_is_a_gradient_step_taken_with_jax_grad_inside_apply(monkeypatch):
  calls = []
  real = jax.value_and_grad
  monkeypatch.setattr(
      jax, "value_and_grad", lambda f, *a, **k: (calls.append(f), real(f, *a, **k))[1]
  )
  # One chunk, no momentum (eta ~ 0), no forgetting (alpha ~ 0): M_1 = M_0 - sum_t theta_t g_t.
  layer, x, params = _layer_and_input(
      length=6, chunk_size=6, momentum_bias_init=-40.0, forget_bias_init=-40.0
  )
  (_, aux), state = jax.jit(lambda p: layer.apply({"params": p}, x, mutable=["memory"]))(params)
  assert calls and all(f is memory_lib.inner_loss for f in calls)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
  x64 = np.asarray(x, np.float64)
  unit = lambda a: a / np.sqrt(np.sum(a**2, -1, keepdims=True) + 1e-6)
  k = unit(np.einsum("ble,ehd->blhd", x64, p["key"]["kernel"]))
  v = np.einsum("ble,ehd->blhd", x64, p["value"]["kernel"])
  theta = 1 / (1 + np.exp(-(x64 @ p["lr"]["kernel"] + p["lr"]["bias"])))  # max_lr = 1
  np.testing.assert_allclose(aux["lr"], theta, rtol=1e-5)
  for i in range(x.shape[0]):
    for j in range(2):
      w0 = {"w1": p["w1"][j], "w2": p["w2"][j]}
      expected = {n: a.copy() for n, a in w0.items()}
      for t in range(6):
        _, g = _loss_and_grad(w0, k[i, t, j], v[i, t, j])
        for n in expected:
          expected[n] -= theta[i, t, j] * g[n]
      for n in expected:
        np.testing.assert_allclose(
            state["memory"]["weights"][n][i, j], expected[n], rtol=1e-4, atol=1e-5
        )


def test_inner_loss_after_update_is_lower_than_before_on_the_same_chunk():
  layer, x, params = _layer_and_input()
  _, aux = _apply(layer, params, x)
  chunk_mean = lambda a: a.reshape(a.shape[0], 4, 4, a.shape[-1]).mean(2)  # [B, chunks, H]
  before, after = chunk_mean(aux["loss_before"]), chunk_mean(aux["loss_after"])
  assert np.all(after < before), (before, after)
  assert np.all(np.asarray(aux["grad_norm"]) > 0)


def test_memory_persists_across_calls_only_with_mutable_memory():
  layer, x, params = _layer_and_input(length=8)
  assert set(jax.eval_shape(layer.init, jax.random.key(3, impl="rbg"), x)) == {
      "params"
  }  # no memory yet
  apply = jax.jit(lambda v, x: layer.apply(v, x, mutable=["memory"]))
  (y_full, _), state_full = apply({"params": params}, x)
  (y1, _), state1 = apply({"params": params}, x[:, :4])  # split at a chunk boundary
  (y2, _), state2 = apply({"params": params, **state1}, x[:, 4:])
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state_full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Without the stored state the second call starts from the learned initial weights.
  (y2_fresh, _), _ = apply({"params": params}, x[:, 4:])
  assert np.abs(np.asarray(y2_fresh - y2)).max() > 1e-3
  # update_memory=False reads the stored memory and leaves it unchanged.
  (y_read, aux), state3 = layer.apply(
      {"params": params, **state1}, x[:, 4:5], mutable=["memory"], update_memory=False
  )
  for a, b in zip(jax.tree.leaves(state3), jax.tree.leaves(state1)):
    np.testing.assert_array_equal(a, b)
  assert set(aux) == {"loss_before"}
  np.testing.assert_allclose(y_read, y2[:, :1], rtol=1e-5, atol=1e-6)  # reads before writing


def test_outer_gradients_through_inner_updates_match_finite_differences():
  with jax.enable_x64(True):
    layer, x, params = _layer_and_input(length=6, chunk_size=3, param_dtype=jnp.float64)
    x = x.astype(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), nn.unbox(params))
    target = jnp.cos(x)

    def loss(p):
      (y, _), state = layer.apply({"params": p}, x[:, :3], mutable=["memory"])
      (y2, _), _ = layer.apply({"params": p, **state}, x[:, 3:], mutable=["memory"])
      return jnp.mean((jnp.concatenate([y, y2], 1) - target) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compilation for both
    _, grads = value_and_grad(params)
    # The learning-rate gate only acts through the inner updates: its gradient is second order.
    assert np.abs(grads["lr"]["kernel"]).max() > 1e-6
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(7)
    for _ in range(2):
      direction = jax.tree.unflatten(
          tree, [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in leaves]
      )
      eps = 1e-5
      shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
      numeric = (value_and_grad(shift(eps))[0] - value_and_grad(shift(-eps))[0]) / (2 * eps)
      analytic = sum(
          jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
      )
      np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-10)


def test_bfloat16_compute_and_float32_params_under_remat_and_jit():
  layer, x, params = _layer_and_input()
  y32, _ = _apply(layer, params, x)
  bf16 = nn.remat(memory_lib.NeuralMemory)(num_heads=2, chunk_size=4, dtype=jnp.bfloat16)

  def loss(p):
    y16, _ = bf16.apply({"params": p}, x)
    return jnp.mean(y16.astype(jnp.float32) ** 2), y16

  grads, y16 = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(y16, np.float32), y32, atol=0.05 * float(jnp.abs(y32).max())
  )
  assert all(
      g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(nn.unbox(grads))
  )


def test_params_have_distinct_logical_axis_names():
  layer, x, _ = _layer_and_input()
  boxed = jax.eval_shape(layer.init, jax.random.key(0, impl="rbg"), x)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for v in leaves:
    named = [a for a in v.names if a is not None]
    assert len(named) == len(set(named)), v.names


def test_bad_inputs_raise_clear_errors():
  layer, x, params = _layer_and_input()
  trace = lambda f, *args: jax.eval_shape(f, *args)  # errors are raised while tracing
  key = jax.random.key(0, impl="rbg")
  with pytest.raises(ValueError, match="depth"):
    trace(memory_lib.NeuralMemory(depth=3).init, key, x)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    trace(memory_lib.NeuralMemory(num_heads=3).init, key, x)
  with pytest.raises(ValueError, match="batch, length, embed"):
    trace(layer.init, key, x[0])
  with pytest.raises(ValueError, match="chunk_size"):
    trace(memory_lib.NeuralMemory(chunk_size=0).init, key, x)
  _, state = trace(lambda p: layer.apply({"params": p}, x, mutable=["memory"]), params)
  with pytest.raises(ValueError, match="stored memory"):
    trace(lambda p, s: layer.apply({"params": p, **s}, x[:1], mutable=["memory"]), params, state)


def test_memory_persists_under_scan_over_layers():
  class Stack(nn.Module):

    @nn.compact
    def __call__(self, x):
      def body(layer, h, _):
        y, aux = layer(h)
        return h + y, aux["grad_norm"]

      layers = nn.scan(
          nn.remat(body),
          variable_axes={"params": 0, "memory": 0},
          split_rngs={"params": True},
          length=2,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      return layers(memory_lib.NeuralMemory(num_heads=2, chunk_size=4), x, None)

  x = _layer_and_input(length=8)[1]
  params = jax.jit(Stack().init)(jax.random.key(0, impl="rbg"), x)["params"]
  apply = jax.jit(lambda v, x: Stack().apply(v, x, mutable=["memory"]))
  (y1, _), state = apply({"params": params}, x[:, :4])
  assert jax.tree.leaves(state)[0].shape[:3] == (2, 2, 2)  # [layers, batch, heads, ...]
  (y2, _), _ = apply({"params": params, **state}, x[:, 4:])
  (y_full, _), _ = apply({"params": params}, x)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
