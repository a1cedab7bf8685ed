"""The CPU kernels of `libseif_ort.so` called directly through its small C ABI (ctypes).

The custom-op library that ONNX Runtime loads also exports `seif_experts_forward`
(runtime/csrc/c_api.cpp): the routed experts' FFN on rows sorted by expert, with the library's
AVX-512 / AVX2 GEMMs, SwiGLU in float64 rounded once, and results that do not depend on the
thread count. `seif.converters.torch.SparseMoE` uses it on CPU (its "native" dispatch) because
torch's small-row CPU matmuls run far below memory bandwidth, bf16 especially. Two more entry
points: `seif_moe_experts` (the experts on assignments routed and sorted by the caller,
gathered and combined in C) and `seif_moe_forward` (the whole SeifMoE operator, routing and
shared experts included, as ONNX Runtime runs it).

Standard library + ctypes (and, for `moe_forward`, the operator's input names from
seif.converters.onnx, which needs numpy only); the library is loaded once, on first use.
Loading it here and registering it with ONNX Runtime in the same process is fine (the dynamic
loader maps it once).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from seif.errors import SeifError

from .library import library_path

__all__ = ["ABI_VERSION", "NativeError", "View", "available", "experts_forward", "moe_experts",
           "moe_forward"]

ABI_VERSION = 3

# seif::DType codes (runtime/csrc/seif_kernels.h).
WEIGHT_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


class NativeError(SeifError):
    """A call into the native library was refused (bad arguments) or failed in C++."""


@dataclass(frozen=True)
class View:
    """A CPU array as the C ABI sees it: its address, shape, element type and whether it is
    contiguous (row-major). Built by the caller from a torch tensor or a NumPy array, so this
    module needs neither."""

    address: int
    shape: tuple[int, ...]
    dtype: str
    contiguous: bool

    @classmethod
    def of_numpy(cls, a) -> View:
        """The view of a NumPy array (ml_dtypes bfloat16 included)."""
        return cls(int(a.ctypes.data), tuple(int(s) for s in a.shape), a.dtype.name,
                   bool(a.flags.c_contiguous))


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _bind(lib: ctypes.CDLL) -> bool:
    """Declare the functions' types; False when this build lacks the C ABI (an older library)."""
    try:
        version = lib.seif_c_api_version
        forward = lib.seif_experts_forward
        combined = lib.seif_moe_experts
        whole = lib.seif_moe_forward
        last_error = lib.seif_last_error
    except AttributeError:
        return False
    version.restype, version.argtypes = ctypes.c_int, []
    if version() != ABI_VERSION:
        return False
    last_error.restype, last_error.argtypes = ctypes.c_char_p, []
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    forward.restype = ctypes.c_int
    forward.argtypes = [p, i64, i64, i64, p, i64, p, p, p, p, p, p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_double, ctypes.c_double, p, ctypes.c_int]
    combined.restype = ctypes.c_int
    combined.argtypes = [p, i64, i64, i64, p, p, ctypes.c_int, i64, p, i64, p, p, p, p, p, p,
                         ctypes.c_int, ctypes.c_char_p, ctypes.c_double, ctypes.c_double, p,
                         ctypes.c_int]
    whole.restype = ctypes.c_int
    whole.argtypes = [ctypes.c_char_p, ctypes.c_int, p, p, p, p, p, ctypes.c_int]
    return True


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                path = library_path()
                lib = None
                if path is not None:
                    try:
                        lib = ctypes.CDLL(str(path))
                    except OSError:
                        lib = None
                _lib = lib if lib is not None and _bind(lib) else None
                _tried = True
    return _lib


def available() -> bool:
    """Whether the library is built, loads, and has this C ABI."""
    return _library() is not None


