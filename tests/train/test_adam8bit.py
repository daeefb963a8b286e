"""8-bit AdamW: the dynamic code maps, block-wise quantisation error, updates that follow float32
AdamW, why v needs the dynamic map (a linear one blows the update up), state bytes from dtypes and
from the compiled init, float32 exclusions by path, training + exact resume through `fit`, and
optimizer-state shardings that follow the params on 8 fake devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.testing import toy_objective, toy_regression_data
from nexus_jax.train.adam8bit import (
    QuantizedMoment,
    adamw_8bit,
    block_layout,
    dequantize,
    dynamic_map,
    quantize,
    scale_by_adam_8bit,
    state_bytes,
)
from nexus_jax.train.config import base_config
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.loop import fit
from nexus_jax.train.optim import build_optimizer


def test_dynamic_maps_span_seven_decades_with_zero_and_one():
  signed, unsigned = dynamic_map(True), dynamic_map(False)
  for code in (signed, unsigned):
    assert code.shape == (256,) and np.all(np.diff(code) >= 0)
    assert 0.0 in code and code[-1] == 1.0
  assert signed[0] < -0.99 and len(np.unique(signed)) == 256
  assert unsigned[0] == 0.0 and len(np.unique(unsigned)) == 256
  assert 0 < unsigned[1] < 1e-6  # small second moments keep a non-zero code


def test_blocks_follow_the_trailing_axes():
  assert block_layout((64, 384), 256) == (1, 192)
  assert block_layout((8, 4, 512), 256) == (1, 256)
  assert block_layout((10, 97), 256) == (1, 97)  # the whole axis is one block
  assert block_layout((10, 526), 256) == (0, 0)  # 526 = 2 x 263: no divisor in [32, 256]
  assert block_layout((96, 4, 24), 256) == (2, 96)  # small head dim: heads x head_dim merged
  assert block_layout((64, 16), 256) == (0, 0)  # one leading axis stays whole
  assert block_layout((4096,), 256) == (0, 0)  # vectors stay float32
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 128)), jnp.float32)
  code = jnp.asarray(dynamic_map(True))
  codes, absmax = quantize(x, code, 64)
  assert codes.dtype == jnp.uint8 and codes.shape == x.shape
  assert absmax.dtype == jnp.float32 and absmax.shape == (3, 5, 2)
  np.testing.assert_allclose(absmax, np.abs(np.asarray(x)).reshape(3, 5, 2, 64).max(-1))
  codes, absmax = quantize(x, code, 128, axes=2)
  assert absmax.shape == (3, 5) and dequantize(codes, absmax, code).shape == x.shape
  np.testing.assert_allclose(absmax, np.abs(np.asarray(x)).max(-1))


def test_quantisation_error_is_small_relative_to_each_value():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.lognormal(mean=-6, sigma=2.5, size=(16, 256)), jnp.float32)  # v-like
  code = jnp.asarray(dynamic_map(False))
  x_hat = dequantize(*quantize(x, code, 256), code)
  ratio = np.asarray(x_hat / x)
  big = np.asarray(x) > np.asarray(x).max(-1, keepdims=True) * 1e-5
  assert np.median(np.abs(ratio[big] - 1)) < 0.05 and np.abs(ratio[big] - 1).max() < 0.6
  assert np.all(np.asarray(x_hat)[big] > 0)


def _adam_run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, updates, state


def test_updates_follow_float32_adamw():
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)}}
  grads = [
      {"dense": {"kernel": jnp.asarray(rng.normal(size=(64, 256)) * (1 + i % 3), jnp.float32)}}
      for i in range(30)
  ]
  p8, u8, s8 = _adam_run(adamw_8bit(1e-2, weight_decay=0.01, exclude=()), params, grads)
  p32, u32, _ = _adam_run(optax.adamw(1e-2, weight_decay=0.01), params, grads)
  moved = np.abs(np.asarray(p32["dense"]["kernel"] - params["dense"]["kernel"])).mean()
  err = np.abs(np.asarray(p8["dense"]["kernel"] - p32["dense"]["kernel"])).mean()
  assert err < 0.02 * moved
  cos = jnp.vdot(u8["dense"]["kernel"], u32["dense"]["kernel"]) / (
      jnp.linalg.norm(u8["dense"]["kernel"]) * jnp.linalg.norm(u32["dense"]["kernel"])
  )
  assert cos > 0.999
  mu = s8[0].inner_states["8bit"].inner_state.mu["dense"]["kernel"]
  assert isinstance(mu, QuantizedMoment) and mu.codes.dtype == jnp.uint8


def test_a_linear_map_for_v_zeroes_small_entries_and_blows_the_update_up():
  """One large gradient per block sets the absmax; the others are 1e-2 of it, then stop (a sparse
  gradient, e.g. embedding rows absent from the batch). Their v is 1e-4 of the absmax: a linear
  map rounds it to 0 while m survives, so the next update is m / eps; the dynamic map keeps it."""
  first = np.full((4, 256), 1e-2, np.float32)
  first[:, 0] = 1.0
  later = np.zeros_like(first)
  later[:, 0] = 1.0
  params = {"w": jnp.zeros((4, 256))}
  grads = [{"w": jnp.asarray(first)}] + [{"w": jnp.asarray(later)}] * 2
  kw = dict(block_size=256, min_size=0)
  _, dynamic, _ = _adam_run(scale_by_adam_8bit(map_kind="dynamic", **kw), params, grads)
  _, linear, _ = _adam_run(scale_by_adam_8bit(map_kind="linear", **kw), params, grads)
  _, exact, _ = _adam_run(optax.scale_by_adam(), params, grads)
  small = lambda u: np.asarray(u["w"])[:, 1:]
  assert 0.3 < small(exact).min() and small(exact).max() < 1.0
  np.testing.assert_allclose(small(dynamic), small(exact), rtol=0.15)
  assert small(linear).min() > 1e3 * small(exact).max()


def _lm_like_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "embed": {"embedding": f(256, 128)},
      "layers": {"attn": {"kernel": f(4, 128, 512)}, "mlp": {"wi": f(4, 128, 512)}},
      "router": {"kernel": f(128, 8)},
      "norm": {"scale": f(128)},
  }


def test_state_bytes_from_dtypes_and_from_the_compiled_init():
  params = _lm_like_params()
  tx8 = adamw_8bit(1e-3, exclude=(r"embed", r"router"))
  tx32 = optax.adamw(1e-3)
  ratio = state_bytes(jax.eval_shape(tx8.init, params)) / state_bytes(
      jax.eval_shape(tx32.init, params)
  )
  compiled = lambda tx: jax.jit(tx.init).lower(params).compile().memory_analysis()
  measured = compiled(tx8).output_size_in_bytes / compiled(tx32).output_size_in_bytes
  assert ratio <= 0.30 and abs(measured - ratio) < 0.01
  state = tx8.init(params)
  inner = state[0].inner_states
  assert inner["float32"].inner_state.mu["embed"]["embedding"].dtype == jnp.float32
  assert isinstance(inner["8bit"].inner_state.mu["layers"]["attn"]["kernel"], QuantizedMoment)
  assert not isinstance(inner["8bit"].inner_state.mu["norm"]["scale"], QuantizedMoment)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="map_kind='log'"):
    scale_by_adam_8bit(map_kind="log")
  with pytest.raises(ValueError, match="block_size=8"):
    scale_by_adam_8bit(block_size=8)


def _config(**optim):
  c = base_config()
  c.train.update(batch_size=16, num_epochs=6, log_every_steps=4, progress=False, tensorboard=False)
  c.optim.update(name="adamw8bit", learning_rate=1e-2, warmup_steps=5)
  c.optim.adam8bit.update(block_size=32, min_size=0)
  c.optim.update(optim)
  return c


def test_fit_trains_and_resumes_exactly_with_8bit_state(tmp_path):
  train = ArrayDataset(toy_regression_data(256), 16, seed=0)
  valid = ArrayDataset(toy_regression_data(48, seed=1), 16)
  objective = lambda: toy_objective(hidden=64, dropout=0.0)
  full = fit(objective(), train, valid, _config(), tmp_path / "full")
  losses = [h["loss"] for h in full.history]
  assert losses[-1] < 0.6 * losses[0]
  codes = [x for x in jax.tree.leaves(full.state.opt_state) if x.dtype == jnp.uint8]
  assert codes, "no 8-bit moments in the trained state"
  c = _config()
  c.train.stop_after_steps = 17
  fit(objective(), train, valid, c, tmp_path / "resumed")
  rest = fit(objective(), train, valid, _config(), tmp_path / "resumed")
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(rest.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_builder_refuses_nothing_it_accepts():
  tx, _ = build_optimizer(_config().optim, 100)
  params = _lm_like_params()
  kinds = {x.dtype for x in jax.tree.leaves(jax.eval_shape(tx.init, params))}
  assert jnp.dtype("uint8") in kinds
  c = _config()
  c.optim.adam8bit.exclude = (".*",)  # everything float32: no codes at all
  tx, _ = build_optimizer(c.optim, 100)
  assert jnp.dtype("uint8") not in {
      x.dtype for x in jax.tree.leaves(jax.eval_shape(tx.init, params))
  }


SHARDING_SCRIPT = textwrap.dedent("""
    import json, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from nexus_jax.train.adam8bit import adamw_8bit
    from nexus_jax.train.sharding import optimizer_shardings
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
              "embed": {"embedding": jax.ShapeDtypeStruct((256, 64), "float32")},
              "query": {"kernel": jax.ShapeDtypeStruct((64, 4, 24), "float32")}}
    shard = {"dense": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
             "query": {"kernel": NamedSharding(mesh, P("fsdp", "tensor", None))},
             "embed": {"embedding": NamedSharding(mesh, P(None, "tensor"))}}
    tx = adamw_8bit(1e-3, block_size=32, min_size=0, exclude=("embed",))
    out = optimizer_shardings(tx, params, shard, mesh)
    state = jax.jit(tx.init, out_shardings=out)(
        jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), params))
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    print("RESULT" + json.dumps({jax.tree_util.keystr(p): [str(x.dtype), list(x.shape), str(x.sharding.spec)]
                                 for p, x in flat}))
""")


def test_optimizer_state_shardings_follow_the_params_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  leaves = json.loads(proc.stdout.split("RESULT", 1)[1])
  codes = [v for k, v in leaves.items() if "dense" in k and "codes" in k]
  absmax = [v for k, v in leaves.items() if "dense" in k and "absmax" in k]
  embed = [v for k, v in leaves.items() if "embedding" in k]
  assert codes and all(v == ["uint8", [64, 256], "P('fsdp', 'tensor')"] for v in codes)
  assert absmax and all(v == ["float32", [64, 8], "P('fsdp', 'tensor')"] for v in absmax)
  assert embed and all(v[0] == "float32" and v[2] == "P(None, 'tensor')" for v in embed)
  query = sorted(v for k, v in leaves.items() if "query" in k)
  assert query == [
      ["float32", [64, 3], "P('fsdp', None)"],
      ["float32", [64, 3], "P('fsdp', None)"],
      ["uint8", [64, 4, 24], "P('fsdp', 'tensor', None)"],
      ["uint8", [64, 4, 24], "P('fsdp', 'tensor', None)"],
  ]
  counts = [v for k, v in leaves.items() if "count" in k]
  assert counts and all(v[2] == "P()" for v in counts)
