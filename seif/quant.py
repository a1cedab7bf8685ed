"""Dequantization of the quantized weight encodings a SEIF tensor may carry (spec §3.3).

Converters pass quantized weights through byte for byte; these functions exist for consumers
that want real values (`--dtype bf16`, the reference forward on a quantized checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import FormatError
from .manifest import Quantization

# FP4 E2M1 code -> value; bit 3 is the sign (OCP Microscaling spec, as gpt-oss publishes).
_FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                      -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def dequantize(stored: np.ndarray, q: Quantization, get: Callable[[str], np.ndarray],
               name: str = "") -> np.ndarray:
    """Real float32 values of a quantized tensor; `get` fetches companion tensors by name."""
    scale = np.asarray(get(q.scale)).astype(np.float32)
    if q.scheme == "fp8-block":
        out = _fp8_block(stored, scale, q.block)
    elif q.scheme == "mxfp4":
        out = _mxfp4(stored, np.asarray(get(q.scale)))
    else:
        zero = np.asarray(get(q.zero_point)).astype(np.float32) if q.zero_point else None
        out = _int_group(stored, scale, zero, q.bits, q.group_size, q.logical_shape)
    if list(out.shape) != list(q.logical_shape):
        raise FormatError(f"dequantized shape {list(out.shape)} != logical_shape "
                          f"{q.logical_shape}", field=name)
    return out


def _expand(scale: np.ndarray, block: list[int], shape: tuple[int, ...]) -> np.ndarray:
    rows, cols = shape[-2:]
    need = (-(-rows // block[0]), -(-cols // block[1]))
    if scale.shape[-2:] != need:
        raise FormatError(f"scale shape {list(scale.shape)} does not tile {list(shape)} in "
                          f"{block} blocks (needs {list(need)})")
    # Index arrays, not np.repeat: the work is bounded by the real tensor, never by the block
    # size a (possibly hostile) descriptor claims.
    row = np.arange(rows) // block[0]
    col = np.arange(cols) // block[1]
    return scale[..., row[:, None], col[None, :]]


def _fp8_block(weight: np.ndarray, scale: np.ndarray, block: list[int]) -> np.ndarray:
    return weight.astype(np.float32) * _expand(scale, block, weight.shape)


def _mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    if blocks.dtype != np.uint8 or blocks.shape[-1] != 16:
        raise FormatError("mxfp4 blocks must be U8 [..., groups, 16]")
    if scales.shape != blocks.shape[:-1]:
        raise FormatError(f"mxfp4 scales {list(scales.shape)} do not match blocks "
                          f"{list(blocks.shape)}")
    low = _FP4_E2M1[blocks & 0x0F]
    high = _FP4_E2M1[blocks >> 4]
    values = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 32)
    raw = scales.view(np.uint8)
    scale = np.ldexp(np.float32(1), raw.astype(np.int32) - 127).astype(np.float32)
    scale[raw == 255] = np.nan  # E8M0's one NaN encoding (spec §3.3.3)
    values = values * scale[..., None]
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def _int_group(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int,
               group: int, logical: list[int]) -> np.ndarray:
    if bits == 4:
        if q.dtype != np.uint8:
            raise FormatError("int4 values are packed two per U8 byte")
        low = (q & 0x0F).astype(np.int16)
        high = (q >> 4).astype(np.int16)
        values = np.stack([low, high], axis=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)
        if zero is None:  # symmetric: two's complement nibbles
            values = np.where(values >= 8, values - 16, values)
    else:
        values = q.astype(np.int16)
    values = values[..., :logical[-1]].astype(np.float32)
    groups = -(-values.shape[-1] // group)
    if scale.shape[-1] != groups:
        raise FormatError(f"scale has {scale.shape[-1]} groups, the tensor needs {groups}")
    which = np.arange(values.shape[-1]) // group  # bounded by the real tensor (see _expand)
    if zero is not None:
        if zero.shape != scale.shape:
            raise FormatError(f"zero point {list(zero.shape)} and scale {list(scale.shape)} "
                              "differ in shape")
        values = values - zero[..., which]
    return values * scale[..., which]
