"""Transformer options through full models: learned absolute positions (and max_len), adaptive
norms conditioned on `condition [B, C]`, `use_final_norm`; cached decoding equals the full pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.models import decoding
from nexus_jax.models.transformer import Decoder, Encoder, EncoderDecoder

SMALL = dict(num_layers=2, embed_dim=16, num_heads=4, mlp_dim=32)


def _tokens(seed, shape, vocab):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _randomise(variables, seed=0, scale=0.3):
  """Random values in every leaf (the adaptive norms' projections start at exactly 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), nn.unbox(variables)
  )


def _params(model, *args, **kwargs):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
  return _randomise(shapes)["params"]


def test_learned_positions_replace_rope():
  """Learned table [max_len, E]; no RoPE: with a zero table a bidirectional encoder is
  permutation-equivariant, with a random table it is not."""
  model = Encoder(
      **SMALL,
      vocab_size=7,
      head="token_regression",
      num_outputs=2,
      position_embedding="learned",
      max_len=6,
  )
  tokens = _tokens(0, (2, 5), 7)
  params = _params(model, tokens)
  assert params["input_position_embed"]["embedding"].shape == (6, 16)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  perm = np.array([3, 0, 4, 1, 2])
  out = apply(params, tokens)
  assert out.shape == (2, 5, 2)
  assert not np.allclose(apply(params, tokens[:, perm]), out[:, perm], atol=1e-4)
  zero = {**params, "input_position_embed": {"embedding": jnp.zeros((6, 16))}}
  np.testing.assert_allclose(apply(zero, tokens[:, perm]), apply(zero, tokens)[:, perm], atol=1e-5)
  rope = Encoder(**SMALL, vocab_size=7, head="token_regression", num_outputs=2)
  rope_params = {k: v for k, v in params.items() if k != "input_position_embed"}
  rope_apply = jax.jit(lambda t: rope.apply({"params": rope_params}, t)[0])
  assert not np.allclose(rope_apply(tokens[:, perm]), rope_apply(tokens)[:, perm], atol=1e-4)


def test_max_len_errors():
  model = Decoder(**SMALL, vocab_size=7, position_embedding="learned", max_len=6)
  params = _params(model, _tokens(0, (1, 6), 7))
  with pytest.raises(ValueError, match="sequence length 7 exceeds max_len 6"):
    model.apply({"params": params}, _tokens(0, (1, 7), 7))
  with pytest.raises(
      ValueError, match=r"positions must lie in \[0, 6\) \(max_len\); got values in \[3, 6\]"
  ):
    model.apply({"params": params}, _tokens(0, (1, 4), 7), positions=np.arange(3, 7)[None])
  with pytest.raises(ValueError, match="cache_len 8 exceeds the model's max_len 6"):
    decoding.init_cache(model, 1, 8)
  with pytest.raises(ValueError, match="position_embedding='learned' needs max_len >= 1"):
    Decoder(**SMALL, vocab_size=7, position_embedding="learned").init(
        jax.random.PRNGKey(0), _tokens(0, (1, 3), 7)
    )
  with pytest.raises(ValueError, match="position_embedding='alibi'; choose one of"):
    Decoder(**SMALL, vocab_size=7, position_embedding="alibi").init(
        jax.random.PRNGKey(0), _tokens(0, (1, 3), 7)
    )


def _decode_in_steps(model, params, tokens, cache_len, condition=None):
  cache = decoding.init_cache(model, tokens.shape[0], cache_len)
  step = jax.jit(lambda c, x: decoding.decode_step(model, params, c, x, condition=condition))
  out, cache = step(cache, tokens[:, :3])
  outs = [out]
  for i in range(3, tokens.shape[1]):
    out, cache = step(cache, tokens[:, i : i + 1])
    outs.append(out)
  return np.concatenate(outs, 1), cache, step


@pytest.mark.parametrize("norm", ["rms", "adaptive_layer"])
def test_decoder_cached_decoding_equals_full_forward(norm):
  """Learned positions from the model's cache index (prefill 3, then one token at a time); with
  an adaptive norm the condition is fed on every step. Rewinding the cache replays exactly."""
  model = Decoder(
      **SMALL,
      vocab_size=11,
      num_kv_heads=2,
      position_embedding="learned",
      max_len=9,
      norm=norm,
      condition_dim=3 if norm.startswith("adaptive") else 0,
  )
  tokens = _tokens(1, (2, 7), 11)
  condition = np.random.default_rng(2).normal(size=(2, 3)).astype(np.float32)
  kw = {"condition": condition} if model.adaptive_norm else {}
  params = _params(model, tokens, **kw)
  full, _ = jax.jit(lambda p, t: model.apply({"params": p}, t, **kw))(params, tokens)
  cached, cache, step = _decode_in_steps(model, params, tokens, 9, kw.get("condition"))
  np.testing.assert_allclose(cached, full, atol=2e-5)
  replay, _ = step(decoding.set_cache_index(cache, 5), tokens[:, 5:6])
  np.testing.assert_allclose(replay[:, 0], full[:, 5], atol=2e-5)


