"""MoE sharded over 8 fake CPU devices (experts on the `expert` axis) matches one device."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    from nexus_jax.layers.moe import MoE

    assert len(jax.devices()) == 8
    RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("kv", None),
             ("mlp", "tensor"), ("vocab", "tensor"), ("expert", "expert"), ("length", None))
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 1, 4), ("data", "fsdp", "tensor", "expert"),
                axis_types=(AxisType.Auto,) * 4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 32)), jnp.float32)
    for capacity_factor in (None, 1.0):
      layer = MoE(num_experts=8, mlp_dim=16, top_k=2, capacity_factor=capacity_factor)
      boxed = jax.jit(layer.init)(jax.random.key(1, impl="rbg"), x)["params"]
      params = nn.unbox(boxed)

      def loss(p, x):
        y, aux = layer.apply({"params": p}, x)
        return jnp.sum(y ** 2), (y, aux["expert_load"], aux["dropped_fraction"])

      step = jax.jit(jax.value_and_grad(loss, has_aux=True))
      (_, ref), ref_grads = step(params, x)
      with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        sharded = jax.device_put(params, shardings)
        assert sharded["wo"].sharding.spec[0] == "expert", sharded["wo"].sharding
        assert len(sharded["wo"].addressable_shards[0].data) == 2  # 8 experts / 4 devices
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        (_, out), grads = step(sharded, xs)
      for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
      for name in ref_grads:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(ref_grads[name]),
                                   rtol=2e-5, atol=2e-5, err_msg=name)
      print("ok", capacity_factor, float(out[2]))
""")


def test_sharded_moe_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
      [sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  assert proc.stdout.count("ok ") == 2, proc.stdout
