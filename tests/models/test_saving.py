"""save_model / load_model: every family reloads bit-identically; config JSON round trip; target
folder rules; one-line errors for wrong folders, versions, families, tampering and shapes."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models import saving
from nexus_jax.models.hybrid import HybridLM
from nexus_jax.models.hybrid_jepa import HybridJEPA
from nexus_jax.models.lm import LanguageModel
from nexus_jax.models.saving import ModelFormatError, load_model, model_config, save_model
from nexus_jax.models.transformer import Decoder, Encoder, EncoderDecoder
from nexus_jax.models.world_model import JEPAWorldModel
from nexus_jax.train import integrity

SMALL = dict(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32)
HYBRID = dict(
    vocab_size=32,
    d_model=16,
    num_heads=2,
    num_blocks=1,
    layers_per_block=2,
    attention_index=1,
    ssm_state_dim=4,
    ssm_scan_method="sequential",
)


def _rand(seed, shape, high=None):
  rng = np.random.default_rng(seed)
  if high is not None:
    return rng.integers(0, high, shape).astype(np.int32)
  return rng.normal(size=shape).astype(np.float32)


def _cases():
  """family -> (model, positional inputs, keyword inputs): one tiny model of each family."""
  tokens = _rand(0, (2, 6), high=32)
  return {
      "encoder": (
          Encoder(
              **SMALL,
              head="classification",
              num_outputs=3,
              norm="adaptive_layer",
              condition_dim=3,
          ),
          (_rand(1, (2, 5, 4)),),
          {"condition": _rand(2, (2, 3))},
      ),
      "decoder": (
          Decoder(
              **SMALL,
              vocab_size=32,
              cross_attention=True,
              position_embedding="learned",
              max_len=6,
              dtype=jnp.bfloat16,
          ),
          (tokens, _rand(3, (2, 4, 8))),
          {},
      ),
      "encoder_decoder": (
          EncoderDecoder(
              **SMALL,
              vocab_size=0,
              source_vocab_size=0,
              head="token_regression",
              num_outputs=2,
              rotary_fraction=0.5,
          ),
          (_rand(4, (2, 7, 5)), _rand(5, (2, 3, 4))),
          {},
      ),
      "lm": (
          LanguageModel.from_preset("tiny", vocab_size=32, embed_dim=16, mlp_dim=16),
          (tokens,),
          {},
      ),
      "hybrid": (HybridLM(**HYBRID), (tokens,), {}),
      "hybrid_jepa": (HybridJEPA(lm=HybridLM(**HYBRID), horizon=2), (tokens,), {}),
      "jepa_world_model": (
          JEPAWorldModel(
              embed_dim=16,
              num_layers=1,
              num_heads=2,
              mlp_dim=32,
              predictor_dim=16,
              predictor_layers=1,
              predictor_heads=2,
              predictor_mlp_dim=16,
              expander_dims=(8, 4),
          ),
          (_rand(6, (2, 8, 3)), np.arange(16).reshape(2, 8) % 3 == 0, _rand(7, (2, 8, 2))),
          {},
      ),
  }


def _init(model, args, kwargs):
  """Random variables of the shapes `model.init` makes (no compiled init; zero-initialised parts
  such as the adaptive norms' projections get non-zero values too)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(9), *args, **kwargs))
  variables = {c: v for c, v in nn.unbox(shapes).items() if c != "aux_loss"}
  rng = np.random.default_rng(10)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), variables)


@jax.jit(static_argnums=0)
def _apply(model, variables, args, kwargs):
  return model.apply(variables, *args, **kwargs)


@pytest.mark.parametrize("family", list(saving.FAMILIES))
def test_every_family_reloads_bit_identically(family, tmp_path):
  model, args, kwargs = _cases()[family]
  variables = _init(model, args, kwargs)
  before = _apply(model, variables, args, kwargs)
  path = save_model(tmp_path / "model", model, variables, metadata={"step": 3})
  saved = load_model(path, family=family)
  assert saved.family == family and saved.model == model and saved.path == path
  assert saved.metadata == {"step": 3}
  assert jax.tree.structure(saved.variables) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(saved.variables), jax.tree.leaves(variables)):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  after = _apply(saved.model, saved.variables, args, kwargs)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    assert np.isfinite(np.asarray(b, np.float32)).all() and np.array_equal(a, b)
  meta = json.loads((path / "model.json").read_text())
  assert meta["format_version"] == saving.FORMAT_VERSION and meta["family"] == family
  assert meta["param_count"] == sum(x.size for x in jax.tree.leaves(variables["params"]))