def _check(name: str, v: View | None, shape: tuple[int, ...], dtypes: tuple[str, ...],
           optional: bool = False) -> int | None:
    if v is None:
        if optional:
            return None
        raise NativeError(f"{name} is required")
    if v.dtype not in dtypes:
        raise NativeError(f"{name} is {v.dtype}; expected {' or '.join(dtypes)}")
    if v.shape != shape:
        raise NativeError(f"{name} is {list(v.shape)}; expected {list(shape)}")
    if not v.contiguous:
        raise NativeError(f"{name} is not contiguous")
    return v.address


def experts_forward(x: View, counts: View, up: View, down: View, out: View, *,
                    gate: View | None = None, gate_bias: View | None = None,
                    up_bias: View | None = None, down_bias: View | None = None,
                    activation: str = "swiglu", alpha: float = 1.702, limit: float = 7.0,
                    threads: int = 1) -> None:
    """out[r] = down_e(act(gate_e x[r] + gb_e, up_e x[r] + ub_e)) + db_e for the counts[e]
    consecutive rows r of each expert e. x, out: [N, H] float32; counts: [E] int64 summing to
    N; up/gate: [E, I, H], down: [E, H, I], biases [E, I] / [E, H], all one weight dtype
    (float32, bfloat16 or float16), all contiguous. The C side re-checks what it can see (the
    counts, the activation); anything refused raises NativeError."""
    lib = _loaded()
    if len(x.shape) != 2:
        raise NativeError(f"x must be [N, H]; got {list(x.shape)}")
    N, H = x.shape
    E, weights = _weights(counts, up, down, gate, gate_bias, up_bias, down_bias, H)
    args = [_check("x", x, (N, H), ("float32",)), N, H, up.shape[1], weights[0], E,
            *weights[1:], WEIGHT_DTYPES[up.dtype], activation.encode(), float(alpha),
            float(limit), _check("out", out, (N, H), ("float32",)), max(1, int(threads))]
    _succeed(lib, lib.seif_experts_forward(*args))


def moe_experts(x: View, tokens: View, weights: View | None, counts: View, up: View, down: View,
                out: View, *, weight_on_input: bool = False, gate: View | None = None,
                gate_bias: View | None = None, up_bias: View | None = None,
                down_bias: View | None = None, activation: str = "swiglu", alpha: float = 1.702,
                limit: float = 7.0, threads: int = 1) -> None:
    """The experts on gathered tokens, added into `out`: for each assignment r (sorted by
    expert, counts[e] each), out[tokens[r]] += weights[r] * FFN_e(x[tokens[r]]) (the weight on
    the expert's input instead with `weight_on_input`; weights None = 1), a token's terms in
    increasing r. x, out: [T, H] float32; tokens [N] int64; weights [N] float32. Gathering and
    combining in C keeps torch ops (and their OpenMP threads) out of the expert phase."""
    lib = _loaded()
    if len(x.shape) != 2 or len(tokens.shape) != 1:
        raise NativeError(f"x must be [T, H] and tokens [N]; got {list(x.shape)}, "
                          f"{list(tokens.shape)}")
    (T, H), N = x.shape, tokens.shape[0]
    E, wts = _weights(counts, up, down, gate, gate_bias, up_bias, down_bias, H)
    args = [_check("x", x, (T, H), ("float32",)), T, H, up.shape[1],
            _check("tokens", tokens, (N,), ("int64",)),
            _check("weights", weights, (N,), ("float32",), optional=True),
            int(bool(weight_on_input)), N, wts[0], E, *wts[1:], WEIGHT_DTYPES[up.dtype],
            activation.encode(), float(alpha), float(limit),
            _check("out", out, (T, H), ("float32",)), max(1, int(threads))]
    _succeed(lib, lib.seif_moe_experts(*args))


