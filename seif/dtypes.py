"""Mapping between safetensors dtype names and NumPy dtypes.

bfloat16 and the float8 formats come from ``ml_dtypes`` (the same package JAX uses), so
arrays read from SEIF keep their exact bits without a float32 detour.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import FormatError

# safetensors dtype name -> numpy dtype. Order is the spec's table order.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})

# User-facing aliases accepted on the CLI (`--dtype bf16`).
ALIASES = {
    "float64": "F64", "fp64": "F64", "f64": "F64",
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}

_BY_NUMPY = {v: k for k, v in DTYPES.items()}


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return to_numpy(name).itemsize


def to_numpy(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def from_numpy(dtype: np.dtype) -> str:
    try:
        return _BY_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise FormatError(f"NumPy dtype {np.dtype(dtype)} has no SEIF/safetensors name") from None


def normalize_name(name: str) -> str:
    """Accept `bf16`, `bfloat16`, `BF16` ... and return the canonical safetensors name."""
    upper = name.upper()
    if upper in DTYPES:
        return upper
    try:
        return ALIASES[name.lower()]
    except KeyError:
        known = ", ".join(sorted(ALIASES))
        raise FormatError(f"unknown dtype {name!r}; use one of {known}") from None
