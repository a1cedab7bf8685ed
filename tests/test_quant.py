"""Dequantization of fp8-block, mxfp4 and int-group tensors, on hand-computed values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import seif
from seif.manifest import Quantization
from seif.quant import dequantize


def test_fp8_block_with_partial_blocks():
    w = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]], np.float32)
    scale = np.array([[1, 2], [3, 4]], np.float32)
    q = Quantization("fp8-block", [3, 4], "s", block=[2, 2])
    got = dequantize(w.astype(ml_dtypes.float8_e4m3fn), q, {"s": scale}.__getitem__)
    expected = [[1, 2, 6, 8], [5, 6, 14, 16], [3, 3, 4, 4]]
    np.testing.assert_array_equal(got, expected)


def test_mxfp4_nibbles_and_scales():
    blocks = np.zeros((1, 2, 16), np.uint8)
    blocks[0, 0, 0] = 0x21   # low nibble 1 -> 0.5, high nibble 2 -> 1.0
    blocks[0, 1, 0] = 0x9F   # low F -> -6.0, high 9 -> -0.5
    scales = np.array([[128, 125]], np.uint8)  # 2^1 and 2^-2
    q = Quantization("mxfp4", [1, 64], "s")
    got = dequantize(blocks, q, {"s": scales}.__getitem__)
    assert got.shape == (1, 64)
    assert got[0, 0] == 1.0 and got[0, 1] == 2.0
    assert got[0, 32] == -1.5 and got[0, 33] == -0.125
    assert np.count_nonzero(got) == 4


def test_int4_symmetric_and_int8_zero_point():
    packed = np.array([[0xF1, 0x72]], np.uint8)    # values 1, -1, 2, 7
    q = Quantization("int-group", [1, 4], "s", group_size=2, bits=4)
    got = dequantize(packed, q, {"s": np.array([[0.5, 2.0]], np.float32)}.__getitem__)
    np.testing.assert_array_equal(got, [[0.5, -0.5, 4.0, 14.0]])
    q8 = Quantization("int-group", [1, 3], "s", group_size=3, bits=8, zero_point="z")
    comp = {"s": np.array([[0.25]], np.float32), "z": np.array([[2]], np.float32)}
    got8 = dequantize(np.array([[2, 6, -2]], np.int8), q8, comp.__getitem__)
    np.testing.assert_array_equal(got8, [[0.0, 1.0, -1.0]])


def test_mismatched_scale_is_a_format_error():
    q = Quantization("fp8-block", [4, 4], "s", block=[2, 2])
    w = np.zeros((4, 4), ml_dtypes.float8_e4m3fn)
    with pytest.raises(seif.FormatError, match="tile"):
        dequantize(w, q, {"s": np.ones((3, 2), np.float32)}.__getitem__)


def test_quantized_checkpoint_passes_through_and_dequantizes(tmp_path):
    """An fp8-block weight is stored byte for byte, declared as a required feature, read back
    dequantized, and `--dtype` conversion folds the scale in."""
    w = (np.arange(16, dtype=np.float32).reshape(4, 4) / 4).astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[2.0, 1.0], [0.5, 4.0]], np.float32)
    q = Quantization("fp8-block", [4, 4], "dense.weight_scale_inv", block=[2, 2])
    path = seif.save(tmp_path / "q.seif", {"dense.weight": w, "dense.weight_scale_inv": scale},
                     quantization={"dense.weight": q})
    ckpt = seif.open(path)
    assert "quant.fp8-block" in ckpt.manifest.required_features
    assert ckpt.tensor("dense.weight").tobytes() == w.tobytes()
    real = ckpt.dequantized("dense.weight")
    assert real[0, 3] == w.astype(np.float32)[0, 3] * 1.0
    assert real[3, 0] == w.astype(np.float32)[3, 0] * 0.5
    from seif.convert import convert
    out = seif.open(convert(path, tmp_path / "f32.seif", dtype="f32"))
    assert out.tensor_names() == ["dense.weight"]
    np.testing.assert_array_equal(out.tensor("dense.weight"), real)


def test_mxfp4_scale_255_is_nan():
    blocks = np.full((1, 1, 16), 0x22, np.uint8)  # every value 1.0
    q = Quantization("mxfp4", [1, 32], "s")
    got = dequantize(blocks, q, {"s": np.array([[255]], np.uint8)}.__getitem__)
    assert np.isnan(got).all()
    got = dequantize(blocks, q, {"s": np.array([[254]], np.uint8)}.__getitem__)
    assert (got == 2.0**127).all()
