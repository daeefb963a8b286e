"""HybridBlock: the attention/SSM/MoE layout rule, logical axis names, decoding == forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers_testing import key, normal
from nexus_jax.layers.hybrid_block import HybridBlock, layer_kinds


def test_layout_rule_is_jamba_by_default_and_bad_values_fail():
  kinds = layer_kinds()
  assert [m for m, _ in kinds] == ["ssm"] * 4 + ["attention"] + ["ssm"] * 3  # 1 : 7
  assert all(f == "mlp" for _, f in kinds)
  assert [f for _, f in layer_kinds(8, moe_every=2)] == ["mlp", "moe"] * 4
  assert [m for m, _ in layer_kinds(3, attention_index=0)] == ["attention", "ssm", "ssm"]
  with pytest.raises(ValueError, match="attention_index"):
    layer_kinds(4, attention_index=4)
  with pytest.raises(ValueError, match="moe_every"):
    layer_kinds(4, moe_every=-1)
  with pytest.raises(ValueError, match="num_layers"):
    layer_kinds(0)


def test_block_params_have_logical_names_and_decoding_equals_forward():
  """Attention KV cache + SSM conv/SSM state + MoE + Titans memory (chunk 1), one block."""
  b, t, e, prompt = 2, 7, 16, 3
  # Layer 0: SSM + SwiGLU; layer 1: attention + Titans memory + MoE.
  block = HybridBlock(
      num_heads=2,
      mlp_dim=24,
      num_layers=2,
      attention_index=1,
      moe_every=2,
      num_experts=4,
      use_memory=True,
      memory_heads=2,
      memory_chunk_size=1,
      ssm_state_dim=4,
      ssm_chunk_size=2,
  )
  x = normal(0, (b, t, e))
  variables = block.init(key(0), x)
  params = variables["params"]
  assert isinstance(params["layer_1_attention"]["query"]["kernel"], nn.Partitioned)
  assert params["layer_1_attention"]["query"]["kernel"].names == ("embed", "heads", "kv")
  assert params["layer_0_ssm"]["in_proj"]["kernel"].names == ("embed", None, "mlp")
  assert params["layer_1_moe"]["wo"].names == ("expert", "mlp", "embed")
  assert params["layer_0_mlp"]["wi_gate"]["kernel"].names == ("embed", "mlp")
  assert "layer_1_memory" in params and "layer_1_mlp" not in params and "layer_0_moe" not in params
  assert "aux_loss" in variables  # MoE balance / z-losses are sown

  full, aux = jax.jit(lambda p, x: block.apply({"params": p}, x))(params, x)
  assert full.shape == (b, t, e)
  assert set(aux["layer_1"]) == {
      "memory_loss_before",
      "memory_loss_after",
      "memory_grad_norm",
      "moe_max_load_ratio",
      "moe_dropped_fraction",
  }
  assert set(aux["layer_0"]) == {"ssm_delta_mean"}

  dec = block.clone(decode=True)
  cache = dec.init(key(1), jnp.zeros((b, t, e)))["cache"]
  assert cache["layer_0_ssm"]["ssm_state"].shape == (b, 2 * e, 4)
  assert cache["layer_1_attention"]["cached_key"].shape[:2] == (b, t)
  step = jax.jit(lambda p, s, x: dec.apply({"params": p, **s}, x, mutable=["cache", "memory"]))
  state = {"cache": cache}
  outs = []
  for lo, hi in [(0, prompt)] + [(i, i + 1) for i in range(prompt, t)]:
    (y, _), state = step(params, state, x[:, lo:hi])
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_block_grads_under_jit_and_bfloat16():
  block = HybridBlock(num_heads=2, mlp_dim=16, num_layers=2, ssm_state_dim=4)
  x = normal(1, (2, 5, 8))
  params = block.init(key(2), x)["params"]
  grads = jax.jit(jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x)[0] ** 2)))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  y, _ = block.clone(dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y, np.float32)).all()