def test_encoder_decoder_learned_positions_and_adaptive_norm_decode_like_full_pass():
  model = EncoderDecoder(
      **SMALL,
      vocab_size=13,
      num_encoder_layers=1,
      position_embedding="learned",
      max_len=8,
      norm="adaptive_rms",
      condition_dim=4,
  )
  src, tgt = _tokens(3, (2, 5), 13), _tokens(4, (2, 6), 13)
  condition = np.random.default_rng(5).normal(size=(2, 4)).astype(np.float32)
  params = _params(model, src, tgt, condition=condition)
  assert params["encoder"]["input_position_embed"]["embedding"].shape == (8, 16)
  assert params["decoder"]["input_position_embed"]["embedding"].shape == (8, 16)
  apply = jax.jit(lambda p, c: model.apply({"params": p}, src, tgt, condition=c)[0])
  full = apply(params, condition)
  assert full.shape == (2, 6, 13)
  assert not np.allclose(apply(params, condition + 1.0), full, atol=1e-3)  # condition matters
  encoded = decoding.encode(model, params, src, condition=condition)
  cache = decoding.init_cache(model, 2, cache_len=8, source_len=5)
  step = jax.jit(
      lambda c, x, e: decoding.decode_step(model, params, c, x, encoded=e, condition=condition)
  )
  out, cache = step(cache, tgt[:, :2], encoded)
  outs = [out]
  for i in range(2, 6):
    out, cache = step(cache, tgt[:, i : i + 1], None)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)


def test_adaptive_norm_starts_as_plain_norm_then_depends_on_condition():
  model = Encoder(
      **SMALL, head="classification", num_outputs=3, norm="adaptive_rms", condition_dim=2
  )
  x = np.random.default_rng(6).normal(size=(2, 5, 4)).astype(np.float32)
  c1, c2 = np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, condition=c1)
  apply = jax.jit(lambda v, c: model.apply(v, x, condition=c)[0])
  assert apply(variables, c1).shape == (2, 3)
  np.testing.assert_array_equal(apply(variables, c1), apply(variables, c2))  # adaLN-Zero at init
  noisy = _randomise(variables)
  assert not np.allclose(apply(noisy, c1), apply(noisy, c2), atol=1e-3)
  norm = nn.unbox(variables)["params"]["encoder"]["final_norm"]
  assert norm["scale"]["kernel"].shape == (2, 16) and norm["shift"]["kernel"].shape == (2, 16)


def test_condition_errors():
  x = np.zeros((2, 3), np.int32)
  adaptive = Decoder(**SMALL, vocab_size=5, norm="adaptive_layer", condition_dim=2)
  with pytest.raises(ValueError, match=r"norm='adaptive_layer' needs `condition` \[batch, 2\]"):
    adaptive.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"condition must be \[batch, condition_dim\] = \[2, 2\]"):
    adaptive.init(jax.random.PRNGKey(0), x, condition=np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="`condition` was given but norm='rms' is not adaptive"):
    Decoder(**SMALL, vocab_size=5).init(
        jax.random.PRNGKey(0), x, condition=np.zeros((2, 2), np.float32)
    )
  with pytest.raises(ValueError, match="norm='adaptive_rms' needs condition_dim >= 1"):
    Decoder(**SMALL, vocab_size=5, norm="adaptive_rms").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="norm='batch'; choose one of"):
    Decoder(**SMALL, vocab_size=5, norm="batch").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "placement, use_final_norm, has_final",
    [("pre", None, True), ("pre", False, False), ("post", None, False), ("post", True, True)],
)
def test_use_final_norm(placement, use_final_norm, has_final):
  kw = dict(**SMALL, vocab_size=5, norm_placement=placement)
  model = Decoder(**kw, use_final_norm=use_final_norm)
  tokens = _tokens(7, (2, 4), 5)
  params = _params(model, tokens)
  assert ("final_norm" in params["decoder"]) == has_final
  if has_final:  # the same weights without the final norm give other logits
    other = Decoder(**kw, use_final_norm=False)
    rest = {**params, "decoder": {k: v for k, v in params["decoder"].items() if k != "final_norm"}}
    with_norm = jax.jit(lambda p: model.apply({"params": p}, tokens)[0])(params)
    without = jax.jit(lambda p: other.apply({"params": p}, tokens)[0])(rest)
    assert with_norm.shape == without.shape == (2, 4, 5)
    assert not np.allclose(with_norm, without, atol=1e-3)
