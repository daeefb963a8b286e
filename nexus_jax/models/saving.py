"""Save and load any sequence model: its fields as JSON, its variables via Orbax, integrity-checked.

    path = save_model("runs/lm/model", model, {"params": params}, metadata={"bpb": 2.1},
                      assets={"tokenizer.json": "tok.json"})
    saved = load_model("runs/lm/model", family="lm")   # SavedModel(model, variables, ...)
    logits, _ = saved.model.apply(saved.variables, tokens)   # bit-identical to before saving

Families (`FAMILIES`): "encoder", "decoder", "encoder_decoder" (`models/transformer.py`; the
timeseries and seq2seq experiments' models), "lm" (`lm.LanguageModel`), "hybrid"
(`hybrid.HybridLM`), "hybrid_jepa" (`hybrid_jepa.HybridJEPA`, its `lm` field saved as a nested
model) and "jepa_world_model" (`world_model.JEPAWorldModel`). `model_config(model)` is
`{"family", "fields"}` with every dataclass field: numbers, strings, booleans and None as they are,
tuples as JSON lists (tuples again on load), dtypes (`dtype`, `param_dtype`) as their names
("float32", "bfloat16"), a module-valued field as `{"__module__": model_config(field)}`; any other
value is a `ModelFormatError` at save time. `model_from_config` is its inverse.

Folder layout (format version `FORMAT_VERSION`):

    model.json     format version, family, fields, example inputs (the shapes `model.init` is
                   traced with to check the params), metadata, the variables' fingerprint
                   ({"['params']['input_embed']['embedding']": "float32[256,64]", ...}),
                   parameter count, collections and asset names
    params/        Orbax checkpoint of {"params": ..., **other persistent collections}, unboxed
    assets/<name>  files saved with the model (e.g. a tokenizer's JSON)
    manifest.json  sha256 of every other file

Writes are atomic (a temporary sibling folder renamed into place). A target folder must be new,
empty, or (with `overwrite=True`) a saved model holding nothing but its own files; anything else
is refused and left untouched. Decoding state (`cache`) and sown values (`aux_loss`,
`intermediates`) are not saved. `load_model` refuses, with one line naming the problem, a path
that is not a saved model, another format version, a family not in `family=`, a file changed,
missing or added after saving, and variables whose paths / shapes / dtypes differ from what the
config builds (checked with `jax.eval_shape(model.init, ...)`, nothing allocated). No pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.models.hybrid import HybridLM
from nexus_jax.models.hybrid_jepa import HybridJEPA
from nexus_jax.models.lm import LanguageModel
from nexus_jax.models.transformer import Decoder, Encoder, EncoderDecoder
from nexus_jax.models.world_model import JEPAWorldModel
from nexus_jax.train import integrity
from nexus_jax.train.checkpoint import fingerprint

FORMAT_VERSION = 1
MODEL_FILE, PARAMS_DIR, ASSETS_DIR = "model.json", "params", "assets"
DTYPE_FIELDS = ("dtype", "param_dtype")
NOT_SAVED = ("cache", "aux_loss", "intermediates")  # decoding state and sown values
EXAMPLE_LENGTH = 8  # sequence length of the example inputs (shorter when max_len is smaller)

FAMILIES: dict[str, type[nn.Module]] = {
    "encoder": Encoder,
    "decoder": Decoder,
    "encoder_decoder": EncoderDecoder,
    "lm": LanguageModel,
    "hybrid": HybridLM,
    "hybrid_jepa": HybridJEPA,
    "jepa_world_model": JEPAWorldModel,
}


class ModelFormatError(ValueError):
  """A model cannot be saved, or a folder cannot be loaded as one (message names the culprit)."""


@dataclasses.dataclass(frozen=True)
class SavedModel:
  """What `load_model` returns: `model.apply(variables, ...)` reproduces the saved model."""

  model: nn.Module
  variables: dict
  metadata: dict
  family: str
  assets: dict[str, pathlib.Path]  # name -> file inside the folder
  path: pathlib.Path


# ----- config <-> JSON -----


def _family_of(model: nn.Module) -> str:
  for name, cls in FAMILIES.items():
    if type(model) is cls:
      return name
  raise ModelFormatError(
      f"{type(model).__name__} is not a saveable model family; known: "
      f"{', '.join(f'{n} ({c.__name__})' for n, c in FAMILIES.items())}"
  )


def _fields(cls_or_model) -> list[str]:
  return [
      f.name
      for f in dataclasses.fields(cls_or_model)
      if f.init and f.name not in ("parent", "name")
  ]


def _encode(value: Any, where: str) -> Any:
  if isinstance(value, nn.Module):
    return {"__module__": model_config(value)}
  if isinstance(value, np.generic):
    value = value.item()
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ModelFormatError(f"{where} = {value!r} is not JSON-able (not a finite number)")
    return value
  if isinstance(value, (tuple, list)):
    return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
  raise ModelFormatError(
      f"{where} = {value!r} ({type(value).__name__}) is not JSON-able; fields may hold numbers, "
      "strings, booleans, None, tuples, dtypes and models"
  )


def _encode_dtype(value: Any, where: str) -> str | None:
  if value is None:
    return None
  try:
    return np.dtype(value).name
  except TypeError:
    raise ModelFormatError(f"{where} = {value!r} is not a dtype") from None


def _decode_dtype(value: Any, where: str) -> Any:
  if value is None:
    return None
  try:
    name = np.dtype(jnp.dtype(value)).name
  except TypeError:
    raise ModelFormatError(f"{where} = {value!r} is not a dtype name") from None
  return getattr(jnp, name, jnp.dtype(name))  # the scalar type (jnp.float32), as in the defaults


def _decode(value: Any, where: str) -> Any:
  if isinstance(value, list):
    return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(value))
  if isinstance(value, dict):
    if set(value) != {"__module__"}:
      raise ModelFormatError(f"{where}: a dict field must be {{'__module__': config}}")
    return model_from_config(value["__module__"])
  return value


def model_config(model: nn.Module) -> dict:
  """`{"family": name, "fields": {field: JSON value}}` of a model (module docstring)."""
  family = _family_of(model)
  fields = {}
  for name in _fields(model):
    where = f"{family}.{name}"
    value = getattr(model, name)
    fields[name] = _encode_dtype(value, where) if name in DTYPE_FIELDS else _encode(value, where)
  return {"family": family, "fields": fields}


def model_from_config(config: dict) -> nn.Module:
  """The model `config` (from `model_config`) describes; ModelFormatError names an unknown
  family or field. Fields missing from `config` take their defaults."""
  if not isinstance(config, Mapping) or not isinstance(config.get("fields"), Mapping):
    raise ModelFormatError(
        f"a model config is {{'family': ..., 'fields': {{...}}}}; got {config!r}"
    )
  family = config.get("family")
  if family not in FAMILIES:
    raise ModelFormatError(f"unknown model family {family!r}; known: {tuple(FAMILIES)}")
  cls = FAMILIES[family]
  known = _fields(cls)
  kwargs = {}
  for name, value in config["fields"].items():
    if name not in known:
      raise ModelFormatError(f"model family {family!r} ({cls.__name__}) has no field {name!r}")
    where = f"{family}.{name}"
    kwargs[name] = _decode_dtype(value, where) if name in DTYPE_FIELDS else _decode(value, where)
  return cls(**kwargs)


# ----- example inputs: the shapes `model.init` is traced with -----


def _spec(shape, dtype) -> dict:
  return {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).name}


def _leaf(tree: Any, *keys: str) -> Any | None:
  """The first leaf whose path contains `keys` in order (None if there is none)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [getattr(p, "key", None) for p in path]
    it = iter(names)
    if all(k in it for k in keys):
      return leaf
  return None