def test_config_round_trip_keeps_dtypes_tuples_and_nested_models():
  model = HybridJEPA(lm=HybridLM(**HYBRID, dtype=jnp.bfloat16), horizon=3)
  config = json.loads(json.dumps(model_config(model)))
  assert config["fields"]["lm"]["__module__"]["fields"]["dtype"] == "bfloat16"
  rebuilt = saving.model_from_config(config)
  assert rebuilt == model and rebuilt.lm.dtype is jnp.bfloat16 and hash(rebuilt) == hash(model)
  world = JEPAWorldModel(expander_dims=(32, 16), param_dtype=jnp.float16)
  back = saving.model_from_config(json.loads(json.dumps(model_config(world))))
  assert back.expander_dims == (32, 16) and back.param_dtype is jnp.float16
  options = Decoder(
      **SMALL,
      vocab_size=5,
      norm="adaptive_rms",
      condition_dim=4,
      use_final_norm=False,
      position_embedding="learned",
      max_len=64,
  )
  assert saving.model_from_config(json.loads(json.dumps(model_config(options)))) == options


@pytest.mark.parametrize(
    "model, match",
    [
        (Decoder(**SMALL, vocab_size=5, rope_theta=math.inf), r"decoder.rope_theta = inf"),
        (Encoder(**SMALL, head=jnp.tanh), r"encoder.head = .* is not JSON-able"),
        (Encoder(**SMALL, dtype="no-such-dtype"), r"encoder.dtype = 'no-such-dtype' is not a"),
        (nn.Dense(3), r"Dense is not a saveable model family"),
    ],
)
def test_model_config_errors(model, match):
  with pytest.raises(ModelFormatError, match=match):
    model_config(model)


def test_model_from_config_names_unknown_family_and_field():
  with pytest.raises(ModelFormatError, match="unknown model family 'rnn'"):
    saving.model_from_config({"family": "rnn", "fields": {}})
  with pytest.raises(ModelFormatError, match=r"family 'lm' \(LanguageModel\) has no field 'depth'"):
    saving.model_from_config({"family": "lm", "fields": {"depth": 3}})
  with pytest.raises(ModelFormatError, match="'fields'"):
    saving.model_from_config({"family": "lm"})


def _tiny_lm():
  model = LanguageModel(**SMALL, vocab_size=8, num_experts=0, num_kv_heads=1)
  tokens = jnp.zeros((1, 4), jnp.int32)
  return model, _init(model, (tokens,), {}), tokens


def test_save_targets_and_overwrite_never_touch_user_files(tmp_path):
  model, variables, _ = _tiny_lm()
  (tmp_path / "empty").mkdir()
  save_model(tmp_path / "empty", model, variables)  # an empty folder is fine
  user = tmp_path / "mine"
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  with pytest.raises(ModelFormatError, match="is not empty and does not hold a saved model"):
    save_model(user, model, variables)
  with pytest.raises(ModelFormatError, match="is not empty and does not hold a saved model"):
    save_model(user, model, variables, overwrite=True)
  assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1
  with pytest.raises(ModelFormatError, match="is a file"):
    save_model(user / "notes.txt", model, variables)

  path = save_model(tmp_path / "m", model, variables)
  with pytest.raises(ModelFormatError, match="already holds a saved model; pass overwrite=True"):
    save_model(path, model, variables)
  bigger = {"params": jax.tree.map(lambda x: x + 1, variables["params"])}
  save_model(path, model, bigger, overwrite=True)
  np.testing.assert_array_equal(
      load_model(path).variables["params"]["input_embed"]["embedding"],
      bigger["params"]["input_embed"]["embedding"],
  )
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
  (path / "extra.txt").write_text("mine")  # a model folder the user added to
  with pytest.raises(ModelFormatError, match="does not hold a saved model"):
    save_model(path, model, variables, overwrite=True)
  assert (path / "extra.txt").read_text() == "mine"


