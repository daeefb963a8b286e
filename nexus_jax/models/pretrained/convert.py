"""Load HF Llama / Mistral / Mixtral safetensors into a `LanguageModel`, and export back.

    model, params, report = load_pretrained("path/to/Mixtral-8x7B", mesh=mesh)
    logits, _ = model.apply({"params": params}, tokens)          # tokens [B, T] -> [B, T, V]
    import_hf("path/to/Mixtral-8x7B", "runs/mixtral/model")      # our saved-model folder
    export_safetensors(model, params, "out/hf")                  # HF naming + config.json

The tokenizer must be the one the weights were trained with: we do not convert tokenizers, and
token ids go in as they are (`nexus-lm generate` / `chat` on an imported folder need a tokenizer
with exactly `vocab_size` tokens; the byte-level fallback fits only a 256-token vocabulary).

Loading streams: each of our params is built by `jax.make_array_from_callback`, whose callback
reads (memory-mapped) only the HF tensors of the layers / experts in the device shard it is asked
for, and casts them to the param dtype. With a `mesh`, every param gets the `NamedSharding` its
logical axis names map to under `rules` (default `train.sharding.DEFAULT_LOGICAL_AXIS_RULES`),
as in training; without one, params go to the first device. `strict=True` raises ValueError
naming every missing, extra or mis-shaped key (expected vs got shape); `strict=False` initialises
the params it could not fill (seeded) and reports them (`LoadReport`).
Export gathers one param at a time to the host, writes the inverse transforms (bit-exact: only
transposes and reshapes) into shards, and replaces an existing folder only if it is an export of
ours (`overwrite=True`); the write is atomic (a temporary sibling folder renamed into place).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from nexus_jax.models.pretrained import hf_config, key_map
from nexus_jax.models.pretrained.key_map import TRANSPOSE, Leaf, Part
from nexus_jax.models.pretrained.safetensors_io import CheckpointReader, is_our_export, write_shards
from nexus_jax.models.transformer import Decoder
from nexus_jax.train import integrity
from nexus_jax.train import sharding as sharding_lib

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did: HF keys loaded, HF keys left unloaded (key -> why), our params
  initialised instead of loaded (path -> why; only with strict=False), and adaptations made."""

  loaded: list[str]
  unloaded: dict[str, str]
  missing: dict[str, str]
  notes: list[str]

  def summary(self) -> dict:
    return {
        "loaded": len(self.loaded),
        "unloaded": self.unloaded,
        "initialised": self.missing,
        "notes": self.notes,
    }


