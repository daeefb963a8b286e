"""The dense and the MoE language model trained through `train.loop.fit` on 8 fake CPU devices.

Each test runs a subprocess (`--xla_force_host_platform_device_count=8`) that trains the same tiny
model for 5 steps on one device and on a mesh, and reports:
- the training losses of both runs (equal to 1e-5);
- the sharding of every param and of its Adam moments (what `train/sharding.py`'s rules say);
- the sharding XLA gave every activation passed to `nn.with_logical_constraint`, read back with
  `jax.debug.inspect_array_sharding` at compile time (so a constraint that is dropped, e.g.
  by tracing the blocks outside the mesh, shows up as a missing or replicated activation);
- for the MoE on the expert mesh, which experts' weights each device holds.
Meshes: (data 2, fsdp 2, tensor 2) and (data 2, expert 4).
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nexus_jax.train import sharding

SCRIPT = textwrap.dedent(r"""
    import json, sys, tempfile
    import flax.linen as nn
    import jax, numpy as np
    from nexus_jax.models.hybrid import HybridLM
    from nexus_jax.models.lm import LanguageModel
    from nexus_jax.models.seq_objectives import lm_objective
    from nexus_jax.train.config import base_config
    from nexus_jax.train.data import ArrayDataset
    from nexus_jax.train.loop import fit
    from nexus_jax.train.metrics import read_metrics

    assert jax.device_count() == 8, jax.devices()
    kind = sys.argv[1]  # dense | moe | hybrid
    experts = 4 if kind == "moe" else 0

    SEEN = set()  # (logical names, shape, spec XLA chose) of every constrained activation
    constrain = nn.with_logical_constraint

    def recording_constraint(x, names, *args, **kwargs):
      y = constrain(x, names, *args, **kwargs)
      key = [list(names), list(y.shape)]
      jax.debug.inspect_array_sharding(
          y, callback=lambda s, key=key: SEEN.add(json.dumps(key + [list(s.spec)])))
      return y

    nn.with_logical_constraint = recording_constraint

    def path_name(path):
      return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                      for k in path)

    def run(devices, mesh):
      SEEN.clear()
      c = base_config()
      c.train.update(batch_size=8, num_steps=5, log_every_steps=1, progress=False,
                     tensorboard=False, eval_every_steps=5)
      c.optim.update(warmup_steps=1, learning_rate=3e-3)
      c.mesh.update(mesh)
      if kind == "hybrid":  # one attention and one SSM layer
        model = HybridLM(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, num_blocks=1,
                         layers_per_block=2, mlp_dim=48, ssm_chunk_size=8, scan_blocks=False)
      else:
        model = LanguageModel(
            vocab_size=64, num_layers=1, scan_layers=False, embed_dim=32, num_heads=4,
            num_kv_heads=2, mlp_dim=64, num_experts=experts, moe_top_k=2,
            moe_capacity_factor=2.0 if experts else None)
      tokens = np.random.default_rng(0).integers(0, 64, size=(40, 17)).astype(np.int32)
      train, valid = ArrayDataset({"tokens": tokens}, 8), ArrayDataset({"tokens": tokens[:8]}, 8)
      with tempfile.TemporaryDirectory() as w:
        state = fit(lm_objective(model), train, valid, c, w, devices=devices).state
        losses = [r["loss"] for r in read_metrics(w, "train")]
      params = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
      out = {
          "losses": losses,
          "params": {k: [list(v.sharding.spec), list(v.addressable_shards[0].data.shape)]
                     for k, v in params.items()},
          "moments": {},
          "activations": sorted(json.loads(s) for s in SEEN),
      }
      for p, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        name = path_name(p)
        for moment in ("mu/", "nu/"):
          if moment in name:
            out["moments"][moment + name.split(moment, 1)[1]] = list(v.sharding.spec)
      if experts:  # which experts each device holds: index along the expert dim of `wo`
        wo = params["decoder/layers_0/moe/wo"]
        coord = {d.id: i for i, d in np.ndenumerate(wo.sharding.mesh.devices)}
        axis = wo.sharding.mesh.axis_names.index("expert")
        out["experts"] = [
            [coord[s.device.id][axis], s.index[0].start, s.index[0].stop]
            for s in wo.addressable_shards]
      return out

    out = {"single": run(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1, expert=1))}
    for name in sys.argv[2:]:
      out[name] = run(jax.devices(), json.loads(name))
    print("RESULT" + json.dumps(out))
""")

DENSE_MESH = dict(data=2, fsdp=2, tensor=2, expert=1)
EXPERT_MESH = dict(data=2, fsdp=1, tensor=1, expert=4)


@functools.cache
def _trained(kind: str, meshes: tuple[str, ...]) -> dict:
  """One subprocess per model: the 1-device run and a run on each mesh (shared by the tests)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", SCRIPT, kind, *meshes],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-6000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT") :])


