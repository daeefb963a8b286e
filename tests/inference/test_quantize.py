"""INT8 weight-only quantisation: per-channel scales, error bound, size, structure, refusal to double-quantise."""

import numpy as np
import pytest

from nexus_jax.inference import dequantize, is_quantized, quantize_int8, tree_bytes
from nexus_jax.inference.quantize import quantize_leaf


def params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {
          "kernel": rng.normal(size=(64, 32)).astype(np.float32)
          * np.linspace(0.1, 3, 32, dtype=np.float32),
          "bias": rng.normal(size=(32,)).astype(np.float32),
      },
      "attn": {"kernel": rng.normal(size=(32, 4, 8)).astype(np.float32)},
      "tiny": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)},
      "step": np.array(3, np.int32),
  }


def test_per_channel_scales_and_error_bound():
  w = params()["dense"]["kernel"]
  q = quantize_leaf(w)
  assert q["int8"].dtype == np.int8 and q["scale"].shape == (1, 32)
  np.testing.assert_allclose(q["scale"][0], np.abs(w).max(0) / 127, rtol=1e-6)
  assert np.abs(q["int8"]).max() == 127  # every channel uses the full range
  err = np.abs(q["int8"] * q["scale"] - w)
  assert np.all(err <= q["scale"] / 2 + 1e-7)


def test_tree_quantisation_structure_and_size():
  p = params()
  qp, report = quantize_int8(p, min_size=64)
  assert is_quantized(qp["dense"]["kernel"]) and is_quantized(qp["attn"]["kernel"])
  assert not is_quantized(qp["tiny"]["kernel"])  # below min_size
  assert (
      qp["dense"]["bias"] is p["dense"]["bias"] and qp["step"] is p["step"]
  )  # vectors / ints untouched
  assert qp["attn"]["kernel"]["scale"].shape == (1, 1, 8)
  back = dequantize(qp)
  assert back["dense"]["kernel"].dtype == np.float32 and back["attn"]["kernel"].shape == (32, 4, 8)
  np.testing.assert_allclose(
      back["dense"]["kernel"], p["dense"]["kernel"], atol=report["max_abs_error"] + 1e-7
  )
  assert report["quantized_leaves"] == 2 and report["bytes_after"] == tree_bytes(qp)
  big = {"w": np.random.default_rng(1).normal(size=(512, 256)).astype(np.float32)}
  assert (
      abs(quantize_int8(big)[1]["size_reduction"] - 0.75) < 0.01
  )  # float32 -> int8 + one scale per channel


def test_zero_channel_and_double_quantisation():
  w = np.zeros((16, 16), np.float32)
  w[:, 3] = 1.0
  qp, _ = quantize_int8({"w": w}, min_size=1)
  np.testing.assert_array_equal(dequantize(qp)["w"], w)
  with pytest.raises(ValueError, match="already quantised"):
    quantize_int8(qp)


# ---------------------------------------------------------------- int4 (packed) and per-group scales
from nexus_jax.inference import quantize  # noqa: E402
from nexus_jax.inference.quantize import pack_int4, unpack_int4  # noqa: E402


@pytest.mark.parametrize("channels", [1, 6, 7])
def test_pack_unpack_round_trip_exact(channels):
  import jax.numpy as jnp

  q = np.random.default_rng(channels).integers(-8, 8, size=(5, 3, channels)).astype(np.int8)
  q[0, 0, :] = -8
  q[0, 1, :] = 7
  packed = pack_int4(q)
  assert packed.dtype == np.uint8 and packed.shape == (5, 3, (channels + 1) // 2)
  np.testing.assert_array_equal(unpack_int4(packed, channels), q)
  np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), channels, jnp)), q)
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    pack_int4(np.array([[8]]))


