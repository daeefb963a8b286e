"""Selective SSM: the three scans agree (values and gradients), step decoding == full forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nexus_jax.layers import ssm


def _key(seed):
  """A PRNG key whose random ops compile fast on CPU (threefry's do not, for tiny tests)."""
  return jax.random.key(seed, impl="rbg")


def _scan_inputs(seed, b, l, d, n):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return dict(
      x_BLD=normal(b, l, d),
      delta_BLD=jax.nn.softplus(normal(b, l, d)),
      A_DN=-jnp.exp(0.5 * normal(d, n)),
      B_BLN=normal(b, l, n),
      C_BLN=normal(b, l, n),
      h0_BDN=normal(b, d, n),
  )


def _numpy_loop(x_BLD, delta_BLD, A_DN, B_BLN, C_BLN, h0_BDN):
  x, dl, A, B, C, h = (
      np.asarray(t, np.float64) for t in (x_BLD, delta_BLD, A_DN, B_BLN, C_BLN, h0_BDN)
  )
  ys = []
  for t in range(x.shape[1]):
    h = np.exp(dl[:, t, :, None] * A) * h + (dl[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
    ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
  return np.stack(ys, 1), h


def test_sequential_scan_matches_numpy_loop():
  inputs = _scan_inputs(0, b=2, l=13, d=3, n=4)
  y, h = jax.jit(ssm.selective_scan, static_argnames="method")(**inputs, method="sequential")
  y_ref, h_ref = _numpy_loop(**inputs)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)


@jax.jit
def _scan_vjps(inputs, cot, chunk):
  """(outputs, input gradients) of every scan method for one cotangent; chunk is traced as a
  shape via `chunk.shape[0]` so one compilation serves each (shape, chunk) pair."""
  results = {}
  for method in ssm.SCAN_METHODS:
    f = lambda kw: ssm.selective_scan(**kw, method=method, chunk_size=chunk.shape[0])
    out, vjp = jax.vjp(f, inputs)
    results[method] = (out, vjp(cot)[0])
  return results


# A few shapes (each compiles once); hypothesis varies the values. l=1 with a chunk longer than
# l, l not a multiple of the chunk, chunk 1, and no initial state are all covered.
SCAN_SHAPES = [(2, 1, 3, 2, 4, True), (1, 13, 2, 3, 5, False), (2, 9, 2, 2, 1, True)]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SCAN_SHAPES))
def test_scan_methods_match_reference_values_and_gradients(seed, shape):
  b, l, d, n, chunk, h0 = shape
  inputs = _scan_inputs(seed, b, l, d, n)
  if not h0:
    inputs["h0_BDN"] = jnp.zeros((b, d, n))  # a fresh sequence (the default, None, is zeros)
  rng = np.random.default_rng(seed + 1)
  cot = (
      jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32),
      jnp.asarray(rng.normal(size=(b, d, n)), jnp.float32),
  )
  results = _scan_vjps(inputs, cot, jnp.zeros((chunk,)))
  ref = jax.tree.leaves(results["sequential"])
  for method in ("associative", "chunked"):
    for got, want in zip(jax.tree.leaves(results[method]), ref):
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=method)


def _module_inputs(b=2, t=11, e=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, e)), jnp.float32)


def test_module_scan_methods_agree_on_outputs_and_param_gradients():
  x = _module_inputs()
  params = jax.jit(ssm.SelectiveSSM(state_dim=4).init)(_key(1), x)["params"]

  def loss(p, method):
    y, aux = ssm.SelectiveSSM(state_dim=4, scan_method=method, chunk_size=4).apply({"params": p}, x)
    return jnp.sum(jnp.sin(y)) + jnp.sum(aux["final_state"] ** 2), y

  all_grads = jax.jit(lambda p: {m: jax.grad(loss, has_aux=True)(p, m) for m in ssm.SCAN_METHODS})
  results = all_grads(params)
  ref_g, ref_y = results["sequential"]
  for method, (g, y) in results.items():
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5, err_msg=method)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=method)
  assert all(np.abs(np.asarray(a)).sum() > 0 for a in jax.tree.leaves(ref_g))


@pytest.mark.parametrize("conv_width", [4, pytest.param(1, marks=pytest.mark.slow)])
def test_step_decoding_equals_full_forward(conv_width):
  x = _module_inputs(t=9)
  full_model = ssm.SelectiveSSM(state_dim=4, conv_width=conv_width, chunk_size=4)
  params = jax.jit(full_model.init)(_key(1), x)["params"]
  full, full_aux = jax.jit(full_model.apply)({"params": params}, x)

  model = full_model.clone(decode=True)
  cache0 = jax.jit(model.init)(_key(2), x[:, :1])["cache"]
  cache = cache0
  step = jax.jit(
      lambda c, xt: model.apply(
          {"params": params, "cache": c}, xt, mutable=["cache"], method="step"
      )
  )
  ys = []
  for t in range(x.shape[1]):
    (y, _), state = step(cache, x[:, t])
    cache = state["cache"]
    ys.append(y)
  np.testing.assert_allclose(jnp.stack(ys, 1), full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cache["ssm_state"], full_aux["final_state"], rtol=1e-5, atol=1e-6)

  # Prefill a prompt (scanned from the cached state), then one token at a time with `step`.
  cache = cache0  # the cache does not depend on the length
  (y_prompt, _), state = jax.jit(
      lambda c, xt: model.apply({"params": params, "cache": c}, xt, mutable=["cache"])
  )(cache, x[:, :5])
  outs, cache = [y_prompt], state["cache"]
  for t in range(5, x.shape[1]):
    (y, _), state = step(cache, x[:, t])
    outs.append(y[:, None])
    cache = state["cache"]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-6)