def moe_forward(attributes: Mapping[str, object], inputs: Mapping[str, View | None], out: View,
                *, threads: int = 1) -> None:
    """The whole ai.seif SeifMoE operator in-process: the kernel ONNX Runtime runs for it, on
    the same inputs (same bits), routing and shared experts included. `attributes`: the node's
    attributes (`seif.converters.onnx.layer_attributes`); `inputs`: by SeifMoE input name
    (`seif.converters.onnx.MOE_INPUTS`, the operator's order), absent ones None or left out;
    `out`: [N, H] contiguous, of hidden_states' dtype. The C side checks the shapes against
    the attributes as the operator does; anything refused raises NativeError."""
    from seif.converters.onnx import MOE_INPUTS  # numpy only; no onnx import
    lib = _loaded()
    unknown = set(inputs) - set(MOE_INPUTS)
    if unknown:
        raise NativeError(f"unknown SeifMoE inputs {sorted(unknown)}")
    n = len(MOE_INPUTS)
    data = (ctypes.c_void_p * n)()
    dtypes, ranks = (ctypes.c_int * n)(), (ctypes.c_int * n)()
    shapes = (ctypes.c_int64 * (3 * n))()
    for i, name in enumerate(MOE_INPUTS):
        v = inputs.get(name)
        if v is None:
            continue
        if v.dtype not in WEIGHT_DTYPES or not v.contiguous or not 1 <= len(v.shape) <= 3:
            raise NativeError(f"{name} must be a contiguous float32, float16 or bfloat16 array "
                              f"of 1-3 dimensions; got {v.dtype} {list(v.shape)}")
        if v.address == 0:
            raise NativeError(f"{name} has no data (an empty array)")
        data[i], dtypes[i], ranks[i] = v.address, WEIGHT_DTYPES[v.dtype], len(v.shape)
        shapes[3 * i:3 * i + len(v.shape)] = v.shape
    x = inputs.get("hidden_states")
    if x is None or len(x.shape) != 2:
        raise NativeError("hidden_states [N, H] is required")
    _check("out", out, x.shape, (x.dtype,))
    _succeed(lib, lib.seif_moe_forward(_attribute_text(attributes), n, data, dtypes, shapes,
                                       ranks, out.address, max(1, int(threads))))


def _attribute_text(attributes: Mapping[str, object]) -> bytes:
    """"name=value;..." for the C side; floats in repr (read back as float32 there, as ONNX
    stores float attributes)."""
    items = []
    for name, value in attributes.items():
        text = repr(value) if isinstance(value, float) else str(value)
        if any(c in text or c in name for c in ";="):
            raise NativeError(f"attribute {name}={text!r} contains ';' or '='")
        items.append(f"{name}={text}")
    return ";".join(items).encode()


def _succeed(lib: ctypes.CDLL, status: int) -> None:
    """A C call's status: non-zero raises NativeError with the library's message."""
    if status != 0:
        raise NativeError(lib.seif_last_error().decode(errors="replace"))


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise NativeError("the native library (libseif_ort.so with the C API) is not available; "
                          "build it with `make native`")
    return lib


def _weights(counts: View, up: View, down: View, gate: View | None, gate_bias: View | None,
             up_bias: View | None, down_bias: View | None, H: int) -> tuple[int, list]:
    """E and the checked addresses [counts, gate, up, down, gate_bias, up_bias, down_bias]."""
    if len(up.shape) != 3:
        raise NativeError(f"up must be [E, I, H]; got {list(up.shape)}")
    E, I = up.shape[0], up.shape[1]
    wt = up.dtype
    if wt not in WEIGHT_DTYPES:
        raise NativeError(f"expert weights are {wt}; expected float32, bfloat16 or float16")
    return E, [
        _check("counts", counts, (E,), ("int64",)),
        _check("gate", gate, (E, I, H), (wt,), optional=True),
        _check("up", up, (E, I, H), (wt,)),
        _check("down", down, (E, H, I), (wt,)),
        _check("gate_bias", gate_bias, (E, I), (wt,), optional=True),
        _check("up_bias", up_bias, (E, I), (wt,), optional=True),
        _check("down_bias", down_bias, (E, H), (wt,), optional=True),
    ]