def _train(kind: str, mesh: dict, meshes=(DENSE_MESH, EXPERT_MESH)) -> dict:
  """`{"mesh": run on mesh, "single": run on one device}` of the model `kind`."""
  out = _trained(kind, tuple(json.dumps(m) for m in meshes))
  return {"mesh": out[json.dumps(mesh)], "single": out["single"]}


def _canonical(spec, mesh: dict) -> list:
  """A spec as a list of tuples of mesh axes, size-1 axes and trailing replicated dims removed."""
  dims = []
  for axes in spec:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    dims.append(tuple(a for a in names if mesh[a] > 1))
  while dims and not dims[-1]:
    dims.pop()
  return dims


def _rule_spec(names, mesh: dict) -> list:
  """What the default rules map logical `names` to (flax resolves a mesh axis used twice)."""
  return _canonical(
      nn.logical_to_mesh_axes(tuple(names), sharding.DEFAULT_LOGICAL_AXIS_RULES), mesh
  )


def _check_common(out: dict, mesh: dict, want_activations: set):
  sharded, single = out["mesh"], out["single"]
  assert len(sharded["losses"]) == len(single["losses"]) == 5
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=0, atol=1e-5)
  # Adam's moments carry their params' shardings.
  params = sharded["params"]
  for name, spec in sharded["moments"].items():
    assert spec == params[name.split("/", 1)[1]][0], name
  assert len(sharded["moments"]) == 2 * len(params)
  # Every constrained activation got the sharding its logical names map to, and the key ones
  # (attention q/k/v, MLP hidden, block outputs, MoE dispatch) were all constrained.
  seen = set()
  for names, shape, spec in sharded["activations"]:
    assert _canonical(spec, mesh) == _rule_spec(names, mesh), (names, shape, spec)
    seen.add(tuple(names))
  assert want_activations <= seen, want_activations - seen
  # On one device there is nothing to shard.
  assert all(_canonical(spec, {a: 1 for a in mesh}) == [] for _, _, spec in single["activations"])


def test_dense_lm_on_data_fsdp_tensor_mesh_matches_one_device():
  out = _train("dense", DENSE_MESH)
  _check_common(
      out,
      DENSE_MESH,
      {
          ("batch", "length", "heads", "kv"),
          ("batch", "length", "mlp"),
          ("batch", "length", "embed"),
      },
  )
  params = out["mesh"]["params"]
  # [layers, embed, heads, kv] with embed -> fsdp and heads -> tensor: 32/2, 4/2 (kv heads 2/2).
  attn = "decoder/layers_0/self_attention/"
  assert params[attn + "query/kernel"] == [["fsdp", "tensor", None], [16, 2, 8]]
  assert params[attn + "key/kernel"] == [["fsdp", "tensor", None], [16, 1, 8]]
  assert params[attn + "out/kernel"] == [["tensor", None, "fsdp"], [2, 8, 16]]
  assert params["decoder/layers_0/mlp/wi_gate/kernel"] == [["fsdp", "tensor"], [16, 32]]
  assert params["decoder/layers_0/mlp/wo/kernel"] == [["tensor", "fsdp"], [32, 16]]
  assert params["input_embed/embedding"] == [["tensor", "fsdp"], [32, 16]]
  assert params["head/kernel"] == [["fsdp", "tensor"], [16, 32]]
  # The attention activations: batch over data x fsdp, heads over tensor.
  q = [a for a in out["mesh"]["activations"] if a[0] == ["batch", "length", "heads", "kv"]]
  assert q and all(a[2][:3] == [["data", "fsdp"], None, "tensor"] for a in q), q


def test_moe_lm_on_expert_mesh_places_one_expert_per_shard():
  out = _train("moe", EXPERT_MESH)
  _check_common(
      out,
      EXPERT_MESH,
      {
          ("batch", "length", "heads", "kv"),
          ("batch", "length", "embed"),
          ("expert", "batch", None, "embed"),
          ("expert", "batch", None, "mlp"),
      },
  )
  params = out["mesh"]["params"]
  for name in ("wi_gate", "wi_up", "wo"):  # [expert, ...]: 4 experts over expert=4
    spec, local = params[f"decoder/layers_0/moe/{name}"]
    assert spec[0] == "expert" and local[0] == 1, (name, spec, local)
  # Device at expert coordinate k holds exactly expert k.
  assert sorted({tuple(e) for e in out["mesh"]["experts"]}) == [(k, k, k + 1) for k in range(4)]
  # The dispatched tokens [expert, groups, capacity, embed] are split over the expert axis.
  dispatch = [a for a in out["mesh"]["activations"] if a[0][0] == "expert"]
  assert dispatch and all(a[2][:2] == ["expert", "data"] for a in dispatch), dispatch


