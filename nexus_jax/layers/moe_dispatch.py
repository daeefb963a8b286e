"""Token dispatch for Mixture-of-Experts, as pure functions.

Two ways to get tokens to experts:

- Capacity (GShard / Switch): each expert takes at most C tokens per group; assignments are
  ranked first-choice-first (all tokens' 1st choice, then all 2nd choices, ...) and in token
  order within a choice, and those ranked beyond C are dropped. Dispatch and combine are dense
  one-hot tensors `[G, N, E, C]` used in einsums: static shapes, shard cleanly on the expert axis.
- Dropless (MegaBlocks-style): the N*K assignments are sorted by expert and every expert runs on
  exactly its tokens with a grouped matmul. `grouped_matmul` uses `jax.lax.ragged_dot` on
  GPU/TPU. XLA:CPU lowers ragged_dot to a dense masked product (E times the FLOPs), so on CPU
  `impl="auto"` uses a tiled equivalent: rows are padded per group to whole tiles and a scan
  multiplies each tile by its group's weight, with an explicit backward (`custom_vjp`).

Shape names: G groups, N tokens per group, K experts per token (top-k), E experts, C capacity,
M rows (sorted assignments), D model dim, F expert hidden dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

GMM_IMPLS = ("auto", "ragged_dot", "tiled")


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per group: `ceil(capacity_factor * tokens * top_k / num_experts)`."""
  if capacity_factor <= 0:
    raise ValueError(
        f"capacity_factor must be > 0 (or None for dropless); got " f"{capacity_factor}."
    )
  return max(1, min(tokens * top_k, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def capacity_masks(expert_idx_GNK, weights_GNK, num_experts: int, capacity: int, valid_GN=None):
  """One-hot dispatch/combine tensors for capacity-limited routing.

  Returns:
    dispatch `[G, N, E, C]` bool (token n occupies slot c of expert e),
    combine `[G, N, E, C]` float32 (the routing weight in that slot),
    kept `[G, N, K]` bool (assignment survived the capacity limit).
  """
  g, n, k = expert_idx_GNK.shape
  onehot = jax.nn.one_hot(expert_idx_GNK, num_experts, dtype=jnp.int32)  # [G, N, K, E]
  if valid_GN is not None:
    onehot = onehot * valid_GN[:, :, None, None].astype(jnp.int32)
  # Rank assignments choice-major, then token order: cumulative count per expert.
  ranked = jnp.swapaxes(onehot, 1, 2).reshape(g, k * n, num_experts)
  position = (jnp.cumsum(ranked, axis=1) - 1).reshape(g, k, n, num_experts)
  position = jnp.swapaxes(position, 1, 2)  # [G, N, K, E]
  keep = (onehot > 0) & (position < capacity)
  slot = jnp.sum(jnp.where(keep, position, 0), axis=-1)  # [G, N, K]
  kept = jnp.any(keep, axis=-1)
  slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
  expert_onehot = keep.astype(jnp.float32)  # [G, N, K, E]
  dispatch = jnp.einsum("gnke,gnkc->gnec", expert_onehot, slot_onehot) > 0
  combine = jnp.einsum(
      "gnke,gnkc,gnk->gnec", expert_onehot, slot_onehot, weights_GNK.astype(jnp.float32)
  )
  return dispatch, combine, kept


def sort_assignments(expert_idx_NK, num_experts: int, valid=None):
  """Orders the N*K assignments by expert.

  `valid` is None, a token mask `[N]` or an assignment mask `[N, K]`. Returns `order [N*K]`
  (assignment indices, expert-major; invalid ones last) and `group_sizes [E]` int32 (valid
  assignments per expert).
  """
  flat = expert_idx_NK.reshape(-1)
  if valid is not None:
    if valid.ndim == 1:
      valid = jnp.repeat(valid, expert_idx_NK.shape[1])
    flat = jnp.where(valid.reshape(-1), flat, num_experts)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return order, group_sizes


def _tile_layout(group_sizes_E, rows: int, tile: int):
  """Where each sorted row goes once every group is padded to whole tiles.

  Returns `dest [M]` (padded row index; out of range for rows past sum(group_sizes)),
  `tile_group [num_tiles]` and the static `num_tiles`.
  """
  num_groups = group_sizes_E.shape[0]
  num_tiles = -(-rows // tile) + num_groups  # sum_e ceil(gs_e / tile) is at most this
  ends = jnp.cumsum(group_sizes_E)
  padded = (group_sizes_E + tile - 1) // tile * tile
  padded_ends = jnp.cumsum(padded)
  r = jnp.arange(rows)
  grp = jnp.searchsorted(ends, r, side="right", method="compare_all")
  g = jnp.minimum(grp, num_groups - 1)
  dest = jnp.where(
      grp < num_groups,
      padded_ends[g] - padded[g] + r - (ends[g] - group_sizes_E[g]),
      num_tiles * tile,
  )
  tile_group = jnp.searchsorted(
      padded_ends, jnp.arange(num_tiles) * tile, side="right", method="compare_all"
  )
  return dest, jnp.minimum(tile_group, num_groups - 1), num_tiles


def _to_tiles(x_MD, dest, num_tiles: int, tile: int):
  xp = jnp.zeros((num_tiles * tile, x_MD.shape[1]), x_MD.dtype)
  return xp.at[dest].set(x_MD, mode="drop").reshape(num_tiles, tile, x_MD.shape[1])


def _from_tiles(yp_TmF, dest):
  flat = yp_TmF.reshape(-1, yp_TmF.shape[-1])
  return jnp.take(flat, dest, axis=0, mode="fill", fill_value=0)


def _tile_matmul(xp_TmD, w_EDF, tile_group, transpose_w=False):
  def one(args):
    x_mD, e = args
    w = lax.dynamic_index_in_dim(w_EDF, e, keepdims=False)
    return jnp.dot(x_mD, w.T if transpose_w else w, preferred_element_type=jnp.float32)

  return lax.map(one, (xp_TmD, tile_group))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_gmm(x_MD, w_EDF, group_sizes_E, tile):
  dest, tile_group, nt = _tile_layout(group_sizes_E, x_MD.shape[0], tile)
  out = _tile_matmul(_to_tiles(x_MD, dest, nt, tile), w_EDF, tile_group)
  return _from_tiles(out, dest).astype(x_MD.dtype)


def _tiled_gmm_fwd(x_MD, w_EDF, group_sizes_E, tile):
  return _tiled_gmm(x_MD, w_EDF, group_sizes_E, tile), (x_MD, w_EDF, group_sizes_E)


def _tiled_gmm_bwd(tile, res, dy_MF):
  x_MD, w_EDF, group_sizes_E = res
  dest, tile_group, nt = _tile_layout(group_sizes_E, x_MD.shape[0], tile)
  xp, dyp = _to_tiles(x_MD, dest, nt, tile), _to_tiles(dy_MF, dest, nt, tile)
  dx = _from_tiles(_tile_matmul(dyp, w_EDF, tile_group, transpose_w=True), dest)

  def accumulate(dw, args):
    x_mD, dy_mF, e = args
    upd = jnp.dot(x_mD.T, dy_mF, preferred_element_type=jnp.float32)
    return dw.at[e].add(upd), None

  dw, _ = lax.scan(accumulate, jnp.zeros(w_EDF.shape, jnp.float32), (xp, dyp, tile_group))
  return dx.astype(x_MD.dtype), dw.astype(w_EDF.dtype), None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


def grouped_matmul(x_MD, w_EDF, group_sizes_E, *, impl: str = "auto", tile: int = 128):
  """`out[i] = x[i] @ w[group(i)]` for rows sorted by group: `[M, D] x [E, D, F] -> [M, F]`.

  Rows past `sum(group_sizes)` give zeros. impl: "ragged_dot" (`jax.lax.ragged_dot`), "tiled"
  (scan over row tiles, CPU-friendly) or "auto" (tiled on CPU, ragged_dot elsewhere).
  """
  if impl not in GMM_IMPLS:
    raise ValueError(f"Unknown grouped-matmul impl {impl!r}; choose one of {GMM_IMPLS}.")
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if impl == "ragged_dot":
    return lax.ragged_dot(
        x_MD, w_EDF.astype(x_MD.dtype), group_sizes_E, preferred_element_type=jnp.float32
    ).astype(x_MD.dtype)
  return _tiled_gmm(x_MD, w_EDF.astype(x_MD.dtype), group_sizes_E, int(tile))