def test_save_checks_variables_metadata_and_assets(tmp_path):
  model, variables, _ = _tiny_lm()
  wrong = jax.tree.map(lambda x: x, variables)
  wrong["params"]["head"]["kernel"] = jnp.zeros((16, 9))
  with pytest.raises(
      ModelFormatError,
      match=r"\['params'\]\['head'\]\['kernel'\] is float32\[16, 9\], .*float32\[16, 8\]",
  ):
    save_model(tmp_path / "a", model, wrong)
  with pytest.raises(ModelFormatError, match="'params' collection"):
    save_model(tmp_path / "a", model, {"weights": variables["params"]})
  with pytest.raises(
      ModelFormatError, match="collection 'stats' is not one the 'lm' model creates"
  ):
    save_model(tmp_path / "a", model, {**variables, "stats": {"x": jnp.zeros(2)}})
  with pytest.raises(ModelFormatError, match="metadata is not JSON-able"):
    save_model(tmp_path / "a", model, variables, metadata={"f": object()})
  with pytest.raises(ModelFormatError, match="asset 'tok.json': .* is not a file"):
    save_model(tmp_path / "a", model, variables, assets={"tok.json": tmp_path / "missing"})
  with pytest.raises(ModelFormatError, match="asset name '../x' must be a plain file name"):
    save_model(tmp_path / "a", model, variables, assets={"../x": tmp_path})
  assert not (tmp_path / "a").exists()
  source = tmp_path / "tokenizer.json"
  source.write_text('{"vocab": 8}')
  path = save_model(tmp_path / "a", model, variables, assets={"tokenizer.json": source})
  saved = load_model(path)
  assert saved.assets == {"tokenizer.json": path / "assets" / "tokenizer.json"}
  assert saved.assets["tokenizer.json"].read_text() == '{"vocab": 8}'


def test_load_errors_name_the_problem(tmp_path):
  model, variables, _ = _tiny_lm()
  path = save_model(tmp_path / "m", model, variables)
  with pytest.raises(ModelFormatError, match="is not a folder"):
    load_model(tmp_path / "nowhere")
  with pytest.raises(ModelFormatError, match="has no model.json; it is not a saved model folder"):
    load_model(tmp_path)
  with pytest.raises(
      ModelFormatError, match=r"folder holds a 'lm' model, expected one of \('hybrid',\)"
  ):
    load_model(path, family="hybrid")
  assert load_model(path, family=("decoder", "lm")).family == "lm"

  meta_file = path / "model.json"
  original = meta_file.read_text()
  meta_file.write_text(original.replace('"format_version": 1', '"format_version": 7'))
  with pytest.raises(ModelFormatError, match="format version 7, this nexus_jax reads version 1"):
    load_model(path)
  meta_file.write_text(original.replace('"embed_dim": 16', '"embed_dim": 24'))
  with pytest.raises(ModelFormatError, match="model.json: contents changed after saving"):
    load_model(path)
  integrity.write_manifest(path, format_version=1)  # a consistent folder with a wrong config
  with pytest.raises(
      ModelFormatError,
      match=r"params: \['params'\]\['decoder'\]\['final_norm'\]\['scale'\] is float32\[16\], "
      r"the 'lm' model's config builds float32\[24\]",
  ):
    load_model(path)

  path = save_model(tmp_path / "n", model, variables)
  (path / "extra.bin").write_bytes(b"x")
  with pytest.raises(ModelFormatError, match=r"\['extra.bin'\] were added after saving"):
    load_model(path)
  (path / "extra.bin").unlink()
  data = next(p for p in sorted((path / "params").rglob("*")) if p.is_file() and "/d/" in str(p))
  blob = data.read_bytes()
  data.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
  with pytest.raises(ModelFormatError, match=f"{data.name}: contents changed after saving"):
    load_model(path)
  data.unlink()
  with pytest.raises(ModelFormatError, match="listed in manifest.json are missing"):
    load_model(path)
