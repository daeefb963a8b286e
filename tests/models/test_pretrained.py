"""Pretrained HF checkpoints (models/pretrained): the committed tiny Mixtral (one file) and Llama
(tied, sharded with an index) made by transformers (tests/fixtures/pretrained/make_fixture.py)
load with the reference logits and greedy tokens; ours -> safetensors -> ours is bit-exact;
missing / extra / mis-shaped keys fail naming the key, strict=False reports them; shardings on a
fake 8-device mesh; unsupported configs; the conversion knobs reach their layers; the CLI; a
2-step lm-experiment run that starts from an imported checkpoint."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from nexus_jax.inference.generate import generate
from nexus_jax.layers.attention import Attention
from nexus_jax.layers.moe import MoE
from nexus_jax.layers.norms import RMSNorm
from nexus_jax.models.lm import LanguageModel, lm_from_config
from nexus_jax.models.pretrained import (
    export_safetensors,
    import_hf,
    load_pretrained,
    read_hf_config,
)
from nexus_jax.models.pretrained.safetensors_io import CheckpointReader
from nexus_jax.models.saving import load_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"
MIXTRAL, LLAMA = FIXTURES / "tiny_mixtral", FIXTURES / "tiny_llama"


def _reference(folder):
  with np.load(folder / "reference.npz", allow_pickle=False) as ref:
    return {k: ref[k] for k in ref.files}


def _logits(model, params, tokens):
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))[0])


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def mixtral():
  return load_pretrained(MIXTRAL)


@pytest.mark.parametrize("folder", [MIXTRAL, LLAMA], ids=["mixtral", "llama_sharded_tied"])
def test_fixture_matches_transformers_logits_and_greedy_tokens(folder, mixtral):
  model, params, report = mixtral if folder == MIXTRAL else load_pretrained(folder)
  ref = _reference(folder)
  diff = float(np.max(np.abs(_logits(model, params, ref["tokens"]) - ref["logits"])))
  assert diff <= 1e-5, diff
  out = generate(model, params, ref["prompt"].tolist(), max_new_tokens=8)  # temperature 0
  np.testing.assert_array_equal(out.tokens, ref["greedy"])
  assert not report.unloaded and not report.missing
  assert set(report.loaded) == set(CheckpointReader(folder).keys())
  if folder == LLAMA:  # sharded index, tied head, head_dim 16 != 32 / 4 heads
    assert (folder / "model.safetensors.index.json").is_file()
    assert model.num_experts == 0 and model.head_dim == 16 and model.norm_epsilon == 1e-6
    assert any("tie_word_embeddings" in n for n in report.notes)
  else:
    assert (model.num_experts, model.moe_top_k, model.norm_epsilon, model.rope_theta) == (
        4,
        2,
        1e-5,
        1e6,
    )
    assert model.moe_capacity_factor is None and model.moe_renormalize and not model.head_bias


def test_ours_to_safetensors_to_ours_is_bit_exact(tmp_path, mixtral):
  model, params, _ = mixtral
  out = export_safetensors(model, params, tmp_path / "hf", max_shard_bytes=100_000)
  files = sorted(p.name for p in out.iterdir())
  assert "model.safetensors.index.json" in files and "config.json" in files
  # The export has exactly the fixture's tensors, bit for bit (inverse transforms).
  src, dst = CheckpointReader(MIXTRAL), CheckpointReader(out)
  assert src.keys() == dst.keys()
  assert all(np.array_equal(src.get(k), dst.get(k)) for k in src.keys())
  model2, params2, report = load_pretrained(out)
  assert model2 == model and not report.unloaded
  a, b = _flat(params), _flat(params2)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # bfloat16 params: written as BF16 (numpy has no bfloat16; read from the raw bytes).
  model16, params16, _ = load_pretrained(MIXTRAL, dtype=jnp.bfloat16)
  out16 = export_safetensors(model16, params16, tmp_path / "hf16")
  assert CheckpointReader(out16).dtype("lm_head.weight") == "BF16"
  assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
  _, again, _ = load_pretrained(out16, dtype=jnp.bfloat16)
  a, b = _flat(params16), _flat(again)
  assert all(a[k].dtype == jnp.bfloat16 and np.array_equal(a[k], b[k]) for k in a)
  # A dense (Llama-named) model round-trips too; a folder that is not our export is refused.
  llama, llama_params, _ = load_pretrained(LLAMA)
  out = export_safetensors(llama, llama_params, tmp_path / "llama")
  a, b = _flat(llama_params), _flat(load_pretrained(out)[1])
  assert all(np.array_equal(a[k], b[k]) for k in a)
  export_safetensors(llama, llama_params, out, overwrite=True)  # replaces our own export
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(ValueError, match="left untouched"):
    export_safetensors(llama, llama_params, tmp_path / "mine", overwrite=True)
  with pytest.raises(ValueError, match="head_bias=True"):
    export_safetensors(llama.clone(head_bias=True), llama_params, tmp_path / "x")


def _edited_copy(tmp_path, edit):
  folder = tmp_path / "edited"
  shutil.copytree(MIXTRAL, folder)
  reader = CheckpointReader(MIXTRAL)
  tensors = {k: reader.get(k) for k in reader.keys()}
  edit(tensors)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  return folder


def test_missing_extra_and_misshaped_keys_fail_naming_the_key(tmp_path):
  key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
  folder = _edited_copy(tmp_path, lambda t: t.pop(key))
  with pytest.raises(ValueError, match=rf"missing key {key} \(shape \(64, 32\), for our "):
    load_pretrained(folder)
  shutil.rmtree(folder)
  folder = _edited_copy(tmp_path, lambda t: t.update(extra=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match="extra key extra"):
    load_pretrained(folder)
  shutil.rmtree(folder)
  bad = "model.layers.0.self_attn.k_proj.weight"
  folder = _edited_copy(tmp_path, lambda t: t.update({bad: t[bad][:8]}))
  with pytest.raises(ValueError, match=rf"key {bad} has shape \(8, 32\), expected \(16, 32\)"):
    load_pretrained(folder)


def test_non_strict_loads_the_rest_and_reports(tmp_path, mixtral):
  key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"

  def edit(t):
    t.pop(key)
    t["model.vision_tower.weight"] = np.ones(4, np.float32)

  model, params, report = load_pretrained(_edited_copy(tmp_path, edit), strict=False)
  assert (
      report.missing == {"decoder/layers/moe/wi_up": report.missing["decoder/layers/moe/wi_up"]}
      and key in report.missing["decoder/layers/moe/wi_up"]
  )
  assert "model.vision_tower.weight" in report.unloaded
  # The other experts' up projections belonged to the param that could not be completed.
  assert "model.layers.0.block_sparse_moe.experts.0.w3.weight" in report.unloaded
  a, b = _flat(mixtral[1]), _flat(params)
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a if k != ("decoder", "layers", "moe", "wi_up"))
  assert np.all(np.isfinite(_logits(model, params, np.zeros((1, 4), np.int32))))


MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from nexus_jax.models.pretrained import load_pretrained
from nexus_jax.models.pretrained.convert import abstract_params
from nexus_jax.train import sharding
from flax import traverse_util
folder = sys.argv[1]
mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
model, params, _ = load_pretrained(folder, mesh=mesh)
want = sharding.logical_shardings(abstract_params(model), mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES)
got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(want)
_, single, _ = load_pretrained(folder)
single = traverse_util.flatten_dict(single)
print("RESULT" + json.dumps({
    "same_sharding": all(got[k].sharding == want[k] for k in want),
    "equal": all(np.array_equal(np.asarray(got[k]), np.asarray(single[k])) for k in want),
    "specs": {"/".join(k): str(got[k].sharding.spec) for k in got},
}))
"""


