"""CompressiveAttention / CompressiveLM: decoding = segment-recurrent forward, window-only = hand
mask, reconstruction loss = hand computation, memory reach, and field validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nexus_jax.layers import rotary
from nexus_jax.layers.compressive_attention import CompressiveAttention, init_memory
from nexus_jax.layers.segment_memory import summary_update
from nexus_jax.models.compressive_lm import CompressiveLM, cache_bytes, decode_step, init_cache

E, W = 16, 4


def _run_segments(attn, params, x_BTE):
  """The layer over every segment in order; returns `[B, T, E]` and the sown losses per segment."""
  memory, outs, losses = None, [], []
  for s in range(x_BTE.shape[1] // attn.segment_length):
    seg = x_BTE[:, s * attn.segment_length : (s + 1) * attn.segment_length]
    (out, memory), state = attn.apply({"params": params}, seg, memory, mutable=["aux_loss"])
    outs.append(out)
    losses.append(state.get("aux_loss", {}).get("compression_reconstruction", (None,))[0])
  return jnp.concatenate(outs, axis=1), losses


def _qkv(attn, params, x_BTE):
  """Hand projections + RoPE at absolute positions: q `[B, T, H, D]`, k/v `[B, T, K, D]`."""
  b, t, _ = x_BTE.shape
  kv, d = attn.dims(x_BTE.shape[-1])
  proj = lambda name, h: (x_BTE @ params[name]["kernel"]).reshape(b, t, h, d)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  q = rotary.apply_rope(proj("query", attn.num_heads), pos)
  k = rotary.apply_rope(proj("key", kv), pos)
  return q, k, proj("value", kv)


def _softmax_attend(q, k, v, mask_TS):
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask_TS, s, -jnp.inf)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("compression", ["mean", "conv"])
def test_decoding_matches_segment_recurrent_forward(compression):  # memory="compressive"
  # W=4, c=2, M=4: two compressed chunks in the ring, overwritten from segment 4 on.
  model = CompressiveLM(
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      segment_length=W,
      memory_slots=4,
      compression_rate=2,
      compression=compression,
  )
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7 * W), 0, 256)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  logits, _ = model.apply({"params": params}, tokens)
  cache = init_cache(model, params, 2)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
  nbytes = cache_bytes(cache)
  step = jax.jit(lambda p, c, t: decode_step(model, p, c, t))
  outs = []
  for i in range(tokens.shape[1]):
    out, cache = step(params, cache, tokens[:, i : i + 1])
    outs.append(out)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == shapes
  np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, atol=1e-4, rtol=1e-4)
  assert step._cache_size() == 1  # one compiled step for every position
  # (2W raw + M compressed) k and v slots, K=2 heads of D=8, 2 rows, 2 layers, + index.
  assert nbytes == 2 * (2 * (2 * W + 4) * 2 * 8 * 2 * 4 + 4)


def _live_titans(params):
  """The params with the Titans read-out kernels (zero at init: a no-op branch) made random."""
  flat = traverse_util.flatten_dict(params)
  key = jax.random.PRNGKey(11)
  for path in flat:
    if "titans" in path and path[-2:] == ("out", "kernel"):
      key, sub = jax.random.split(key)
      flat[path] = jax.random.normal(sub, flat[path].shape) * 0.3
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("memory", ["summary", "titans", "none"])
def test_other_memories_decode_like_the_segment_recurrent_forward(memory):
  model = CompressiveLM(
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      segment_length=W,
      memory_slots=3,
      memory=memory,
      titans_chunk=2,
  )
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6 * W), 0, 256)
  params = _live_titans(model.init(jax.random.PRNGKey(0), tokens)["params"])
  logits, _ = model.apply({"params": params}, tokens)
  cache = init_cache(model, params, 2)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
  step = jax.jit(lambda p, c, t: decode_step(model, p, c, t))
  outs = []
  for i in range(tokens.shape[1]):
    out, cache = step(params, cache, tokens[:, i : i + 1])
    outs.append(out)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == shapes
  np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, atol=1e-4, rtol=1e-4)
  assert step._cache_size() == 1
  layer = cache["stack"]["block_0"]["attn"]
  slots = {"summary": 3, "titans": 0, "none": 0}[memory]
  assert layer["mem_k"].shape == (2, slots, 2, 8)
  if memory == "titans":  # the memory MLP's state and the raw inputs of two segments
    assert layer["titans_w1"].shape == (2, 2, 8, 16) and layer["prev_x"].shape == (2, W, 32)


def test_summary_update_is_a_softmax_mixture_of_old_slots_and_evicted_kv():
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(7), 5)
  q = jax.random.normal(k1, (3, 2, 4))  # M=3 slots, K=2 heads, D=4
  mem_k, mem_v = jax.random.normal(k2, (1, 3, 2, 4)), jax.random.normal(k3, (1, 3, 2, 4))
  ev_k, ev_v = jax.random.normal(k4, (1, 5, 2, 4)), jax.random.normal(k5, (1, 5, 2, 4))
  for valid in (False, True):
    new_k, new_v = summary_update(q, mem_k, mem_v, ev_k, ev_v, jnp.asarray(valid))
    keys = np.concatenate([mem_k, ev_k], 1)[0] if valid else np.asarray(ev_k[0])
    vals = np.concatenate([mem_v, ev_v], 1)[0] if valid else np.asarray(ev_v[0])
    for h in range(2):
      s = np.asarray(q[:, h]) @ keys[:, h].T / 2.0
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(new_k[0, :, h], p @ keys[:, h], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(new_v[0, :, h], p @ vals[:, h], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory, reaches", [("none", False), ("summary", True), ("titans", True)])
def test_memory_variants_reach_past_the_previous_segment(memory, reaches):
  model = CompressiveLM(
      num_layers=1,
      embed_dim=E,
      num_heads=2,
      mlp_dim=32,
      segment_length=W,
      memory_slots=2,
      memory=memory,
  )
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 3 * W), 0, 256)
  params = _live_titans(model.init(jax.random.PRNGKey(0), tokens)["params"])
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % 256)  # segment 0; segment 2 reads it only
  a, b = (model.apply({"params": params}, t)[0] for t in (tokens, changed))
  assert bool(jnp.any(jnp.abs(a[:, 2 * W :] - b[:, 2 * W :]) > 1e-6)) == reaches
  # segment 1 sees segment 0 raw, so it always changes; nothing before segment 0 exists
  assert bool(jnp.any(jnp.abs(a[:, W : 2 * W] - b[:, W : 2 * W]) > 1e-6))


def test_titans_truncation_cuts_the_gradient_behind_the_latest_write_only():
  # One layer: segment 3 sees segment 2 raw and the memory written with segments 0 and 1 (the
  # write in segment 2 absorbs segment 1 on top of the state that absorbed segment 0).
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 4 * W, E))

  def grads(truncate):
    attn = CompressiveAttention(
        num_heads=2, segment_length=W, memory="titans", titans_chunk=2, titans_truncate=truncate
    )
    params = _live_titans(attn.init(jax.random.PRNGKey(0), x[:, :W])["params"])
    last = lambda x: _run_segments(attn, params, x)[0][:, 3 * W :]
    g = jax.grad(lambda x: jnp.sum(last(x) ** 2))(x)
    return last(x), jnp.abs(g).sum(axis=(0, 2)).reshape(4, W).sum(axis=1)  # per input segment

  out_cut, g_cut = grads(True)
  out_full, g_full = grads(False)
  np.testing.assert_allclose(out_cut, out_full, rtol=1e-6)  # the forward is the same function
  assert g_full[0] > 1e-6 and g_cut[0] == 0.0  # segment 0 reaches it only through the old state
  assert g_cut[1] > 1e-6 and np.isclose(g_cut[1], g_full[1], rtol=1e-5)  # the latest write
  assert g_cut[2] > 1e-6 and g_cut[3] > 1e-6


def test_window_only_equals_hand_mask():
  attn = CompressiveAttention(num_heads=4, num_kv_heads=2, segment_length=W, memory_slots=0)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 4 * W, E))
  params = attn.init(jax.random.PRNGKey(0), x[:, :W])["params"]
  out, losses = _run_segments(attn, params, x)
  assert losses == [None] * 4  # nothing is sown without a compressed memory
  q, k, v = _qkv(attn, params, x)
  i, j = np.arange(4 * W)[:, None], np.arange(4 * W)[None, :]
  mask = (j <= i) & (j // W >= i // W - 1)  # previous + current segment, causal
  ref = _softmax_attend(q, k, v, mask).reshape(2, 4 * W, -1) @ params["out"]["kernel"]
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_reconstruction_loss_matches_hand_computation():
  coef = 0.5
  attn = CompressiveAttention(
      num_heads=2, segment_length=W, memory_slots=2, compression_rate=2, reconstruction_coef=coef
  )
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 2 * W, E))
  params = attn.init(jax.random.PRNGKey(0), x[:, :W])["params"]
  _, losses = _run_segments(attn, params, x)
  q, k, v = _qkv(attn, params, x)
  pool = lambda a: a[:, :W].reshape(1, W // 2, 2, *a.shape[2:]).mean(axis=2)
  full = _softmax_attend(q[:, W:], k[:, :W], v[:, :W], True)
  comp = _softmax_attend(q[:, W:], pool(k), pool(v), True)
  np.testing.assert_allclose(losses[0], 0.0)  # segment 0 evicts nothing
  np.testing.assert_allclose(losses[1], coef * jnp.mean((full - comp) ** 2), rtol=1e-5)


def test_conv_reconstruction_trains_only_the_compressor():
  attn = CompressiveAttention(
      num_heads=2, segment_length=W, memory_slots=2, compression_rate=2, compression="conv"
  )
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 2 * W, E))
  params = attn.init(jax.random.PRNGKey(0), x[:, :W])["params"]
  _, losses = _run_segments(attn, params, x)
  assert float(losses[1]) > 0  # starts as mean pooling: lossy

  def loss(p):
    return sum(l for l in _run_segments(attn, p, x)[1])

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads["compress_k"]).sum()) > 0
  assert float(jnp.abs(grads["compress_v"]).sum()) > 0
  for name in ("query", "key", "value", "out"):  # stop-gradient on the attention inputs
    assert float(jnp.abs(grads[name]["kernel"]).sum()) == 0.0


@pytest.mark.parametrize("slots, reaches", [(0, False), (2, True)])
def test_memory_reaches_past_the_previous_segment(slots, reaches):
  model = CompressiveLM(
      num_layers=1,
      embed_dim=E,
      num_heads=2,
      mlp_dim=32,
      segment_length=W,
      memory_slots=slots,
      compression_rate=2,
  )
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 3 * W), 0, 256)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % 256)  # segment 0; segment 2 reads it only
  a, b = (model.apply({"params": params}, t)[0][:, 2 * W :] for t in (tokens, changed))
  assert bool(jnp.any(jnp.abs(a - b) > 1e-6)) == reaches


def test_memory_init_shapes():
  attn = CompressiveAttention(
      num_heads=4, num_kv_heads=2, segment_length=8, memory_slots=6, compression_rate=4
  )
  memory = init_memory(3, attn, 32)
  assert memory["k"].shape == (3, 8, 2, 8) and memory["mem_v"].shape == (3, 6, 2, 8)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(segment_length=0), "segment_length"),
        (dict(compression_rate=0, memory_slots=4), "compression_rate"),
        (dict(memory_slots=-1), "memory_slots"),
        (dict(memory_slots=3, compression_rate=2), "memory_slots"),  # chunks of W/c = 2 slots
        (dict(memory_slots=4, compression_rate=3), "compression_rate"),  # 3 does not divide 4
        (dict(compression="max", memory_slots=4), "compression"),
        (dict(memory="ring"), "memory"),
        (dict(memory="summary", memory_slots=0), "memory_slots"),
        (dict(memory="titans", titans_chunk=0), "titans_chunk"),
        (dict(memory="titans", titans_max_lr=0.0), "titans_max_lr"),
    ],
)
def test_bad_fields_raise(fields, match):
  attn = CompressiveAttention(num_heads=2, **{"segment_length": W, **fields})
  with pytest.raises(ValueError, match=match):
    attn.init(jax.random.PRNGKey(0), jnp.zeros((1, max(W, 1), E)))


def test_bad_lengths_raise():
  model = CompressiveLM(num_layers=1, embed_dim=E, num_heads=2, mlp_dim=32, segment_length=W)
  with pytest.raises(ValueError, match="segment_length"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, W + 1), jnp.int32))
  attn = CompressiveAttention(num_heads=2, segment_length=W)
  with pytest.raises(ValueError, match="segment_length"):
    attn.init(jax.random.PRNGKey(0), jnp.zeros((1, W - 1, E)))


def test_lm_sows_one_reconstruction_loss_per_segment_and_layer():
  model = CompressiveLM(
      num_layers=2,
      embed_dim=E,
      num_heads=2,
      mlp_dim=32,
      segment_length=W,
      memory_slots=2,
      compression_rate=2,
  )
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 3 * W), 0, 256)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  (_, aux), state = model.apply({"params": params}, tokens, mutable=["aux_loss"])
  losses = jax.tree.leaves(state["aux_loss"])
  assert aux == {"segments": 3} and len(losses) == 2
  for loss in losses:
    assert loss.shape == (3,) and float(loss[0]) == 0.0 and float(loss[1]) > 0


def test_titans_memory_stays_finite_over_many_writes():
  # max_lr = 1.0 blew the memory MLP up to inf within 4-8 writes of real text at init (NaN).
  from nexus_jax.data.datasets import text

  data = np.frombuffer((text.stdlib_dir() / "argparse.py").read_bytes()[: 4 * 161], np.uint8)
  tokens = jnp.asarray(data.reshape(4, 161)[:, :-1].astype(np.int32))
  model = CompressiveLM(
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=256,
      segment_length=16,
      memory="titans",
  )
  params = _live_titans(model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
  logits, _ = model.apply({"params": params}, tokens)
  assert bool(jnp.all(jnp.isfinite(logits)))
