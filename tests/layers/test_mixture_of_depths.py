"""Mixture-of-Depths: gather/scatter == a hand-pruned reference, causal order, routed decoding ==
the full forward when the predictor agrees with top-k, FLOPs fall with capacity, validation, and
jit + nn.scan + remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.layers import mixture_of_depths as mod_lib
from nexus_jax.inference.generate import generate
from nexus_jax.layers.blocks import TransformerBlock
from nexus_jax.models import decoding
from nexus_jax.models.transformer import Decoder

import layers_testing as lt

E, T = 16, 8
BLOCK = dict(num_heads=2, mlp_dim=32, causal=True)


def _block(capacity=0.5, **kw):
  return mod_lib.MoDBlock(**BLOCK, mod_capacity=capacity, **kw)


def _init(module, x):
  return {"params": nn.unbox(jax.jit(module.init)(lt.key(0), x)["params"])}


def _router_logits(state):
  return np.asarray(state["intermediates"]["mod_router_logits"][0])


def _selected(logits_BT, k):
  return np.sort(np.argsort(-logits_BT, axis=-1, kind="stable")[:, :k], axis=-1)


def test_gather_scatter_equals_the_block_run_on_the_selected_tokens_alone():
  x = lt.normal(0, (2, T, E))
  layer = _block(0.5)
  variables = _init(layer, x)
  (y, _), state = layer.apply(variables, x, mutable=["intermediates", "aux_loss"])
  logits = _router_logits(state)
  idx = _selected(logits, 4)
  inner = TransformerBlock(**BLOCK)
  expected = np.array(x)
  for b in range(2):  # the non-selected tokens removed by hand, original positions kept
    xs = x[b : b + 1, idx[b]]
    out, _ = inner.apply(
        {"params": variables["params"]["block"]}, xs, positions=jnp.asarray(idx[b : b + 1])
    )
    w = 1 / (1 + np.exp(-logits[b, idx[b]]))[:, None]
    expected[b, idx[b]] += w * np.asarray(out[0] - xs[0])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  skipped = np.ones((2, T), bool)
  skipped[np.arange(2)[:, None], idx] = False
  np.testing.assert_array_equal(np.asarray(y)[skipped], np.asarray(x)[skipped])  # pass through
  # The predictor's BCE against top-k membership, times the coefficient, is sown.
  p = np.asarray(state["intermediates"]["mod_predictor_logits"][0])
  chosen = ~skipped
  bce = np.mean(np.logaddexp(0, p) - p * chosen)
  np.testing.assert_allclose(state["aux_loss"]["mod_predictor"][0], 0.01 * bce, rtol=1e-5)


def test_changing_a_future_token_leaves_earlier_outputs_unchanged():
  """The top-k indices are re-sorted: gathered tokens stay in causal order. The perturbation is
  orthogonal to the router kernel, so the selection (hence the set of keys) is unchanged."""
  x = lt.normal(1, (2, T, E))
  layer = _block(0.5)
  variables = _init(layer, x)
  w = np.asarray(variables["params"]["router"]["kernel"])[:, 0]
  d = np.asarray(lt.normal(2, (E,)))
  d = d - (d @ w) / (w @ w) * w
  for t0 in (3, 5):
    x2 = x.at[:, t0].add(3.0 * d)
    y1, _ = layer.apply(variables, x)
    y2, _ = layer.apply(variables, x2)
    np.testing.assert_allclose(y1[:, :t0], y2[:, :t0], atol=1e-5)
    assert not np.allclose(y1[:, t0:], y2[:, t0:])


def test_padding_is_routed_last_and_capacity_rounds_up():
  assert [mod_lib.routed_tokens(c, 10) for c in (0.7, 0.25, 1.0, 0.01)] == [7, 3, 10, 1]
  x = lt.normal(3, (1, T, E))
  mask = jnp.asarray([[True] * 3 + [False] * 5])
  layer = _block(0.5)
  variables = _init(layer, x)
  y, _ = layer.apply(variables, x, mask=mask)
  changed = np.any(np.asarray(y) != np.asarray(x), axis=-1)[0]
  assert changed[:3].all() and changed.sum() == 4  # the 3 valid tokens + 1 padding token
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    layer.apply(variables, x, mask=jnp.ones((1, 1, T, T), bool))


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5])
def test_bad_capacity_raises_naming_the_field(capacity):
  x = lt.normal(0, (1, T, E))
  with pytest.raises(ValueError, match="mod_capacity"):
    _block(capacity).init(lt.key(0), x)
  with pytest.raises(ValueError, match="mod_capacity"):
    Decoder(num_layers=2, embed_dim=E, num_heads=2, vocab_size=11, mod_capacity=capacity).init(
        lt.key(0), jnp.zeros((1, T), jnp.int32)
    )


def test_num_layers_must_fill_whole_groups():
  model = Decoder(num_layers=3, embed_dim=E, num_heads=2, vocab_size=11, mod_capacity=0.5)
  with pytest.raises(ValueError, match="mod_every"):
    model.init(lt.key(0), jnp.zeros((1, T), jnp.int32))


def _flops(module, x):
  variables = jax.eval_shape(lambda: module.init(lt.key(0), x))
  f = jax.jit(lambda v, x: module.apply(v, x))
  return f.lower(variables, x).compile().cost_analysis()["flops"]


def test_flops_drop_with_capacity():
  x = jnp.zeros((2, 64, 32))
  flops = [_flops(_block(c), x) for c in (1.0, 0.5, 0.25)]
  assert flops[0] > flops[1] > flops[2]
  assert flops[1] < 0.6 * flops[0]  # matmuls scale with c, attention scores with c^2


def _decoder(**kw):
  return Decoder(
      num_layers=4,
      embed_dim=E,
      num_heads=2,
      num_kv_heads=1,
      mlp_dim=32,
      vocab_size=13,
      mod_capacity=0.5,
      mod_every=2,
      **kw,
  )


def _agreeing_predictor(params, logits_LT, k):
  """Predictor = router shifted by a threshold between the k-th and (k+1)-th router logit of
  each routed layer (batch 1): the predictor then picks exactly the top-k tokens."""
  params = jax.tree.map(np.array, nn.unbox(params))
  top = -np.sort(-logits_LT, axis=-1)
  thr = (top[:, k - 1] + top[:, k]) / 2  # [L]
  router = params["decoder"]["layers"]["block_1"]["router"]
  predictor = params["decoder"]["layers"]["block_1"]["predictor"]
  predictor["kernel"] = router["kernel"].copy()
  predictor["bias"] = router["bias"] - thr[:, None]
  return params


@pytest.mark.parametrize("prefill", [1, 3])
def test_routed_decode_equals_the_forward_when_the_predictor_agrees(prefill):
  model = _decoder()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (1, T)))
  params = jax.jit(model.init)(lt.key(0), tokens)["params"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  _, state = forward(params, tokens)
  logits_LT = np.asarray(
      state["intermediates"]["decoder"]["layers"]["block_1"]["mod_router_logits"][0]
  )[:, 0]
  params = _agreeing_predictor(params, logits_LT, 4)
  (full, _), _ = forward(params, tokens)
  cache = decoding.init_cache(model, 1, T)
  step = jax.jit(lambda p, c, x: decoding.decode_step(model, p, c, x))
  outs = []
  for start, stop in [(0, prefill)] + [(i, i + 1) for i in range(prefill, T)]:
    out, cache = step(params, cache, tokens[:, start:stop])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
  routed = np.asarray(cache["decoder"]["layers"]["block_1"]["routed"])[:, 0]
  expected = (_selected(logits_LT, 4)[:, :, None] == np.arange(T)).any(1)  # [L, T]
  np.testing.assert_array_equal(routed, expected)


def test_skipped_tokens_are_hidden_from_later_keys_while_decoding():
  """With the predictor agreeing, decoding differs from the forward if the `routed` cache mask is
  ignored: skipped tokens would be attended to by later ones."""
  layer = _block(0.5, decode=True)
  x = lt.normal(4, (1, T, E))
  params = _init(layer.clone(decode=False), x)["params"]
  (y_full, _), state = layer.clone(decode=False).apply(
      {"params": params}, x, mutable=["intermediates"]
  )
  logits = _router_logits(state)
  top = -np.sort(-logits, axis=-1)
  params = jax.tree.map(np.array, nn.unbox(params))
  params["predictor"] = {
      "kernel": params["router"]["kernel"].copy(),
      "bias": params["router"]["bias"] - (top[0, 3] + top[0, 4]) / 2,
  }
  cache = jax.jit(layer.init)(lt.key(0), x)["cache"]
  outs = []
  for i in range(T):
    (out, _), v = layer.apply(
        {"params": params, "cache": cache}, x[:, i : i + 1], mutable=["cache", "intermediates"]
    )
    cache = v["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, atol=2e-5)
  # Rewinding resets the layer's index together with the attention's.
  rewound = decoding.set_cache_index(cache, 2)
  assert int(rewound["cache_index"][0]) == 2
  assert int(rewound["block"]["self_attention"]["cache_index"][0]) == 2


@pytest.mark.slow
def test_generate_with_left_padded_prompts_equals_each_prompt_alone():
  """Padding slots stay hidden (the caller's cache mask is combined with `routed`) and RoPE
  positions start at 0 per row, so a routed model batches prompts exactly."""
  model = _decoder()
  params = jax.jit(model.init)(lt.key(0), jnp.zeros((1, T), jnp.int32))["params"]
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 13, n).tolist() for n in (2, 6)]
  batch = generate(model, params, prompts, max_new_tokens=5, cache_len=12)
  for i, p in enumerate(prompts):
    alone = generate(model, params, [p], max_new_tokens=5, cache_len=12)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])


def test_training_step_under_jit_scan_and_remat():
  model = _decoder(remat_policy="full", scan_layers=True)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (2, T)))
  params = jax.jit(model.init)(lt.key(0), tokens)["params"]

  def losses(p):  # [main cross-entropy, sown aux losses]
    logits, state = model.apply({"params": p}, tokens, mutable=["aux_loss"])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[0]), tokens[..., None], -1))
    return jnp.stack([ce, sum(jnp.sum(a) for a in jax.tree.leaves(state["aux_loss"]))])

  grads = jax.jit(jax.jacrev(losses))(params)  # every leaf [2, ...]: d main, d aux
  routed = lambda g, i: jax.tree.map(lambda a: a[i], nn.unbox(g)["decoder"]["layers"]["block_1"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(routed(grads, 0)["router"]["kernel"]).sum() > 0  # through the sigmoid weight
  assert np.abs(routed(grads, 0)["predictor"]["kernel"]).sum() == 0  # stop-gradient
  assert np.abs(routed(grads, 1)["predictor"]["kernel"]).sum() > 0  # from its aux loss only
  assert np.abs(routed(grads, 1)["block"]["mlp"]["wo"]["kernel"]).sum() == 0