def test_mesh_load_places_each_param_with_its_rule_sharding():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", MESH_SCRIPT, str(MIXTRAL)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[6:])
  assert out["same_sharding"] and out["equal"]
  specs = out["specs"]
  # rules: expert -> expert, embed -> fsdp, mlp / heads / vocab -> tensor; [L] unsharded
  assert specs["decoder/layers/moe/wi_gate"] == "P(None, 'expert', 'fsdp', 'tensor')"
  assert specs["head/kernel"] == "P('fsdp', 'tensor')"
  assert specs["decoder/layers/self_attention/query/kernel"].startswith("P(None, 'fsdp', 'tensor'")


def _config_with(tmp_path, **changes):
  cfg = json.loads((MIXTRAL / "config.json").read_text())
  cfg.update(changes)
  folder = tmp_path / "cfg"
  folder.mkdir(exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg))
  return folder


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "qwen2_moe"}, "model_type='qwen2_moe' is not supported .*shared expert"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_configs_fail_naming_the_key(tmp_path, changes, match):
  with pytest.raises(ValueError, match=match):
    read_hf_config(_config_with(tmp_path, **changes))


def test_sliding_window_caps_max_len_and_a_given_model_must_agree(tmp_path):
  assert read_hf_config(_config_with(tmp_path, sliding_window=16)).max_len == 16
  assert read_hf_config(_config_with(tmp_path, sliding_window=4096)).max_len == 64
  unscanned = read_hf_config(MIXTRAL).clone(scan_layers=False)
  model, params, _ = load_pretrained(MIXTRAL, unscanned)  # another layout of the same function
  ref = _reference(MIXTRAL)
  assert np.max(np.abs(_logits(model, params, ref["tokens"]) - ref["logits"])) <= 1e-5
  with pytest.raises(ValueError, match="model.rope_theta=10000.0 but config.json gives 1000000"):
    load_pretrained(MIXTRAL, unscanned.clone(rope_theta=10000.0))