@pytest.mark.parametrize("shape,group", [((64, 32), 16), ((2, 32, 4, 7), 64), ((128, 5), 128)])
def test_int4_group_scales_and_error_bound(shape, group):
  w = np.random.default_rng(0).standard_t(3, size=shape).astype(np.float32)
  q = quantize_leaf(w, bits=4, group_size=group)
  rows, c = w.size // shape[-1], shape[-1]
  assert set(q) == {"int4", "scale"} and q["int4"].shape == shape[:-1] + ((c + 1) // 2,)
  assert q["scale"].shape == (rows // group, c)
  w2 = w.reshape(rows // group, group, c)
  np.testing.assert_allclose(q["scale"], np.abs(w2).max(1) / 7, rtol=1e-6)
  ints = unpack_int4(q["int4"], c).reshape(rows // group, group, c)
  assert ints.min() >= -7 and ints.max() <= 7
  assert np.all(np.abs(ints).max(1) == 7)  # every (group, channel) uses the full range
  back = dequantize({"w": q})["w"]
  assert back.shape == shape and back.dtype == np.float32
  err = np.abs(back - w).reshape(rows // group, group, c)
  assert np.all(err <= q["scale"][:, None, :] / 2 + 1e-6)


def test_byte_counts_and_report():
  w = np.random.default_rng(1).normal(size=(512, 256)).astype(np.float32)
  p = {"w": w, "b": np.zeros(256, np.float32)}
  f32 = 512 * 256 * 4 + 256 * 4
  q8, r8 = quantize(p, bits=8)
  q4, r4 = quantize(p, bits=4, group_size=64)
  q4b, r4b = quantize(p, bits=4, group_size=128)
  assert r8["bytes_before"] == f32 == tree_bytes(p)
  assert r8["bytes_after"] == tree_bytes(q8) == 512 * 256 + 256 * 4 + 256 * 4
  assert r4["bytes_after"] == tree_bytes(q4) == 512 * 128 + (512 // 64) * 256 * 4 + 256 * 4
  assert r4b["bytes_after"] == 512 * 128 + (512 // 128) * 256 * 4 + 256 * 4
  assert r4["size_reduction"] > 0.85 and r4["bits"] == 4 and r4["group_size"] == 64
  assert 0.4 < r4["max_error_over_scale"] <= 0.5 and r4["max_abs_error"] > r8["max_abs_error"]
  assert quantize(p, bits=4)[1]["group_size"] == 64  # int4 default group
  # int8 with groups: finer scales, smaller error, a few more bytes
  q8g, r8g = quantize(p, bits=8, group_size=64)
  assert q8g["w"]["scale"].shape == (8, 256) and r8g["max_abs_error"] <= r8["max_abs_error"]
  np.testing.assert_allclose(dequantize(q8g)["w"], w, atol=r8g["max_abs_error"] + 1e-7)
  import jax  # the jnp path (used under jit) equals the numpy path

  traced = jax.jit(dequantize)(jax.device_put({"q4": q4["w"], "q8": q8["w"], "q8g": q8g["w"]}))
  for name, q in (("q4", q4), ("q8", q8), ("q8g", q8g)):
    np.testing.assert_allclose(np.asarray(traced[name]), dequantize(q)["w"], rtol=1e-6)


def test_fallback_bad_arguments_and_double_quantisation():
  rng = np.random.default_rng(2)
  p = {
      "a": rng.normal(size=(128, 16)).astype(np.float32),
      "odd": rng.normal(size=(96, 16)).astype(np.float32),
  }
  qp, report = quantize(p, bits=4, group_size=64, min_size=1)
  assert "int4" in qp["a"] and "int8" in qp["odd"] and report["fallback"] == ["/odd"]
  np.testing.assert_allclose(dequantize(qp)["odd"], p["odd"], atol=report["max_abs_error"] + 1e-7)
  for bits in (3, 16, True, "4"):
    with pytest.raises(ValueError, match="choose 8 or 4"):
      quantize(p, bits=bits)
  for group in (0, -64, 1.5, "64", True):
    with pytest.raises(ValueError, match="positive integer"):
      quantize(p, bits=4, group_size=group)
  with pytest.raises(ValueError, match="does not divide the 96 rows"):
    quantize_leaf(p["odd"], bits=4, group_size=64)
  with pytest.raises(ValueError, match="already quantised"):
    quantize(qp, bits=4)


def test_bfloat16_params_are_quantised_and_restored_in_bfloat16():
  import jax.numpy as jnp

  w = jnp.asarray(np.random.default_rng(3).normal(size=(128, 64)), jnp.bfloat16)
  qp, report = quantize({"w": w, "step": np.int32(3)}, bits=4, group_size=32)
  assert report["quantized_leaves"] == 1 and report["kept_leaves"] == 1
  back = dequantize(qp, dtype=jnp.bfloat16)["w"]
  assert back.dtype == jnp.bfloat16 and back.shape == (128, 64)
  rounding = float(np.abs(np.asarray(w, np.float32)).max()) * 2.0**-8  # bfloat16's own rounding
  assert np.all(
      np.abs(np.asarray(back, np.float32) - np.asarray(w, np.float32))
      <= report["max_abs_error"] + rounding
  )


def test_tiny_lm_dequantised_inside_jit_output_change_bounded():
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen as nn
  from nexus_jax.models.lm import LanguageModel

  model = LanguageModel(
      vocab_size=64,
      num_layers=1,
      embed_dim=64,
      num_heads=2,
      num_kv_heads=1,
      mlp_dim=64,
      num_experts=0,
  )
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])

  @jax.jit
  def loss_fn(qparams, tokens):  # dequantises on the fly: the stored tree is the quantised one
    logits, _ = model.apply({"params": dequantize(qparams)}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits

  base_loss, base_logits = loss_fn(params, tokens)
  changes = {}
  for bits, group in ((8, None), (4, 32)):
    qp, report = quantize(params, bits=bits, group_size=group, min_size=1024)
    assert report["fallback"] == [] and report["quantized_leaves"] >= 6
    loss, logits = loss_fn(jax.device_put(qp), tokens)
    rel = float(jnp.linalg.norm(logits - base_logits) / jnp.linalg.norm(base_logits))
    changes[bits] = rel
    assert abs(float(loss - base_loss)) < (0.01 if bits == 8 else 0.05)
  # random weights: int4 (qmax 7) errs ~127/7 times more than int8 per scale, groups win some back
  assert changes[8] < 0.02 and changes[4] < 0.3 and changes[8] < changes[4]