def abstract_params(model: Decoder) -> Any:
  """Boxed abstract params of `model` (`jax.eval_shape` of init; nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, min(8, model.max_len or 8)), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def _flat_shapes(abstract: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = traverse_util.flatten_dict(sharding_lib.strip_boxes(abstract))
  return {k: tuple(v.shape) for k, v in flat.items()}


def _hf_shape(part: Part, leaf: Leaf) -> tuple[int, ...]:
  block = jax.ShapeDtypeStruct(leaf.shape[len(part.index) :], jnp.float32)
  return tuple(jax.eval_shape(part.transform.to_hf, block).shape)


def _resolve(leaves: list[Leaf], keys: set[str], tied: bool) -> list[Leaf]:
  """A tied checkpoint without `lm_head.weight` gets the embedding (transposed) as the head."""
  if HEAD in keys or not tied:
    return leaves
  fix = lambda p: Part(p.index, EMBED, TRANSPOSE) if p.hf == HEAD else p
  return [Leaf(l.path, l.shape, tuple(fix(p) for p in l.parts)) for l in leaves]


def _check(leaves: list[Leaf], reader: CheckpointReader) -> tuple[dict, dict]:
  """`(problems: our leaf -> [message], extra HF keys -> reason)`."""
  keys, used = set(reader.keys()), set()
  problems: dict[tuple[str, ...], list[str]] = {}
  for leaf in leaves:
    for part in leaf.parts:
      want, where = _hf_shape(part, leaf), f"{leaf.name}{list(part.index) or ''}"
      if part.hf not in keys:
        problems.setdefault(leaf.path, []).append(
            f"missing key {part.hf} (shape {want}, for our {where})"
        )
        continue
      used.add(part.hf)
      got = reader.shape(part.hf)
      if got != want:
        problems.setdefault(leaf.path, []).append(
            f"key {part.hf} has shape {got}, expected {want} (for our {where})"
        )
  extra = {k: "not a tensor of this model" for k in sorted(keys - used)}
  return problems, extra


def _fail(problems: dict, extra: dict, source: Any) -> None:
  lines = [m for ms in problems.values() for m in ms] + [f"extra key {k}" for k in extra]
  shown = "; ".join(lines[:8]) + (f"; ... ({len(lines) - 8} more)" if len(lines) > 8 else "")
  raise ValueError(
      f"{source}: checkpoint does not match the model: {shown}. Pass strict=False to load the "
      "rest and initialise what is missing."
  )


def _leaf_array(leaf: Leaf, reader: CheckpointReader, sharding: Any, dtype: Any) -> jax.Array:
  """`leaf` as a jax array with `sharding`; each device shard reads only its layers / experts."""
  lead = len(leaf.parts[0].index)
  by_index = {p.index: p for p in leaf.parts}
  block_shape = leaf.shape[lead:]

  def read(part: Part) -> np.ndarray:
    return part.transform.to_ours(reader.get(part.hf), block_shape)

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
    ranges = [range(*s.indices(n)) for s, n in zip(index[:lead], leaf.shape[:lead])]
    rest = index[lead:]
    if not ranges:
      return np.asarray(read(leaf.parts[0])[rest], dtype)
    out = None
    for pos in itertools.product(*ranges):
      block = np.asarray(read(by_index[pos])[rest], dtype)
      if out is None:
        out = np.empty(tuple(len(r) for r in ranges) + block.shape, dtype)
      out[tuple(i - r.start for i, r in zip(pos, ranges))] = block
    return out

  return jax.make_array_from_callback(leaf.shape, sharding, callback)


def load_pretrained(
    source: str | os.PathLike,
    model: Decoder | None = None,
    *,
    mesh: Mesh | None = None,
    rules: Any = None,
    dtype: Any = None,
    strict: bool = True,
    seed: int = 0,
) -> tuple[Decoder, dict, LoadReport]:
  """`(model, params, report)` from an HF checkpoint folder (config.json + safetensors).

  `model`: None builds it from config.json (`read_hf_config`); a given model (e.g. with
  `scan_layers=False` or another attention backend) must compute the same function (same sizes,
  norm epsilon, RoPE theta, routing). `dtype`: the param dtype (default: the model's; float32
  for a model read from config.json). `mesh` / `rules`: see the module docstring. `seed`: init of
  the params that `strict=False` could not load. Params are unboxed `{"params"}` contents.
  """
  source = pathlib.Path(source)
  configured, notes = hf_config.model_and_notes(source, dtype or jnp.float32)
  if model is None:
    model = configured
  else:
    model = model.clone(param_dtype=dtype) if dtype is not None else model
    hf_config.check_same_function(model, configured)
  hf_config.check_convertible(model)
  cfg = hf_config.load_config_json(source)
  reader = CheckpointReader(source)
  abstract = abstract_params(model)
  shapes = _flat_shapes(abstract)
  leaves = key_map.plan(model, shapes)
  leaves = _resolve(leaves, set(reader.keys()), bool(cfg.get("tie_word_embeddings", False)))
  problems, extra = _check(leaves, reader)
  if strict and (problems or extra):
    _fail(problems, extra, source)

  if mesh is not None:
    rules = sharding_lib.logical_axis_rules(rules)
    shardings = traverse_util.flatten_dict(sharding_lib.logical_shardings(abstract, mesh, rules))
  else:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = {path: device for path in shapes}
  param_dtype = model.param_dtype
  flat, loaded, unloaded = {}, [], dict(extra)
  for leaf in leaves:
    if leaf.path in problems:
      for part in leaf.parts:
        if part.hf in reader.file_of and part.hf not in unloaded:
          unloaded[part.hf] = f"our {leaf.name} could not be completed: {problems[leaf.path][0]}"
      continue
    flat[leaf.path] = _leaf_array(leaf, reader, shardings[leaf.path], param_dtype)
    loaded.extend(p.hf for p in leaf.parts)
  missing = {"/".join(p): ms[0] for p, ms in problems.items()}
  if problems:
    flat.update(_init_leaves(model, sorted(problems), shardings, seed))
  params = traverse_util.unflatten_dict(flat)
  return model, params, LoadReport(sorted(set(loaded)), unloaded, missing, notes)


def _init_leaves(model: Decoder, paths: list, shardings: dict, seed: int) -> dict:
  """Freshly initialised params at `paths` (only those are kept; XLA drops the rest)."""
  tokens = jnp.zeros((1, min(8, model.max_len or 8)), jnp.int32)

  def init():
    params = traverse_util.flatten_dict(nn.unbox(model.init(jax.random.PRNGKey(seed), tokens)))
    return {p: params[("params",) + p] for p in paths}

  return jax.jit(init, out_shardings={p: shardings[p] for p in paths})()


def _check_target(path: pathlib.Path, overwrite: bool) -> None:
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path} is a file; give a new folder for the export")
  cwd = pathlib.Path.cwd().absolute()
  if path == cwd or path in cwd.parents:
    raise ValueError(f"{path} is the working directory (or holds it); give a new folder")
  if path.is_dir() and any(path.iterdir()):
    if not is_our_export(path):
      raise ValueError(
          f"{path} is not empty and does not hold an export of ours; it was left untouched. "
          "Give a new or empty folder."
      )
    if not overwrite:
      raise ValueError(f"{path} already holds an export; pass overwrite=True to replace it")


def export_safetensors(
    model: Decoder,
    params: Any,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int | None = 4 << 30,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `params` of `model` as an HF Llama (dense) / Mixtral (experts) checkpoint folder:
  config.json and safetensors shards (+ index when more than one) in the params' dtype. Raises
  ValueError for a model HF cannot express (naming the fields), params that do not fit the
  model (naming the path) or a folder that may not be written. Returns the folder's path."""
  path = pathlib.Path(directory).absolute()
  hf_config.check_convertible(model)
  params = nn.unbox(dict(params))
  if set(params) == {"params"}:  # a variables dict
    params = params["params"]
  flat = traverse_util.flatten_dict(params)
  want = _flat_shapes(abstract_params(model))
  for p in sorted(set(want) | set(flat)):
    name = "/".join(p)
    if p not in flat:
      raise ValueError(f"params lack {name} {want[p]}, which the model has")
    if p not in want:
      raise ValueError(f"params have {name}, which the model does not")
    if tuple(flat[p].shape) != want[p]:
      raise ValueError(f"params {name} is {tuple(flat[p].shape)}, the model builds {want[p]}")
  dtypes = {jnp.dtype(v.dtype).name for v in flat.values()}
  leaves = key_map.plan(model, want)
  _check_target(path, overwrite)

  def tensors():
    for leaf in leaves:
      x = np.asarray(jax.device_get(flat[leaf.path]))
      for part in leaf.parts:
        yield part.hf, part.transform.to_hf(x[part.index])

  config = hf_config.hf_config_of(model, dtypes.pop() if len(dtypes) == 1 else "float32")
  with integrity.atomic_folder(path) as tmp:
    write_shards(tmp, tensors(), max_shard_bytes)
    (tmp / hf_config.CONFIG_FILE).write_text(json.dumps(config, indent=2))
  return path


def import_hf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: Any = None,
    strict: bool = True,
    overwrite: bool = False,
) -> tuple[pathlib.Path, LoadReport]:
  """Loads `source` (`load_pretrained`) and writes it as our saved-model folder (`save_model`:
  config JSON + Orbax params), which `nexus-lm generate` / `chat` and the lm experiment's
  `train.init_from` read. Returns `(folder, report)`; the report is also in the metadata."""
  from nexus_jax.models.saving import save_model  # saving imports every model family

  model, params, report = load_pretrained(source, dtype=dtype, strict=strict)
  metadata = {
      "imported_from": str(pathlib.Path(source).absolute()),
      "hf_config": hf_config.load_config_json(source),
      "import": report.summary(),
      "tokenizer": "not converted: use the tokenizer these weights were trained with",
  }
  path = save_model(out, model, {"params": params}, metadata=metadata, overwrite=overwrite)
  return path, report
