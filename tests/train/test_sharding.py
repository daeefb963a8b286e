"""Mesh construction and sharded training on 8 fake CPU devices (in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from nexus_jax.train.sharding import logical_axis_rules, mesh_shape

SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import jax, numpy as np
    from nexus_jax.testing import toy_objective, toy_regression_data
    from nexus_jax.train.config import base_config
    from nexus_jax.train.data import ArrayDataset
    from nexus_jax.train.loop import fit
    from nexus_jax.train.metrics import read_metrics

    assert jax.device_count() == 8, jax.devices()

    def run(devices, **mesh):
        c = base_config()
        c.train.update(batch_size=16, num_steps=6, log_every_steps=1, progress=False, tensorboard=False)
        c.mesh.update(mesh)
        train = ArrayDataset(toy_regression_data(96), 16)
        valid = ArrayDataset(toy_regression_data(32, seed=1), 16)
        with tempfile.TemporaryDirectory() as w:
            result = fit(toy_objective(hidden=16, dropout=0.1), train, valid, c, w, devices=devices)
            losses = [r["loss"] for r in read_metrics(w, "train")]
        params = result.state.params
        opt_mu = result.state.opt_state[0].mu if hasattr(result.state.opt_state[0], "mu") else None
        specs = {
            "dense0_kernel": str(params["Dense_0"]["kernel"].sharding.spec),
            "dense0_bias": str(params["Dense_0"]["bias"].sharding.spec),
            "dense1_kernel": str(params["Dense_1"]["kernel"].sharding.spec),
            "mesh": dict(result.state.params["Dense_0"]["kernel"].sharding.mesh.shape),
        }
        leaves = jax.tree.leaves(result.state.opt_state)
        specs["opt_shardings"] = sorted({str(x.sharding.spec) for x in leaves if x.ndim == 2})
        return losses, specs

    sharded_losses, specs = run(jax.devices(), data=2, fsdp=1, tensor=4, expert=1)
    single_losses, _ = run(jax.devices()[:1], data=-1, fsdp=1, tensor=1, expert=1)
    print("RESULT" + json.dumps({"sharded": sharded_losses, "single": single_losses, "specs": specs}))
""")


def test_mesh_shape_fills_minus_one_and_rejects_mismatch():
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1, expert=1))
  assert mesh_shape(cfg, 8) == (4, 2, 1, 1)
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=2, tensor=1, expert=1)), 8)
  with pytest.raises(ValueError, match="does not divide the 8 available devices"):
    mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=3, tensor=1, expert=1)), 8)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1, expert=1)), 8)


def test_rules_with_unknown_mesh_axis_fail():
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    logical_axis_rules([["mlp", "model"]])


def test_sharded_training_on_8_fake_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  out = json.loads(line[len("RESULT") :])
  specs = out["specs"]
  assert specs["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
  # Rules: embed -> fsdp (size 1, so replicated), mlp -> tensor.
  assert specs["dense0_kernel"] == "P(None, 'tensor')"
  assert specs["dense0_bias"] == "P('tensor',)"
  assert specs["dense1_kernel"] == "P('tensor', None)"
  # Adam moments follow their params.
  assert set(specs["opt_shardings"]) == {"P(None, 'tensor')", "P('tensor', None)"}
  assert len(out["sharded"]) == 6
  for a, b in zip(out["sharded"], out["single"]):
    assert abs(a - b) < 1e-5, (out["sharded"], out["single"])