def test_init_values_follow_mamba():
  model = ssm.SelectiveSSM(state_dim=3, dt_min=0.01, dt_max=0.05)
  params = nn.unbox(jax.jit(model.init)(_key(0), _module_inputs())["params"])
  np.testing.assert_allclose(
      -np.exp(params["A_log"]), -np.tile([1.0, 2.0, 3.0], (16, 1)), rtol=1e-6
  )
  dt = jax.nn.softplus(params["dt_proj"]["bias"])
  assert np.all((dt >= 0.01 * (1 - 1e-5)) & (dt <= 0.05 * (1 + 1e-5)))
  np.testing.assert_array_equal(params["D"], np.ones(16))


def test_params_have_distinct_logical_axis_names():
  boxed = jax.eval_shape(ssm.SelectiveSSM(state_dim=4).init, _key(0), _module_inputs())["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for v in leaves:
    named = [a for a in v.names if a is not None]
    assert len(named) == len(set(named)), v.names


def test_bfloat16_compute_is_close_to_float32_and_params_stay_float32():
  x = _module_inputs()
  params = jax.jit(ssm.SelectiveSSM(state_dim=4).init)(_key(1), x)["params"]
  y32, _ = jax.jit(ssm.SelectiveSSM(state_dim=4).apply)({"params": params}, x)
  y16, _ = jax.jit(ssm.SelectiveSSM(state_dim=4, dtype=jnp.bfloat16).apply)({"params": params}, x)
  assert y16.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(params)))
  np.testing.assert_allclose(
      np.asarray(y16, np.float32), y32, atol=0.05 * float(jnp.abs(y32).max())
  )


def test_works_under_jit_grad_remat_and_scan_over_layers():
  class Stack(nn.Module):

    @nn.compact
    def __call__(self, x):
      def body(layer, h, _):
        y, _ = layer(h)
        return h + y, None

      layers = nn.scan(
          nn.remat(body),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          length=3,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      return layers(ssm.SelectiveSSM(state_dim=4, chunk_size=4), x, None)[0]

  x = _module_inputs()
  params = jax.jit(Stack().init)(_key(0), x)["params"]
  assert nn.unbox(params)["SelectiveSSM_0"]["A_log"].shape == (3, 16, 4)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(Stack().apply({"params": p}, x) ** 2)))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_chunked_scan_needs_less_compiled_memory_than_associative():
  inputs = _scan_inputs(0, b=1, l=128, d=8, n=8)

  def temp_bytes(method):
    f = lambda kw: jnp.sum(ssm.selective_scan(**kw, method=method, chunk_size=16)[0])
    compiled = jax.jit(jax.grad(f)).lower(inputs).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_state = 128 * 8 * 8 * 4  # one [B, L, D, N] float32 array
  chunked, associative = temp_bytes("chunked"), temp_bytes("associative")
  # associative keeps several full [B, L, D, N] arrays for the backward pass; chunked keeps one
  # [B, D, N] state per chunk and recomputes the chunk.
  assert 4 * chunked < associative and associative > 4 * full_state, (chunked, associative)


def test_bad_inputs_raise_clear_errors():
  x = _module_inputs()
  with pytest.raises(ValueError, match="scan_method"):
    ssm.SelectiveSSM(scan_method="fft").init(_key(0), x)
  with pytest.raises(ValueError, match="batch, length, embed"):
    ssm.SelectiveSSM().init(_key(0), x[0])
  with pytest.raises(ValueError, match="state_dim"):
    ssm.SelectiveSSM(state_dim=0).init(_key(0), x)
  with pytest.raises(ValueError, match="dt_min"):
    ssm.SelectiveSSM(dt_min=0.2, dt_max=0.1).init(_key(0), x)
  inputs = _scan_inputs(0, 1, 4, 2, 3)
  with pytest.raises(ValueError, match="B and C"):
    ssm.selective_scan(**{**inputs, "B_BLN": inputs["B_BLN"][..., :2]})
  with pytest.raises(ValueError, match="Unknown scan method"):
    ssm.selective_scan(**inputs, method="fft")
  model = ssm.SelectiveSSM(state_dim=4, decode=True)
  variables = jax.jit(model.init)(_key(0), x)
  with pytest.raises(ValueError, match="cache batch"):
    model.apply(variables, x[:1], mutable=["cache"])
  with pytest.raises(ValueError, match="decode=True"):
    ssm.SelectiveSSM(state_dim=4).apply({"params": variables["params"]}, x[:, 0], method="step")
