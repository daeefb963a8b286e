"""Every layer used inside someone else's nn.Module under jit + grad + remat + scan; ops under vmap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers import attention_ops
from nexus_jax.layers.attention import Attention
from nexus_jax.layers.blocks import TransformerBlock
from nexus_jax.layers.feedforward import MLP
from nexus_jax.layers.kernels import chunked_attention, flash_attention
from nexus_jax.layers.moe import MoE
from nexus_jax.layers.norms import AdaptiveNorm, LayerNorm, RMSNorm

import layers_testing as lt

SIZES = {
    "chunked": chunked_attention.ChunkSizes(4, 4),
    "pallas": flash_attention.BlockSizes(8, 8, 8, 8, 8, 8),
}


class ForeignLayer(nn.Module):
  """A user's layer: it knows nothing about nexus_jax beyond the public constructors."""

  backend: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, carry, _):
    x, cond = carry
    kw = dict(dtype=self.dtype)
    h = Attention(
        num_heads=2,
        num_kv_heads=1,
        causal=True,
        rotary_fraction=0.5,
        qk_norm=True,
        backend=self.backend,
        block_sizes=SIZES[self.backend],
        **kw,
    )(RMSNorm()(x))
    x = x + h
    x = x + MLP(32, activation="geglu", **kw)(LayerNorm()(x))
    y, aux = MoE(num_experts=4, mlp_dim=8, top_k=2, **kw)(AdaptiveNorm()(x, cond))
    x = x + y
    x, _ = TransformerBlock(
        num_heads=2,
        mlp_dim=16,
        causal=True,
        num_experts=0,
        attention_backend=self.backend,
        block_sizes=SIZES[self.backend],
        **kw,
    )(x)
    return (x, cond), aux["expert_load"]


class ForeignModel(nn.Module):
  backend: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, cond):
    # Our params are nn.LogicallyPartitioned, so nn.scan needs a name for the new layer axis.
    layers = nn.scan(
        nn.remat(ForeignLayer),
        variable_axes={"params": 0, "aux_loss": 0},
        split_rngs={"params": True},
        length=2,
        metadata_params={nn.PARTITION_NAME: None},
    )
    (x, _), loads = layers(self.backend, self.dtype)((x.astype(self.dtype), cond), None)
    return x, loads


@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("chunked", jnp.float32),
        pytest.param("pallas", jnp.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_layers_inside_foreign_module_under_jit_grad_remat_scan(backend, dtype):
  x = lt.normal(0, (2, 6, 16))
  cond = lt.normal(1, (2, 5))
  model = ForeignModel(backend, dtype)
  params = jax.jit(model.init)(lt.key(2), x, cond)["params"]

  def loss(p, x):
    (y, loads), aux_losses = model.apply({"params": p}, x, cond, mutable=["aux_loss"])
    total_aux = sum(jnp.sum(v) for v in jax.tree.leaves(aux_losses))
    return jnp.mean(jnp.square(y.astype(jnp.float32))) + total_aux, (y, loads)

  grads, (y, loads) = jax.jit(jax.grad(loss, has_aux=True))(params, x)
  assert y.dtype == dtype and y.shape == x.shape and loads.shape == (2, 4)
  leaves = jax.tree.leaves(nn.unbox(grads))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in leaves)
  assert sum(float(jnp.abs(g).max()) > 0 for g in leaves) >= 0.9 * len(leaves)


def test_attention_ops_under_vmap():
  """The functional op composes with vmap (extra axis) for every attention backend."""
  q = lt.normal(0, (3, 1, 8, 2, 8))
  for backend in ("xla", "chunked", "pallas", "fourier"):
    f = lambda q, backend=backend: attention_ops.dot_product_attention(
        q, q, q, backend=backend, block_sizes=SIZES.get(backend)
    )
    batched = jax.jit(jax.vmap(f))(q)
    np.testing.assert_allclose(np.asarray(batched[2]), np.asarray(jax.jit(f)(q[2])), atol=1e-5)


def test_moe_module_under_vmap():
  """vmap over an extra leading axis of a dropless MoE (sort + grouped matmul) = per slice."""
  layer = MoE(num_experts=4, mlp_dim=8, top_k=2, gmm_tile=8)
  x = lt.normal(0, (3, 2, 5, 8))
  params = jax.jit(layer.init)(lt.key(1), x[0])
  apply = lambda x: layer.apply(params, x)[0]
  batched = jax.jit(jax.vmap(apply))(x)
  np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(jax.jit(apply)(x[1])), atol=1e-5)