def test_moe_lm_on_data_fsdp_tensor_mesh_matches_one_device():
  out = _train("moe", DENSE_MESH)
  _check_common(
      out,
      DENSE_MESH,
      {("batch", "length", "heads", "kv"), ("expert", "batch", None, "mlp")},
  )
  # Experts replicated (expert axis of size 1), their embed dim over fsdp and mlp over tensor.
  assert out["mesh"]["params"]["decoder/layers_0/moe/wi_gate"][0] == [None, "fsdp", "tensor"]


def test_dense_lm_on_expert_mesh_matches_one_device():
  _check_common(_train("dense", EXPERT_MESH), EXPERT_MESH, {("batch", "length", "mlp")})


def test_hybrid_lm_ssm_constraints_live_on_data_fsdp_tensor_mesh():
  out = _train("hybrid", DENSE_MESH, meshes=(DENSE_MESH,))
  # SSM: the conv input u [B, T, expand*E] and the output; attention and the MLP as above.
  _check_common(
      out,
      DENSE_MESH,
      {
          ("batch", "length", "mlp"),
          ("batch", "length", "embed"),
          ("batch", "length", "heads", "kv"),
      },
  )
  u = [a for a in out["mesh"]["activations"] if a[0] == ["batch", "length", "mlp"]]
  assert sorted(a[1] for a in u) == [[8, 16, 48], [8, 16, 64]], u  # the MLP's and the SSM's u
  assert all(a[2] == [["data", "fsdp"], None, "tensor"] for a in u), u
  ssm = "blocks_0/layer_0_ssm/"
  params = out["mesh"]["params"]
  assert params[ssm + "in_proj/kernel"][0] == ["fsdp", None, "tensor"], params.keys()


def _abstract_head(vocab: int):
  kernel = jax.ShapeDtypeStruct((32, vocab), np.float32)
  return {"head": {"kernel": nn.LogicallyPartitioned(kernel, ("embed", "vocab"))}}


def test_param_dimension_a_mesh_axis_does_not_divide_is_an_error():
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError) as err:
    sharding.logical_shardings(_abstract_head(257), mesh, rules)
  message = str(err.value)
  for part in (
      "head/kernel",
      "dimension 1",
      "size 257",
      "'vocab'",
      "'tensor'",
      "logical_axis_rules",
  ):
    assert part in message, message
  # Dividing dims are sharded; an axis of size 1 divides everything (no error, replicated).
  assert sharding.logical_shardings(_abstract_head(256), mesh, rules)["head"]["kernel"].spec == P(
      "fsdp", "tensor"
  )
  one = jax.sharding.AbstractMesh((8, 1, 1, 1), sharding.MESH_AXES)
  assert sharding.logical_shardings(_abstract_head(257), one, rules)["head"]["kernel"].spec == P(
      None, None
  )
  # The fix the message names: map the logical axis to None.
  replicated_vocab = [r for r in rules if r[0] != "vocab"] + [("vocab", None)]
  got = sharding.logical_shardings(_abstract_head(257), mesh, replicated_vocab)
  assert got["head"]["kernel"].spec == P("fsdp", None)


FIT_ERROR_SCRIPT = textwrap.dedent(r"""
    import tempfile
    import numpy as np
    from nexus_jax.models.hybrid import HybridLM
    from nexus_jax.models.lm import LanguageModel
    from nexus_jax.models.seq_objectives import lm_objective
    from nexus_jax.train.config import base_config
    from nexus_jax.train.data import ArrayDataset
    from nexus_jax.train.loop import fit

    c = base_config()
    c.train.update(batch_size=8, num_steps=1, progress=False, tensorboard=False)
    c.optim.warmup_steps = 0
    c.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
    model = LanguageModel(vocab_size=65, num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64,
                          num_experts=0)
    data = ArrayDataset({"tokens": np.zeros((8, 9), np.int32)}, 8)
    try:
      with tempfile.TemporaryDirectory() as w:
        fit(lm_objective(model), data, data, c, w)
    except ValueError as e:
      print("ERROR", e)
""")


def test_fit_with_a_vocabulary_the_tensor_axis_does_not_divide_fails_naming_it():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", FIT_ERROR_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  assert out.startswith("ERROR the mesh cannot shard these dimensions evenly"), out
  for name in ("input_embed/embedding: dimension 0", "head/kernel: dimension 1", "head/bias"):
    assert f"params/{name}" in out, out
  assert "(size 65, logical axis 'vocab')" in out and "mesh axis 'tensor' (tensor=2" in out, out
  assert "config.sharding.logical_axis_rules" in out, out
