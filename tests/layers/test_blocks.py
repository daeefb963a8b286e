"""TransformerBlock / TransformerStack: scan == unrolled, shared layers, remat, decoding, norms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers.blocks import TransformerBlock, TransformerStack

import layers_testing as lt

B, T, E = 2, 6, 16
BLOCK = TransformerBlock(num_heads=4, num_kv_heads=2, mlp_dim=32, causal=True)


def _x(seed=0, shape=(B, T, E)):
  return lt.normal(seed, shape)


def test_scanned_stack_equals_unrolled_stack_with_the_same_weights():
  x = _x()
  scanned = TransformerStack(block=BLOCK, num_layers=2)
  unrolled = TransformerStack(block=BLOCK, num_layers=2, scan_layers=False)
  params = nn.unbox(jax.jit(scanned.init)(lt.key(1), x)["params"])
  assert params["layers"]["self_attention"]["query"]["kernel"].shape == (2, E, 4, 4)
  per_layer = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(2)}
  y1, _ = jax.jit(scanned.apply)({"params": params}, x)
  y2, _ = jax.jit(unrolled.apply)({"params": {**per_layer, "final_norm": params["final_norm"]}}, x)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-5)


def test_shared_layers_apply_one_block_repeatedly():
  x = _x(1)
  stack = TransformerStack(block=BLOCK, num_layers=3, share_layers=True, final_norm=False)
  params = nn.unbox(jax.jit(stack.init)(lt.key(1), x)["params"])
  assert params["layers"]["mlp"]["wo"]["kernel"].shape == (32, E)  # no layer axis
  y, _ = jax.jit(stack.apply)({"params": params}, x)
  block = jax.jit(lambda x: BLOCK.apply({"params": params["layers"]}, x)[0])
  np.testing.assert_allclose(np.asarray(y), np.asarray(block(block(block(x)))), atol=1e-5)


@pytest.mark.slow  # remat under scan + grad is also covered by test_foreign_module.py
def test_remat_policy_keeps_gradients():
  x = _x(2)
  grads = {}
  for policy in ("none", "dots_with_no_batch_dims"):
    stack = TransformerStack(block=BLOCK, num_layers=2, remat_policy=policy)
    params = jax.jit(stack.init)(lt.key(1), x)["params"]
    loss = lambda p, stack=stack: jnp.mean(stack.apply({"params": p}, x)[0] ** 2)
    grads[policy] = jax.jit(jax.grad(loss))(params)
  for a, b in zip(
      jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["dots_with_no_batch_dims"])
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_moe_stack_aux_and_aux_losses_are_stacked_over_layers():
  x = _x(6)
  block = TransformerBlock(
      num_heads=2, mlp_dim=8, causal=True, num_experts=4, moe_top_k=2, moe_capacity_factor=2.0
  )
  stack = TransformerStack(block=block, num_layers=3)
  params = jax.jit(stack.init)(lt.key(1), x)["params"]
  (_, aux), state = jax.jit(lambda p: stack.apply({"params": p}, x, mutable=["aux_loss"]))(params)
  assert aux["expert_load"].shape == (3, 4)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), 1.0, rtol=1e-5)
  lb = state["aux_loss"]["layers"]["moe"]["load_balance"][0]
  np.testing.assert_allclose(np.asarray(lb), 1e-2 * np.asarray(aux["load_balance_loss"]), rtol=1e-6)


def test_decoding_a_scanned_moe_stack_with_padding_matches_the_full_pass():
  """Token-by-token decoding through 2 scanned layers (GQA attention + MoE) with a padding mask
  equals the full causal pass on the real tokens. While decoding, the [B, cache_len] mask masks
  cache slots and is not used as the MoE token mask."""
  x = _x(3)
  pad = jnp.arange(T)[None, :] < jnp.array([[T], [4]])
  block = BLOCK.clone(num_experts=2, moe_top_k=1, moe_capacity_factor=2.0)  # nothing dropped
  stack = TransformerStack(block=block, num_layers=2)
  params = jax.jit(stack.init)(lt.key(1), x)["params"]
  full, _ = jax.jit(lambda p, x: stack.apply({"params": p}, x, mask=pad))(params, x)
  dec = TransformerStack(block=block.clone(decode=True), num_layers=2)
  cache = jax.jit(dec.init)(lt.key(1), x)["cache"]
  assert cache["layers"]["self_attention"]["cached_key"].shape == (2, B, T, 2, 4)
  step = jax.jit(
      lambda c, xs: dec.apply({"params": params, "cache": c}, xs, mask=pad, mutable=["cache"])
  )
  outs = []
  for i in range(T):
    (y, _), state = step(cache, x[:, i : i + 1])
    cache, outs = state["cache"], outs + [y]
  out = np.concatenate(outs, 1)
  np.testing.assert_allclose(out[0], np.asarray(full[0]), atol=1e-5)
  np.testing.assert_allclose(out[1, :4], np.asarray(full[1, :4]), atol=1e-5)  # real tokens


def test_post_norm_output_is_normalised_and_cross_attention_uses_context():
  x, ctx = _x(4) * 10, _x(5, (B, 3, 8))
  block = TransformerBlock(
      num_heads=2,
      mlp_dim=8,
      norm="layer",
      norm_placement="post",
      cross_attention=True,
      dropout_rate=0.1,
  )
  params = jax.jit(block.init)(lt.key(1), x, ctx)
  apply = jax.jit(lambda p, x, c: block.apply(p, x, c)[0])
  y = np.asarray(apply(params, x, ctx))
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-2)
  assert not np.allclose(y, np.asarray(apply(params, x, ctx + 1.0)))
  train = jax.jit(
      lambda p, x, c: block.apply(p, x, c, deterministic=False, rngs={"dropout": lt.key(2)})[0]
  )(params, x, ctx)
  assert not np.allclose(np.asarray(train), y)


@pytest.mark.parametrize(
    "stack_kw,block_kw,match",
    [
        (dict(remat_policy="sometimes"), {}, "Unknown remat_policy"),
        (dict(num_layers=0), {}, "num_layers must be >= 1"),
        ({}, dict(norm_placement="sandwich"), "norm_placement"),
        ({}, dict(cross_attention=True), "needs `context`"),
        ({}, dict(norm="batch"), "Unknown norm"),
    ],
)
def test_bad_configuration_is_rejected(stack_kw, block_kw, match):
  stack = TransformerStack(**{"block": BLOCK.clone(**block_kw), "num_layers": 2, **stack_kw})
  with pytest.raises(ValueError, match=match):
    stack.init(lt.key(0), _x())
