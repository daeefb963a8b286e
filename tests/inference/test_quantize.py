"""INT8 weight-only quantisation: per-channel scales, error bound, size, structure, refusal to double-quantise."""

import numpy as np
import pytest

from nexus_jax.inference import dequantize, is_quantized, quantize_int8, tree_bytes
from nexus_jax.inference.quantize import quantize_leaf


def params(seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": rng.normal(size=(64, 32)).astype(np.float32) * np.linspace(0.1, 3, 32, dtype=np.float32),
                      "bias": rng.normal(size=(32,)).astype(np.float32)},
            "attn": {"kernel": rng.normal(size=(32, 4, 8)).astype(np.float32)},
            "tiny": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)},
            "step": np.array(3, np.int32)}


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
    assert not is_quantized(qp["tiny"]["kernel"])            # below min_size
    assert qp["dense"]["bias"] is p["dense"]["bias"] and qp["step"] is p["step"]   # vectors / ints untouched
    assert qp["attn"]["kernel"]["scale"].shape == (1, 1, 8)
    back = dequantize(qp)
    assert back["dense"]["kernel"].dtype == np.float32 and back["attn"]["kernel"].shape == (32, 4, 8)
    np.testing.assert_allclose(back["dense"]["kernel"], p["dense"]["kernel"], atol=report["max_abs_error"] + 1e-7)
    assert report["quantized_leaves"] == 2 and report["bytes_after"] == tree_bytes(qp)
    big = {"w": np.random.default_rng(1).normal(size=(512, 256)).astype(np.float32)}
    assert abs(quantize_int8(big)[1]["size_reduction"] - 0.75) < 0.01   # float32 -> int8 + one scale per channel


def test_zero_channel_and_double_quantisation():
    w = np.zeros((16, 16), np.float32)
    w[:, 3] = 1.0
    qp, _ = quantize_int8({"w": w}, min_size=1)
    np.testing.assert_array_equal(dequantize(qp)["w"], w)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int8(qp)
