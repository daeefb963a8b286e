"""Encoder / Decoder / EncoderDecoder: cached == full decoding, every head trains, options,
partitioning annotations, bfloat16 and config / input validation errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.models import decoding, seq_objectives
from nexus_jax.models.transformer import Decoder, Encoder, EncoderDecoder, pool

SMALL = dict(num_layers=2, embed_dim=16, num_heads=4, mlp_dim=32)
ONE = {**SMALL, "num_layers": 1}


def _tokens(seed, shape, vocab):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_kv_heads=2, num_experts=4, moe_every=2),  # GQA, the 2nd of 2 layers MoE
        pytest.param(
            dict(scan_layers=False, norm="layer", activation="gelu", qk_norm=True),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_decoder_cached_decoding_equals_full_forward(kw):
  """Prefill 3 tokens then one at a time, RoPE on half the head dims: same logits as one pass."""
  model = Decoder(**{**SMALL, **kw}, vocab_size=11, rotary_fraction=0.5)
  tokens = _tokens(0, (2, 7), 11)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  full, _ = jax.jit(model.apply)({"params": params}, tokens)
  cache = decoding.init_cache(model, 2, cache_len=9)
  assert decoding.cache_length(cache) == 9
  step = jax.jit(lambda c, x: decoding.decode_step(model, params, c, x))
  outs, (out, cache) = [], step(cache, tokens[:, :3])
  outs.append(out)
  for i in range(3, 7):
    out, cache = step(cache, tokens[:, i : i + 1])
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)


def test_encoder_decoder_cached_decoding_equals_full_forward():
  """Encoder run once; cross-attention keys cached on the first call, reused afterwards."""
  model = EncoderDecoder(
      **SMALL, vocab_size=13, num_kv_heads=2, rotary_fraction=0.25, num_encoder_layers=1
  )
  src, tgt = _tokens(2, (2, 5), 13), _tokens(3, (2, 6), 13)
  src_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), src, tgt)["params"]
  full, _ = jax.jit(model.apply)({"params": params}, src, tgt, source_mask=src_mask)
  encoded = jax.jit(lambda p, s: decoding.encode(model, p, s, src_mask))(params, src)
  cache = decoding.init_cache(model, 2, cache_len=8, source_len=5)
  first, cache = jax.jit(
      lambda c, x, e: decoding.decode_step(model, params, c, x, encoded=e, source_mask=src_mask)
  )(cache, tgt[:, :2], encoded)
  step = jax.jit(lambda c, x: decoding.decode_step(model, params, c, x, source_mask=src_mask))
  outs = [first]
  for i in range(2, 6):
    out, cache = step(cache, tgt[:, i : i + 1])
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)


def _train(objective, batch, steps=30, lr=1e-2):
  model = objective.model
  init = jax.jit(lambda key: model.init(key, **objective.inputs(batch, False))["params"])
  params = nn.unbox(init(jax.random.PRNGKey(0)))
  tx = optax.adam(lr)

  def loss_fn(p):
    out, _ = model.apply(
        {"params": p},
        **objective.inputs(batch, True),
        rngs={"dropout": jax.random.PRNGKey(1)},
        mutable=["aux_loss"],
    )
    return objective.loss(out[0], batch)[0]

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s)
    return optax.apply_updates(p, u), s, loss

  state, losses = tx.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses


def _head_cases():
  rng = np.random.default_rng(0)
  w = np.ones(8, np.float32)
  seqs = np.tile(np.arange(9) % 5, (8, 1)).astype(np.int32)  # a periodic token sequence
  feats = rng.normal(size=(8, 6, 3)).astype(np.float32)
  label = (feats[:, :, 0].mean(1) > 0).astype(np.int32)
  series = np.sin(np.linspace(0, 6, 12))[None, :, None] * rng.uniform(0.5, 1.5, (8, 1, 1))
  series = series.astype(np.float32)
  return {
      "lm": lambda: (
          seq_objectives.lm_objective(Decoder(**ONE, vocab_size=5, tie_embeddings=True)),
          {"tokens": seqs, "weight": w},
      ),
      # feature-input decoder forecasting the next step of a tiny series
      "token_regression": lambda: (
          seq_objectives.token_regression_objective(
              Decoder(**ONE, head="token_regression", num_outputs=1)
          ),
          {"inputs": series[:, :-1], "targets": series[:, 1:], "weight": w},
      ),
      "classification": lambda: (
          seq_objectives.classification_objective(
              Encoder(**ONE, head="classification", num_outputs=2, pooling="first")
          ),
          {"inputs": feats, "label": label, "weight": w},
      ),
      "regression": lambda: (
          seq_objectives.regression_objective(
              Encoder(**ONE, head="regression", num_outputs=1, num_experts=2, moe_top_k=1)
          ),
          {"inputs": feats, "target": feats[:, :, :1].mean(1), "weight": w},
      ),
      "seq2seq": lambda: (
          seq_objectives.seq2seq_objective(EncoderDecoder(**ONE, vocab_size=6)),
          {
              "source": seqs[:, :5] % 6,
              "targets": np.concatenate([np.zeros((8, 1), np.int32), seqs[:, :5][:, ::-1]], 1),
              "weight": w,
          },
      ),
  }


@pytest.mark.parametrize(
    "head",
    [
        "lm",
        "token_regression",
        pytest.param("classification", marks=pytest.mark.slow),
        pytest.param("regression", marks=pytest.mark.slow),
        pytest.param("seq2seq", marks=pytest.mark.slow),
    ],
)
def test_head_loss_decreases(head):
  objective, batch = _head_cases()[head]()
  losses = _train(objective, batch)
  assert losses[-1] < 0.5 * losses[0], (head, losses[0], losses[-1])


def test_options_forward_and_grad():
  """Shared layers, remat, post-norm, LayerNorm, GEGLU and the chunked attention backend."""
  model = Encoder(
      **SMALL,
      share_layers=True,
      remat_policy="dots",
      norm_placement="post",
      norm="layer",
      attention_backend="chunked",
      activation="geglu",
      vocab_size=7,
      head="classification",
      num_outputs=3,
  )
  tokens = _tokens(4, (2, 6), 7)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens)[0].sum()))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert jax.eval_shape(model.apply, {"params": params}, tokens)[0].shape == (2, 3)
  query = nn.unbox(params)["encoder"]["layers"]["self_attention"]["query"]["kernel"]
  assert query.shape == (16, 4, 4)  # shared layers: no leading per-layer axis


def test_logical_partitioning_and_bfloat16():
  model = Decoder(**ONE, vocab_size=9, num_experts=2, dtype=jnp.bfloat16)
  tokens = _tokens(5, (2, 4), 9)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )[0]:
    assert isinstance(leaf, nn.Partitioned), path
    names = [n for n in leaf.names if n is not None]
    assert len(names) == len(set(names)), (path, leaf.names)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), nn.unbox(boxed))
  logits, aux = jax.jit(model.apply)({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  assert aux["moe"]["expert_load"].shape == (1, 2)


def test_pool_masks():
  x = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
  mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_allclose(pool(x, mask, "mean")[:, 0], [1.5, 5.5])
  np.testing.assert_allclose(pool(x, mask, "first")[:, 0], [1, 4])
  np.testing.assert_allclose(pool(x, mask, "last")[:, 0], [2, 7])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(head="lm", vocab_size=0), "head='lm' needs token input"),
        (dict(head="classification", vocab_size=5), "needs num_outputs >= 1"),
        (dict(head="bogus", vocab_size=5), "head='bogus'"),
        (dict(vocab_size=5, num_experts=2, moe_every=3), "multiple of moe_every"),
        (
            dict(vocab_size=5, head="regression", num_outputs=1, tie_embeddings=True),
            "tie_embeddings=True needs",
        ),
        (dict(vocab_size=5, remat_policy="some"), "remat_policy='some'"),
        (dict(vocab_size=5, num_layers=0), "num_layers must be >= 1"),
    ],
)
def test_config_validation_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    Encoder(**{**SMALL, **kw}).init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))


def test_bad_inputs_get_clear_errors():
  model = Decoder(**SMALL, vocab_size=5)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
    model.init(jax.random.PRNGKey(0), jnp.array([[1, 7]]))
  with pytest.raises(ValueError, match="token input must be int"):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 2)))
  with pytest.raises(ValueError, match="feature input"):
    Decoder(**SMALL, head="token_regression", num_outputs=1).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32)
    )
  with pytest.raises(ValueError, match="head must be 'lm' or 'token_regression'"):
    EncoderDecoder(**SMALL, vocab_size=5, head="classification", num_outputs=2).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32)
    )
  with pytest.raises(TypeError, match="needs a Decoder or EncoderDecoder"):
    decoding.init_cache(Encoder(**SMALL, vocab_size=5), 1, 4)