def _sequence(vocab: int, length: int, params: Any, *proj_path: str) -> dict:
  """Token ids `int32[1, T]`, or features `float32[1, T, F]` with F from the input projection."""
  if vocab > 0:
    return _spec((1, length), np.int32)
  kernel = _leaf(params, *proj_path, "kernel")
  if kernel is None:
    raise ModelFormatError(f"feature-input model: params lack {'/'.join(proj_path)}/kernel")
  return _spec((1, length, kernel.shape[0]), np.float32)


def _example_inputs(model: nn.Module, params: Any) -> dict:
  """`{"args": [spec | None, ...], "kwargs": {name: spec}}` for `model.init` (batch 1)."""
  length = EXAMPLE_LENGTH
  if getattr(model, "max_len", 0):
    length = min(length, model.max_len)
  kwargs = {}
  if getattr(model, "adaptive_norm", False):
    kwargs["condition"] = _spec((1, model.condition_dim), np.float32)
  if isinstance(model, EncoderDecoder):
    src_vocab = model.vocab_size if model.source_vocab_size is None else model.source_vocab_size
    args = [
        _sequence(src_vocab, length, params, "encoder", "input_proj"),
        _sequence(model.vocab_size, length, params, "decoder", "input_proj"),
    ]
  elif isinstance(model, (Encoder, Decoder)):
    args = [_sequence(model.vocab_size, length, params, "input_proj")]
    if isinstance(model, Decoder) and model.cross_attention:
      key = _leaf(params, "cross_attention", "key", "kernel")  # [(L,) E_ctx, K, D]
      args.append(_spec((1, length, key.shape[-3]), np.float32))
  elif isinstance(model, HybridLM):
    args = [_spec((1, length), np.int32)]
  elif isinstance(model, HybridJEPA):
    args = [_spec((1, max(length, model.horizon + 1)), np.int32)]
  elif isinstance(model, JEPAWorldModel):
    vocab = 0 if model.vocab_size is None else model.vocab_size
    args = [_sequence(vocab, length, params, "encoder", "embed"), _spec((1, length), np.bool_)]
    actions = _leaf(params, "predictor", "actions", "kernel")
    if actions is not None:
      args.append(_spec((1, length, actions.shape[0]), np.float32))
  else:  # FAMILIES and this function cover the same classes
    raise ModelFormatError(f"no example inputs for {type(model).__name__}")
  return {"args": args, "kwargs": kwargs}


