"""Device mesh and shardings derived from logical axis names.

Layers name the axes of every parameter with `nn.with_logical_partitioning` (logical names
`batch, length, embed, heads, kv, mlp, vocab, expert, table, feature`). The config maps those
names to the mesh axes `data, fsdp, tensor, expert`; this module turns the mapping into
`NamedSharding`s for params, optimizer state and batches; `train.loop.fit` traces the model under
the mesh and the rules, so every activation `nn.with_logical_constraint` in the layers is live.
The same code runs on 1 CPU, 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), a GPU or a TPU slice
(tests/train/test_sharded_training.py trains the LMs on such meshes).

A param dimension that its mesh axes do not divide is an error naming the param, the dimension,
its logical name and the axis (never a silent replication); a mesh axis of size 1 divides every
dimension, so one device or a pure data-parallel mesh never fails.

We build meshes with `AxisType.Auto` on purpose: `jax.make_mesh` defaults to Explicit axes in
current jax, which would make sharding part of every array's type; our layers are written for
GSPMD-style propagation from annotated params and `nn.with_logical_constraint`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("kv", None),
    ("length", None),
    ("table", None),
    ("feature", None),
    ("ensemble", None),  # the member axis of a batched ensemble (models/tabular/ensemble.py)
)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor, expert); at most one may be -1 and takes the remaining devices."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {unknown}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f"config.mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}."
    )
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
          f"which does not divide the {num_devices} available devices."
      )
    sizes[MESH_AXES.index(unknown[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available ({jax.devices()[0].platform}); set one axis to -1 or "
        f"match the device count."
    )
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` with axes `MESH_AXES` (Auto axis types) over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def logical_axis_rules(rules: Any | None) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (lists from ConfigDict) to a tuple of (name, axes) pairs."""
  if rules is None:
    return DEFAULT_LOGICAL_AXIS_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(
          f"config.sharding.logical_axis_rules: each rule is (logical, mesh_axes), got {rule!r}."
      )
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, list) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(
            f"config.sharding.logical_axis_rules: {name!r} maps to unknown mesh axis "
            f"{axis!r}; mesh axes are {MESH_AXES}."
        )
    out.append((name, axes))
  return tuple(out)


def strip_boxes(tree: Any) -> Any:
  """Replaces `nn.Partitioned` boxes by their values without adding sharding constraints."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
      tree,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )


def _axis_names(axes) -> tuple[str, ...]:
  return axes if isinstance(axes, tuple) else (axes,) if axes else ()


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those dims are replicated instead).

  Only for leaves derived from params (8-bit optimizer moments' per-block scales): a param
  itself must divide (`divisibility_problems`)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for size, axes in zip(shape, dims):
    n = math.prod(mesh.shape[a] for a in _axis_names(axes))
    fitted.append(axes if n > 1 and size % n == 0 else None)
  return P(*fitted)


def divisibility_problems(
    name: str, shape: tuple[int, ...], logical: Any, spec: P, mesh: Mesh
) -> tuple[P, list[str]]:
  """`(spec, problems)` for an array `name` of `shape`: `spec` with size-1 mesh axes written as
  replicated, and one line per dimension that its mesh axes do not divide.

  A mesh axis of size 1 divides everything, so a problem only arises where the mesh really
  shards that dimension (e.g. a vocabulary of 257 with `vocab -> tensor` on a tensor axis of 2).
  """
  dims = list(spec) + [None] * (len(shape) - len(spec))
  names = list(logical or ()) + [None] * (len(shape) - len(logical or ()))
  fitted, problems = [], []
  for i, (size, axes, logical_name) in enumerate(zip(shape, dims, names)):
    n = math.prod(mesh.shape[a] for a in _axis_names(axes))
    fitted.append(axes if n > 1 else None)
    if n > 1 and size % n:
      sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in _axis_names(axes))
      problems.append(
          f"{name}: dimension {i} (size {size}, logical axis {logical_name!r}) of shape "
          f"{tuple(shape)} is not divisible by mesh axis {axes!r} ({sizes} = {n} shards)"
      )
  return P(*fitted), problems


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

  Args:
    abstract_boxed: output of `jax.eval_shape(model.init, ...)` (boxed leaves carry names).
  Returns:
    A tree with the structure of `nn.unbox(abstract_boxed)` holding `NamedSharding`s.
  Raises:
    ValueError naming every param, dimension and mesh axis where a mesh axis that the rules
    map a dimension to does not divide it (`divisibility_problems`), and the fixes.
  """
  logical_specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  abstract = strip_boxes(abstract_boxed)
  is_spec = lambda x: isinstance(x, P)
  flat_logical = jax.tree.leaves(logical_specs, is_leaf=is_spec)
  flat_mesh, treedef = jax.tree.flatten(mesh_specs, is_leaf=is_spec)
  paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
  if not len(paths) == len(flat_logical) == len(flat_mesh):
    raise ValueError(f"{len(paths)} arrays but {len(flat_mesh)} partition specs.")
  shardings, problems = [], []
  for (path, a), logical, spec in zip(paths, flat_logical, flat_mesh):
    fitted, bad = divisibility_problems(_path_name(path), a.shape, logical, spec, mesh)
    shardings.append(NamedSharding(mesh, fitted))
    problems += bad
  if problems:
    raise ValueError(
        "the mesh cannot shard these dimensions evenly:\n  "
        + "\n  ".join(problems)
        + "\nMake each such dimension a multiple of its number of shards (e.g. pad the "
        "vocabulary), or map its logical axis to None (replicated) or to another mesh axis in "
        "config.sharding.logical_axis_rules, or shrink that mesh axis in config.mesh."
    )
  return jax.tree.unflatten(treedef, shardings)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def optimizer_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """Shardings of `tx.init(params)`: state leaves follow their params, counters are replicated.

  A state leaf belongs to the param whose dict-key path ends its own dict-key path (e.g.
  `mu/dense/kernel`, or `inner_states/8bit/.../mu/dense/kernel/codes` for 8-bit moments). A leaf
  of the param's shape takes the param's sharding; one with the param's leading dims (the 8-bit
  moments' per-block absmax `[..., blocks]`) takes it on those dims (and on the last one when it
  is the param's own last axis, where it divides).
  Everything else (step counters, schedules) is replicated.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  by_path = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    by_path[_dict_keys(path)] = leaf.shape
  shardings = dict(
      (_dict_keys(path), s)
      for path, s in jax.tree_util.tree_flatten_with_path(
          param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
      )[0]
  )

  def sharding_of(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      param = keys[start:]
      if param in by_path:
        shape, spec = by_path[param], shardings[param].spec
        if tuple(leaf.shape) == tuple(shape):
          return shardings[param]
        n = len(leaf.shape)
        if 0 < n <= len(shape) and tuple(leaf.shape[:-1]) == tuple(shape[: n - 1]):
          dims = list(spec) + [None] * (len(shape) - len(spec))
          last = dims[n - 1] if n == len(shape) else None  # merged trailing axes: replicated
          return NamedSharding(mesh, _fit_spec(P(*dims[: n - 1], last), leaf.shape, mesh))
        break
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt)


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data` x `fsdp`; other dims replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def batch_divisor(mesh: Mesh) -> int:
  """Batch sizes must be a multiple of this (devices along data x fsdp)."""
  return int(np.prod([mesh.shape["data"], mesh.shape["fsdp"]]))