def test_conversion_knobs_reach_their_layers():
  mc = ml_collections.ConfigDict(
      dict(
          num_layers=1,
          embed_dim=16,
          num_heads=2,
          num_kv_heads=1,
          mlp_dim=16,
          num_experts=2,
          moe_top_k=2,
          moe_load_balance_coef=0.0,
          dropout_rate=0.0,
          attention_backend="xla",
          norm_epsilon=1e-5,
          rope_theta=123.0,
          head_bias=False,
          moe_renormalize=False,
      )
  )
  model = lm_from_config(mc, vocab_size=32)
  seen = []

  def spy(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, RMSNorm):
      seen.append(("eps", m.epsilon))
    elif isinstance(m, Attention):
      seen.append(("theta", m.rope_theta))
    elif isinstance(m, MoE):
      seen.append(("renormalize", m.renormalize))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  assert {v for k, v in seen if k == "eps"} == {1e-5}  # both block norms and the final norm
  assert {v for k, v in seen if k == "theta"} == {123.0}
  assert {v for k, v in seen if k == "renormalize"} == {False}
  assert "bias" not in variables["params"]["head"]
  # ... and changes the output: with 3 experts the top-2 weights no longer sum to 1.
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 8))
  moe = MoE(num_experts=3, mlp_dim=8, renormalize=False, load_balance_coef=0, z_loss_coef=0)
  p = jax.jit(moe.init)(jax.random.PRNGKey(2), x)
  a, b = moe.apply(p, x)[0], moe.clone(renormalize=True).apply(p, x)[0]
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_cli_import_and_export(tmp_path, capsys):
  from nexus_jax.cli.nexus_lm import main

  assert main(["import-hf", "--from", str(MIXTRAL), "--out", str(tmp_path / "model")]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["loaded"] == len(CheckpointReader(MIXTRAL).keys()) and not summary["unloaded"]
  saved = load_model(tmp_path / "model", family="lm")
  ref = _reference(MIXTRAL)
  logits = _logits(saved.model, saved.variables["params"], ref["tokens"])
  assert np.max(np.abs(logits - ref["logits"])) <= 1e-5
  assert "tokenizer" in saved.metadata and saved.metadata["hf_config"]["model_type"] == "mixtral"
  out = tmp_path / "hf"
  assert main(["export-hf", "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
  src, dst = CheckpointReader(MIXTRAL), CheckpointReader(out)
  assert all(np.array_equal(src.get(k), dst.get(k)) for k in src.keys())
  assert main(["export-hf", "--model", str(tmp_path / "model"), "--out", str(out)]) == 2
  assert "already holds an export" in capsys.readouterr().err


def test_lm_experiment_starts_from_an_imported_checkpoint(tmp_path):
  from experiments.run import run_experiment
  from nexus_jax.testing import stdlib_text_folder

  model_dir, _ = import_hf(MIXTRAL, tmp_path / "imported")
  imported = load_model(model_dir).variables["params"]
  spec = importlib.util.spec_from_file_location("lm_config", ROOT / "configs" / "lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  folder = stdlib_text_folder(tmp_path / "corpus")
  c.data.update(root=str(folder), valid_fraction=0.2, test_fraction=0.2, seq_len=16)
  c.data.update(valid_bytes=512, test_bytes=512)
  c.model.update(
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      num_experts=4,
      max_len=64,
      norm_epsilon=1e-5,
      rope_theta=1e6,
      head_bias=False,
      train_dense_baseline=False,
  )
  c.train.update(
      init_from=str(model_dir),
      batch_size=4,
      num_steps=2,
      eval_every_steps=2,
      progress=False,
      tensorboard=False,
  )
  c.optim.update(learning_rate=1e-9, warmup_steps=0)
  c.sample.num_bytes = 4
  results = run_experiment(c, tmp_path / "run")
  trained = load_model(results["model_dir"]).variables["params"]
  a, b = _flat(imported), _flat(trained)
  assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) < 1e-6  # 2 steps at lr 1e-9
  c.model.rope_theta = 10000.0
  with pytest.raises(
      ValueError, match=r"init_from=.*rope_theta: configured 10000.0, saved 1000000"
  ):
    run_experiment(c, tmp_path / "run2")