def _abstract(spec: dict | None) -> jax.ShapeDtypeStruct | None:
  return None if spec is None else jax.ShapeDtypeStruct(tuple(spec["shape"]), spec["dtype"])


def _expected_variables(model: nn.Module, example: dict) -> dict:
  """Abstract persistent variables `model.init` creates on the example inputs."""
  args = [_abstract(s) for s in example["args"]]
  kwargs = {k: _abstract(s) for k, s in example["kwargs"].items()}
  init = lambda a, k: model.init(jax.random.PRNGKey(0), *a, **k)
  shapes = nn.unbox(jax.eval_shape(init, args, kwargs))
  return {c: v for c, v in shapes.items() if c not in NOT_SAVED}


def _check_variables(variables: dict, expected: dict, family: str, where: str) -> None:
  """Raises ModelFormatError naming the first collection / path whose shape or dtype differs."""
  for c in sorted(set(expected) | set(variables)):
    if c not in variables:
      raise ModelFormatError(f"{where}: collection {c!r} is missing (the {family!r} model has it)")
    if c not in expected:
      raise ModelFormatError(f"{where}: collection {c!r} is not one the {family!r} model creates")
  have, want = fingerprint(variables), fingerprint(expected)
  for path in sorted(set(have) | set(want)):
    if path not in have:
      raise ModelFormatError(f"{where}: {path} ({want[path]}) is missing; the config builds it")
    if path not in want:
      raise ModelFormatError(f"{where}: {path} ({have[path]}) is not in the {family!r} model")
    if have[path] != want[path]:
      raise ModelFormatError(
          f"{where}: {path} is {have[path]}, the {family!r} model's config builds {want[path]}"
      )


# ----- save -----


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"{type(x).__name__} is not JSON-able")


def _is_saved_model(path: pathlib.Path) -> bool:
  """Whether `path` holds a saved model and nothing else (every file listed in its manifest)."""
  try:
    meta = json.loads((path / MODEL_FILE).read_text())
  except (OSError, ValueError):
    return False
  return (
      isinstance(meta, dict)
      and {"format_version", "family"} <= set(meta)
      and integrity.listed_files_match(path)
  )


def _check_target(path: pathlib.Path, overwrite: bool) -> None:
  if path.exists() and not path.is_dir():
    raise ModelFormatError(f"{path} is a file, not a folder; choose a new folder for the model")
  cwd = pathlib.Path.cwd().absolute()
  if path == cwd or path in cwd.parents:
    raise ModelFormatError(f"{path} is the working directory (or holds it); choose a new folder")
  if not path.is_dir() or not any(path.iterdir()):
    return
  if not _is_saved_model(path):
    raise ModelFormatError(
        f"{path} is not empty and does not hold a saved model; it was left untouched. "
        "Choose a new or empty folder."
    )
  if not overwrite:
    raise ModelFormatError(f"{path} already holds a saved model; pass overwrite=True to replace it")


def _check_assets(assets: Mapping[str, Any]) -> dict[str, pathlib.Path]:
  out = {}
  for name, source in assets.items():
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
      raise ModelFormatError(f"asset name {name!r} must be a plain file name")
    source = pathlib.Path(source)
    if not source.is_file():
      raise ModelFormatError(f"asset {name!r}: {source} is not a file")
    out[name] = source
  return out


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    variables: dict,
    *,
    metadata: dict | None = None,
    assets: dict[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `model` (its fields) and `variables` (`{"params": ..., **collections}`) to a folder.

  `metadata` (JSON-able) is stored in model.json; `assets` ({name: file}) are copied to
  `assets/<name>`. The variables are checked against what the model's `init` builds before
  anything is written. Returns the folder's absolute path. Raises ModelFormatError for a
  non-JSON-able field / metadata, variables that do not fit the model, a missing asset file, or
  a target folder that may not be written (module docstring).
  """
  path = pathlib.Path(directory).absolute()
  config = model_config(model)
  family = config["family"]
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ModelFormatError("variables must be a dict with a 'params' collection")
  tree = {c: v for c, v in nn.unbox(dict(variables)).items() if c not in NOT_SAVED}
  tree = jax.tree.map(np.asarray, jax.device_get(tree))
  example = _example_inputs(model, tree["params"])
  _check_variables(tree, _expected_variables(model, example), family, "variables")
  try:
    metadata_json = json.loads(json.dumps(metadata or {}, allow_nan=False, default=_json_default))
  except (TypeError, ValueError) as err:
    raise ModelFormatError(f"metadata is not JSON-able: {err}") from None
  asset_files = _check_assets(assets or {})
  _check_target(path, overwrite)
  meta = {
      "format_version": FORMAT_VERSION,
      **config,
      "example_inputs": example,
      "metadata": metadata_json,
      "collections": sorted(tree),
      "param_count": int(sum(x.size for x in jax.tree.leaves(tree["params"]))),
      "fingerprint": fingerprint(tree),
      "assets": sorted(asset_files),
      "versions": {"jax": jax.__version__, "flax": _flax_version()},
  }
  with integrity.atomic_folder(path) as tmp:
    integrity.save_tree(tmp / PARAMS_DIR, tree)
    if asset_files:
      (tmp / ASSETS_DIR).mkdir()
      for name, source in asset_files.items():
        shutil.copyfile(source, tmp / ASSETS_DIR / name)
    (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=1))
    integrity.write_manifest(tmp, format_version=FORMAT_VERSION)
  return path


def _flax_version() -> str:
  import flax

  return flax.__version__


# ----- load -----


def load_model(
    directory: str | os.PathLike, *, family: str | tuple[str, ...] | None = None
) -> SavedModel:
  """Verifies and loads a folder written by `save_model` (optionally only of the given families).

  The variables come back as jax arrays with the saved dtypes, ready for `model.apply`.
  """
  path = pathlib.Path(directory).absolute()
  if not path.is_dir():
    raise ModelFormatError(f"{path} is not a folder (a saved model is a folder with {MODEL_FILE})")
  if not (path / MODEL_FILE).is_file():
    raise ModelFormatError(f"{path} has no {MODEL_FILE}; it is not a saved model folder")
  try:
    meta = json.loads((path / MODEL_FILE).read_text())
    version = meta["format_version"]
  except (ValueError, KeyError, TypeError) as err:
    raise ModelFormatError(f"{path / MODEL_FILE}: unreadable ({err})") from None
  if version != FORMAT_VERSION or isinstance(version, bool):
    newer = isinstance(version, int) and version > FORMAT_VERSION
    raise ModelFormatError(
        f"{path / MODEL_FILE}: saved-model format version {version!r}, this nexus_jax reads "
        f"version {FORMAT_VERSION}; "
        + ("upgrade nexus_jax to load it" if newer else "re-save the model with this version")
    )
  saved_family = meta.get("family")
  if family is not None:
    allowed = (family,) if isinstance(family, str) else tuple(family)
    if saved_family not in allowed:
      raise ModelFormatError(
          f"{path}: folder holds a {saved_family!r} model, expected one of {allowed}"
      )
  integrity.verify_manifest(path, ModelFormatError, "saved model")
  model = model_from_config({"family": saved_family, "fields": meta.get("fields")})
  tree = integrity.restore_tree(path / PARAMS_DIR)
  try:
    expected = _expected_variables(model, meta["example_inputs"])
  except (ValueError, TypeError, KeyError) as err:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise ModelFormatError(f"{path / MODEL_FILE}: the config does not build a model ({first})")
  _check_variables(tree, expected, saved_family, f"{path / PARAMS_DIR}")
  variables = jax.tree.map(jnp.asarray, tree)
  assets = {name: path / ASSETS_DIR / name for name in meta.get("assets", [])}
  return SavedModel(
      model=model,
      variables=variables,
      metadata=meta.get("metadata", {}),
      family=saved_family,
      assets=assets,
      path=path,
  )
