"""SEIF <-> JAX / Flax: stacked-expert params, expert-sharded loading, a jit-able MoE forward.

JAX users keep the experts of a layer *stacked* (one `[E, ...]` array per projection) and shard
them over an ``expert`` mesh axis, so that is the in-memory form here, in Flax's ``[in, out]``
kernel convention::

    params = {
      "router":  {"kernel": [H, E] (soft_moe: [H, E*S]), "bias": [E], "selection_bias": [E]},
      "experts": {"gate": {"kernel": [E, H, I], "bias": [E, I]},     # gated activations only
                  "up":   {"kernel": [E, H, I], "bias": [E, I]},
                  "down": {"kernel": [E, I, H], "bias": [E, H]}},   # biases only if ffn.bias
      "shared_experts": {same, stacked over the S shared experts},  # if the layer has them
      "shared_gate": {"kernel": [H, 1]},                            # if they are gated
      "output_bias": {"bias": [H]},                 # SEIF 1.1 layer output bias (JetMoE)
    }

SEIF stores experts one by one in torch's ``[out, in]`` orientation; loading transposes and
stacks, saving un-stacks and transposes back. A transpose is a pure permutation of elements, so
SEIF -> JAX -> SEIF is byte-identical for every dtype (bf16 included).

With a ``mesh``, :func:`load` builds each stacked array with ``jax.make_array_from_callback``
and a ``NamedSharding`` over the expert axis: every callback reads (``Checkpoint.tensor``, i.e.
``pread`` of exactly those bytes) only the experts of its own index slice, so a device's shard
costs its own experts' bytes and nothing else, on one host or many (``jax.distributed`` calls
the callbacks of addressable devices only).

:func:`moe_apply` is the routing pipeline of ``seif.routing.route`` / ``seif.moe.moe_forward``
written in ``jax.numpy`` (same step order, fp32 router, lower-index ties, NaN first, -0.0 ==
+0.0), with token-choice dispatch done as a sorted grouped matmul (``jax.lax.ragged_dot``), not a
dense all-experts product. ``import seif`` never imports this module; it imports JAX itself.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seif import dtypes
from seif.errors import ConversionError, FormatError, RoutingError, SeifError
from seif.manifest import LayerSpec, ModelInfo
from seif.progress import byte_progress

__all__ = [
    "StaticLayer",
    "from_flax",
    "grouped_matmul",
    "load",
    "load_dense",
    "load_layer",
    "moe_apply",
    "params_to_tensors",
    "register",
    "save",
    "static",
    "tensors_to_params",
    "to_flax",
]

MSGPACK_FORMAT = "seif-flax"
MSGPACK_VERSION = 1
_CASTABLE = {"F64", "F32", "F16", "BF16"}
_PROJ_AXES = {"gate": "HI", "up": "HI", "down": "IH"}


# =========================================================================== static config
@dataclass(frozen=True)
class StaticLayer:
    """A hashable, immutable stand-in for a `LayerSpec`, for `jax.jit(static_argnames=...)`
    and Flax NNX graph definitions (both hash their static parts; `LayerSpec` is a mutable
    dataclass and so unhashable). Equality is equality of the canonical JSON descriptor."""

    descriptor: str

    @property
    def layer(self) -> LayerSpec:
        return _parse_layer(self.descriptor)


@functools.lru_cache(maxsize=256)
def _parse_layer(descriptor: str) -> LayerSpec:
    return LayerSpec.from_dict(json.loads(descriptor), "layer")


def static(layer: LayerSpec | StaticLayer) -> StaticLayer:
    """`layer` as a hashable static argument."""
    if isinstance(layer, StaticLayer):
        return layer
    return StaticLayer(json.dumps(layer.to_dict(), sort_keys=True))


def _as_layer(layer: LayerSpec | StaticLayer) -> LayerSpec:
    if isinstance(layer, StaticLayer):
        return layer.layer
    if isinstance(layer, LayerSpec):
        return layer
    raise RoutingError(f"expected a LayerSpec or StaticLayer, got {type(layer).__name__}")


# =========================================================================== params <-> tensors
def _ffn_names(layer: LayerSpec, shared: bool) -> list[tuple[str, str, Callable[[int, str], str]]]:
    """(projection, part, index -> canonical name) of one stacked FFN group."""
    ffn = layer.shared_experts.ffn if shared else layer.experts
    out = []
    for proj in ffn.projections:
        for part in ("weight", "bias") if ffn.bias else ("weight",):
            if shared:
                out.append((proj, part, lambda i, p=proj, q=part: layer.shared_name(i, p, q)))
            else:
                out.append((proj, part, lambda i, p=proj, q=part: layer.expert_name(i, p, q)))
    return out


def _stack(get: Callable[[str], np.ndarray], names: list[str], part: str) -> np.ndarray:
    """Per-expert [out, in] weights -> one [n, in, out] array (biases just stack)."""
    arrays = [get(n) for n in names]
    if len({a.dtype for a in arrays}) > 1:
        raise ConversionError(f"{names[0]} and its siblings have different dtypes; stacking "
                              "needs one (pass dtype= to cast)")
    if part == "weight":
        arrays = [a.T for a in arrays]
    if not arrays:
        return np.zeros((0,), np.float32)
    return np.ascontiguousarray(np.stack(arrays))


def tensors_to_params(layer: LayerSpec, get: Callable[[str], np.ndarray]) -> dict:
    """One layer's params pytree (NumPy leaves) from canonical SEIF tensors read via `get`."""
    r = layer.routing
    router = {"kernel": np.ascontiguousarray(get(layer.router_name()).T)}
    if r.router_bias:
        router["bias"] = get(layer.router_name("bias"))
    if r.selection_bias:
        router["selection_bias"] = get(layer.router_name("selection_bias"))
    params: dict[str, Any] = {"router": router}

    def group(shared: bool, count: int) -> dict:
        out: dict[str, dict] = {}
        for proj, part, name in _ffn_names(layer, shared):
            key = "kernel" if part == "weight" else "bias"
            out.setdefault(proj, {})[key] = _stack(get, [name(i) for i in range(count)], part)
        return out

    params["experts"] = group(False, layer.num_experts)
    if layer.shared_experts is not None:
        params["shared_experts"] = group(True, layer.shared_experts.count)
        if layer.shared_experts.gate:
            params["shared_gate"] = {"kernel": np.ascontiguousarray(
                get(layer.shared_gate_name()).T)}
    if layer.output_bias:
        params["output_bias"] = {"bias": get(layer.output_bias_name())}
    return params


def params_to_tensors(layer: LayerSpec, params: Mapping) -> dict[str, np.ndarray]:
    """The inverse of `tensors_to_params`: canonical SEIF name -> [out, in] NumPy array.

    Accepts NumPy or (fully addressable) JAX leaves; every per-expert slice is transposed back
    and made contiguous, so the bytes are exactly the ones that were loaded.
    """
    r = layer.routing

    def arr(tree: Mapping, *keys: str) -> np.ndarray:
        node: Any = tree
        path = []
        for k in keys:
            path.append(k)
            if not isinstance(node, Mapping) or k not in node:
                raise ConversionError(f"params of layer {layer.index} lack {'/'.join(path)}")
            node = node[k]
        return np.asarray(node)

    out = {layer.router_name(): np.ascontiguousarray(arr(params, "router", "kernel").T)}
    if r.router_bias:
        out[layer.router_name("bias")] = arr(params, "router", "bias")
    if r.selection_bias:
        out[layer.router_name("selection_bias")] = arr(params, "router", "selection_bias")

    def put(shared: bool, count: int) -> None:
        key = "shared_experts" if shared else "experts"
        for proj, part, name in _ffn_names(layer, shared):
            stacked = arr(params, key, proj, "kernel" if part == "weight" else "bias")
            if stacked.shape[0] != count:
                raise ConversionError(f"params of layer {layer.index}: {key}/{proj} stacks "
                                      f"{stacked.shape[0]}, the descriptor says {count}")
            for i in range(count):
                a = stacked[i].T if part == "weight" else stacked[i]
                out[name(i)] = np.ascontiguousarray(a)

    put(False, layer.num_experts)
    if layer.shared_experts is not None:
        put(True, layer.shared_experts.count)
        if layer.shared_experts.gate:
            out[layer.shared_gate_name()] = np.ascontiguousarray(
                arr(params, "shared_gate", "kernel").T)
    if layer.output_bias:
        out[layer.output_bias_name()] = arr(params, "output_bias", "bias")
    expected = layer.expected_tensors()
    for name, a in out.items():
        if tuple(a.shape) != expected[name]:
            raise ConversionError(f"shape {list(a.shape)}; the layer descriptor needs "
                                  f"{list(expected[name])} (after transposing to [out, in])",
                                  field=name)
    return out


# =========================================================================== loading
def _open(path_or_ckpt):
    """A `Checkpoint` and whether we opened it (callers may pass an open one, e.g. to count
    bytes with their own reader)."""
    from seif.reader import Checkpoint

    if isinstance(path_or_ckpt, Checkpoint):
        return path_or_ckpt, False
    return Checkpoint(path_or_ckpt), True


def _reader(ckpt, dtype, lock: threading.Lock, cast_router: bool = False):
    """name -> NumPy array: stored bytes (dequantized if the tensor is quantized, since a JAX
    forward needs real values), cast to `dtype` when one is given. Routers keep their dtype
    unless `cast_router`: routing is computed in fp32 anyway, and a narrowed router can choose
    different experts than the source."""
    target = np.dtype(dtypes.to_numpy(dtypes.normalize_name(dtype))) if dtype else None

    def get(name: str) -> np.ndarray:
        with lock:  # Checkpoint opens shards lazily and counts bytes; keep that consistent
            entry = ckpt.info(name)
            if entry.quantization is not None:
                a = ckpt.dequantized(name, target if target is not None else np.float32)
            else:
                a = ckpt.tensor(name)
        is_router = ".router." in name and name.startswith("layers.")
        if target is not None and a.dtype != target and (cast_router or not is_router) \
                and dtypes.from_numpy(a.dtype) in _CASTABLE:
            a = a.astype(target)
        return a

    return get


def _shardings(mesh, expert_axis: str):
    """NamedSharding per leaf: routed experts split over `expert_axis` on their stacking axis,
    everything else (router, shared experts, shared gate, output bias) replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if expert_axis not in mesh.axis_names:
        raise ConversionError(f"mesh has axes {tuple(mesh.axis_names)}, not {expert_axis!r}")

    def spec(path: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        if path[0] == "experts":
            return NamedSharding(mesh, P(expert_axis, *([None] * (len(shape) - 1))))
        return NamedSharding(mesh, P())

    return spec


def _layer_shapes(layer: LayerSpec, get_info) -> dict:
    """The params tree's shapes, from the manifest alone (no tensor data is read), so the
    sharded arrays can be declared before any callback runs."""
    def info(name):
        e = get_info(name)
        shape = tuple(e.quantization.logical_shape) if e.quantization else tuple(e.shape)
        return shape, e

    tree: dict[str, Any] = {}
    r = layer.routing
    (rows, H), _ = info(layer.router_name())
    tree["router"] = {"kernel": (H, rows)}
    if r.router_bias:
        tree["router"]["bias"] = (rows,)
    if r.selection_bias:
        tree["router"]["selection_bias"] = (layer.num_experts,)

    def group(shared: bool, count: int) -> dict:
        out: dict[str, dict] = {}
        for proj, part, name in _ffn_names(layer, shared):
            shape, _ = info(name(0))
            key = "kernel" if part == "weight" else "bias"
            out.setdefault(proj, {})[key] = (count, *shape[::-1]) if part == "weight" \
                else (count, *shape)
        return out

    tree["experts"] = group(False, layer.num_experts)
    if layer.shared_experts is not None:
        tree["shared_experts"] = group(True, layer.shared_experts.count)
        if layer.shared_experts.gate:
            tree["shared_gate"] = {"kernel": (H, 1)}
    if layer.output_bias:
        tree["output_bias"] = {"bias": (H,)}
    return tree


def _sharded_layer(ckpt, layer: LayerSpec, get, mesh, expert_axis: str) -> dict:
    """Build each leaf with make_array_from_callback: a callback materialises exactly the
    index slice it is asked for, reading only the experts inside that slice."""
    import jax

    shapes = _layer_shapes(layer, ckpt.info)
    sharding_of = _shardings(mesh, expert_axis)
    if layer.num_experts % mesh.shape[expert_axis]:
        raise ConversionError(f"layer {layer.index}: {layer.num_experts} experts do not split "
                              f"over the {mesh.shape[expert_axis]} devices of mesh axis "
                              f"{expert_axis!r}")
    names_of = {}
    for shared, count, key in ((False, layer.num_experts, "experts"),
                               (True, layer.shared_experts.count if layer.shared_experts
                                else 0, "shared_experts")):
        if key not in shapes:
            continue
        for proj, part, name in _ffn_names(layer, shared):
            names_of[(key, proj, "kernel" if part == "weight" else "bias")] = \
                ([name(i) for i in range(count)], part)

    def small(path: tuple[str, ...]) -> np.ndarray:
        """Router, shared-gate and output-bias leaves: one small tensor, read whole."""
        if path[0] == "output_bias":
            return get(layer.output_bias_name())
        if path[0] == "router":
            name = layer.router_name({"kernel": "weight"}.get(path[1], path[1]))
            a = get(name)
            return np.ascontiguousarray(a.T) if path[1] == "kernel" else a
        return np.ascontiguousarray(get(layer.shared_gate_name()).T)

    def build(path: tuple[str, ...], shape: tuple[int, ...]):
        sharding = sharding_of(path, shape)
        cache: dict[tuple, np.ndarray] = {}
        if path in names_of:
            names, part = names_of[path]

            def read(lo: int, hi: int) -> np.ndarray:
                return _stack(get, names[lo:hi], part)
        else:
            whole = small(path)

            def read(lo: int, hi: int) -> np.ndarray:
                return whole[lo:hi]

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            lo, hi, _ = index[0].indices(shape[0])
            key = (lo, hi)
            if key not in cache:  # replicas of one slice (other mesh axes) read it once
                cache[key] = read(lo, hi)
            return cache[key][(slice(None), *index[1:])]

        return jax.make_array_from_callback(shape, sharding, callback)

    out: dict[str, Any] = {}
    for key, sub in shapes.items():
        out[key] = {}
        for k2, v in sub.items():
            if isinstance(v, dict):
                out[key][k2] = {k3: build((key, k2, k3), s) for k3, s in v.items()}
            else:
                out[key][k2] = build((key, k2), v)
    return out


def load(path, layers: Iterable[int] | None = None, dtype: str | None = None, mesh=None,
         expert_axis: str = "expert") -> dict[int, tuple[dict, LayerSpec]]:
    """{layer index: (params, LayerSpec)} for the MoE layers of a SEIF checkpoint.

    `path` is a checkpoint directory or an open `seif.Checkpoint`. `layers` picks source layer
    indices (default: all). `dtype` ("bf16", "f32", ...) casts float weights (routers keep their
    stored dtype; quantized tensors are dequantized to it, or to f32). Without a mesh the leaves
    are `jax.Array`s on the default device; with one, routed-expert leaves are sharded over
    `expert_axis` and built per device from only that device's experts, the rest replicated.
    """
    import jax

    ckpt, owned = _open(path)
    try:
        wanted = [layer.index for layer in ckpt.layers] if layers is None else list(layers)
        get = _reader(ckpt, dtype, threading.Lock())
        out = {}
        for index in wanted:
            layer = ckpt.layer(index)
            if mesh is None:
                params = jax.tree.map(jax.numpy.asarray, tensors_to_params(layer, get))
            else:
                params = _sharded_layer(ckpt, layer, get, mesh, expert_axis)
            out[index] = (params, layer)
        return out
    finally:
        if owned:
            ckpt.close()


def load_layer(path, l: int, mesh=None, *, dtype: str | None = None,
               expert_axis: str = "expert") -> tuple[dict, LayerSpec]:
    """(params, LayerSpec) of MoE layer `l` (the source model's decoder-layer index)."""
    return load(path, [l], dtype=dtype, mesh=mesh, expert_axis=expert_axis)[l]


def load_dense(path, names: Iterable[str] | None = None, dtype: str | None = None) -> dict:
    """The non-MoE tensors (embeddings, attention, norms...) under their stored names, as
    `jax.Array`s, so a JAX model can be assembled around the MoE layers."""
    import jax.numpy as jnp

    ckpt, owned = _open(path)
    try:
        moe = _moe_tensor_names(ckpt)
        wanted = [n for n in ckpt.tensor_names() if n not in moe] if names is None else names
        get = _reader(ckpt, dtype, threading.Lock())
        return {n: jnp.asarray(get(n)) for n in wanted}
    finally:
        if owned:
            ckpt.close()


def _moe_tensor_names(ckpt) -> set[str]:
    names: set[str] = set()
    for layer in ckpt.layers:
        names.update(layer.expected_tensors())
    return names


# =========================================================================== the forward
def _canon_zero(v):
    """+0.0 for -0.0: jax.lax.top_k orders -0.0 below +0.0 (a total order), the spec calls
    them equal (the lower index wins). A select, unlike `v + 0.0`, is not simplified away."""
    import jax.numpy as jnp

    return jnp.where(v == 0, jnp.zeros_like(v), v)


def _canon_nan(v):
    """One positive quiet NaN for every NaN: jax.lax.top_k ranks by the IEEE total order, which
    puts a NaN with the sign bit set below -inf and orders NaNs by payload, while the spec ranks
    every NaN first (the lower index among them). Negative NaNs are common: on x86 the default
    NaN of an invalid operation has the sign bit set, e.g. jax.nn.sigmoid(nan) is -nan."""
    import jax.numpy as jnp

    return jnp.where(jnp.isnan(v), jnp.full_like(v, jnp.nan), v)


def _topk(v, k: int):
    """Indices of the k largest along the last axis: jax.lax.top_k breaks ties to the lower
    index and ranks a positive NaN first; signed zeros and NaNs need canonicalising."""
    import jax

    return jax.lax.top_k(_canon_nan(_canon_zero(v)), k)[1]


def _softmax(x, axis: int):
    """As seif.routing._softmax: subtract the max, exp, divide by the sum (an all -inf row is
    NaN there too)."""
    import jax.numpy as jnp

    m = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _score(x, fn: str, axis: int = -1):
    import jax

    if fn in ("softmax", "softmax_topk"):
        return _softmax(x, axis)
    return jax.nn.sigmoid(x)


def _activation(name: str, gate, up, alpha: float, limit: float):
    import jax
    import jax.numpy as jnp

    if name == "swiglu":
        return jax.nn.silu(gate) * up
    if name == "geglu":
        return jax.nn.gelu(gate, approximate=False) * up
    if name == "geglu_tanh":
        return jax.nn.gelu(gate, approximate=True) * up
    if name == "swiglu_oai":
        g = jnp.minimum(gate, limit)
        u = jnp.clip(up, -limit, limit)
        return (u + 1.0) * (g * jax.nn.sigmoid(alpha * g))
    if name == "relu":
        return jnp.maximum(up, 0.0)
    if name == "gelu":
        return jax.nn.gelu(up, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(up, approximate=True)
    if name == "silu":
        return jax.nn.silu(up)
    if name == "relu2":
        return jnp.square(jnp.maximum(up, 0.0))
    raise RoutingError(f"unknown activation {name!r}")


def grouped_matmul(x, w, group_sizes, *, impl: str = "ragged_dot", precision=None,
                   block_rows: int | None = None):
    """y[r] = x[r] @ w[g(r)] for rows sorted by group g; rows past sum(group_sizes) give 0.

    impl="ragged_dot": `jax.lax.ragged_dot`, differentiable; a native grouped GEMM on TPU (and
    GPU through XLA or a Pallas kernel), but on CPU jax lowers it by masking x into [G, N, K] and
    doing one dense dot over all groups (G times the work and memory).
    impl="tiled": a loop over row tiles of one group each (at most N/block_rows + G tiles, only
    the non-empty ones run), so the work is that of the routed tokens: the CPU inference path.
    Forward-only (a while loop with a data-dependent trip count has no reverse-mode rule).
    Every tile multiplies `block_rows` rows, also where its group has fewer, and every tile
    reads its group's weights, so the default (None) follows n, the rows per group with rows
    (N over the expected number of such groups were the rows spread at random, rounded): one
    row per tile when n is 1 (XLA's matrix-vector product; a group's second row then costs a
    second read, still cheaper than 2-row tiles), else the power of two >= n + 2, at most 64,
    so most groups take one tile. Measured per projection (G x 2048 x M, fp32, 2 cores,
    caches flushed; against the earlier fixed 64, same run): G=64, M=1408: N=6 12.5 -> 10.1
    ms, N=24 45.8 -> 43.2, N=96 114 -> 60, N=1536 156 -> 111; G=8, M=5632: N=2 26.1 -> 24.5,
    N=32 68.5 -> 55.0, N=128 93.1 -> 81.3; but N=8 29.2 -> 39.0 where one group held 5 of the
    8 rows (two 4-row tiles, so two reads of its 46 MB).
    """
    import jax
    import jax.numpy as jnp

    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), precision=precision,
                                  preferred_element_type=jnp.result_type(x.dtype, w.dtype))
    if impl != "tiled":
        raise RoutingError(f"unknown grouped matmul impl {impl!r} (ragged_dot | tiled)")
    N, K = x.shape
    G, _, M = w.shape
    if block_rows is None:
        touched = G * (1.0 - (1.0 - 1.0 / G) ** N)  # groups with rows, rows spread at random
        per_group = max(1, round(N / max(touched, 1.0)))
        block_rows = 1 if per_group == 1 else min(64, 1 << (per_group + 1).bit_length())
    B = max(1, min(block_rows, N))
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if N == 0:
        return jnp.zeros((0, M), out_dtype)
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    tiles = (sizes + B - 1) // B                       # tiles per group
    tile_end = jnp.cumsum(tiles)
    n_tiles = tile_end[-1]
    xp = jnp.concatenate([x, jnp.zeros((B, K), x.dtype)])

    def body(m, acc):
        g = jnp.searchsorted(tile_end, m, side="right")
        local = m - (tile_end[g] - tiles[g])
        start = starts[g] + local * B
        rows = jnp.minimum(B, sizes[g] - local * B)
        xt = jax.lax.dynamic_slice(xp, (start, 0), (B, K))
        yt = jnp.matmul(xt, w[g], precision=precision).astype(out_dtype)
        yt = jnp.where((jnp.arange(B) < rows)[:, None], yt, jnp.zeros_like(yt))
        old = jax.lax.dynamic_slice(acc, (start, 0), (B, M))
        return jax.lax.dynamic_update_slice(acc, old + yt, (start, 0))

    acc = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((N + B, M), out_dtype))
    return acc[:N]


def _ffn_sorted(xs, group_sizes, row_group, ffn, p, cdt, impl, precision):
    """The expert FFN for rows sorted by expert: grouped matmuls, biases gathered per row."""
    def proj(name, h):
        y = grouped_matmul(h, p[name]["kernel"].astype(cdt), group_sizes, impl=impl,
                           precision=precision)
        if ffn.bias:
            y = y + p[name]["bias"].astype(cdt)[row_group]
        return y

    up = proj("up", xs)
    gate = proj("gate", xs) if ffn.gated else None
    h = _activation(ffn.activation, gate, up, ffn.alpha, ffn.limit)
    return proj("down", h)


def _ffn_batched(xe, ffn, p, cdt, precision):
    """The expert FFN on a [G, C, H] block, expert g on row block g (expert choice, soft MoE,
    shared experts): one batched matmul per projection."""
    import jax.numpy as jnp

    def proj(name, h):
        y = jnp.einsum("gch,gho->gco", h, p[name]["kernel"].astype(cdt), precision=precision)
        if ffn.bias:
            y = y + p[name]["bias"].astype(cdt)[:, None, :]
        return y

    up = proj("up", xe)
    gate = proj("gate", xe) if ffn.gated else None
    return proj("down", _activation(ffn.activation, gate, up, ffn.alpha, ffn.limit))


def _group_limit(choice, r, E: int):
    import jax
    import jax.numpy as jnp

    T = choice.shape[0]
    G = r.n_group
    per = E // G
    grouped = choice.reshape(T, G, per)
    if r.group_score == "max":
        gscore = jnp.max(grouped, axis=-1)
    else:  # top2_sum
        top2 = jnp.take_along_axis(grouped, _topk(grouped, 2), axis=-1)
        gscore = top2[..., 0] + top2[..., 1]
    best = _topk(gscore, r.topk_group)                               # [T, topk_group]
    keep = jnp.any(jax.nn.one_hot(best, G, dtype=jnp.bool_), axis=-2)  # [T, G]
    keep = jnp.repeat(keep, per, axis=-1)
    fill = -jnp.inf if r.group_mask == "neg_inf" else 0.0
    return jnp.where(keep, choice, jnp.asarray(fill, choice.dtype))


def _sparse_mixer(logits, jitter_eps: float):
    import jax.numpy as jnp

    two_eps = jnp.float32(2 * jitter_eps)
    abs_l = jnp.abs(logits)
    eligible = logits
    idx, wts = [], []
    cols = jnp.arange(logits.shape[1])
    for _ in range(2):
        i = _topk(eligible, 1)                                       # [T, 1]
        m = jnp.take_along_axis(eligible, i, axis=-1)
        factor = jnp.maximum(abs_l, m)
        masked = (m - logits) / factor > two_eps
        gates = jnp.where(masked, -jnp.inf, eligible)
        probs = _softmax(gates, -1)
        idx.append(i[:, 0])
        wts.append(jnp.take_along_axis(probs, i, axis=-1)[:, 0])
        eligible = jnp.where(cols[None, :] == i, -jnp.inf, eligible)
    return jnp.stack(idx, axis=1), jnp.stack(wts, axis=1)


def _normalize(w, r):
    import jax.numpy as jnp

    if r.normalize == "none":
        return w
    if r.normalize == "sum":
        size = jnp.sum(w, axis=-1, keepdims=True)
    else:
        size = jnp.sum(jnp.abs(w) ** r.norm_p, axis=-1, keepdims=True) ** (1.0 / r.norm_p)
    eps = jnp.asarray(r.epsilon, w.dtype)
    return w / (size + eps if r.epsilon_rule == "add" else jnp.maximum(size, eps))


def route(logits, layer: LayerSpec | StaticLayer, selection_bias=None):
    """Token-choice routing in JAX: (indices [T, k] int32, weights [T, k] f32, kept [T, k]),
    step for step `seif.routing.route` (see its docstring for the normative order)."""
    import jax.numpy as jnp

    layer = _as_layer(layer)
    r = layer.routing
    logits = logits.astype(jnp.float32)
    T, E = logits.shape
    k = r.top_k
    if r.kind == "sparse_mixer":
        indices, weights = _sparse_mixer(logits, r.jitter_eps)
    else:
        after = r.scoring in ("softmax_topk", "sigmoid_topk")
        scores = logits if after else _score(logits, r.scoring)
        choice = scores if selection_bias is None \
            else scores + selection_bias.astype(jnp.float32)
        if r.kind == "group_topk":
            choice = _group_limit(choice, r, E)
        indices = _topk(choice, k)
        weights = jnp.take_along_axis(scores, indices, axis=-1)
        if after:
            weights = _score(weights, r.scoring, -1)
    weights = _normalize(weights, r) * jnp.float32(r.scale)
    if r.capacity is not None:
        kept = _capacity_mask(indices, E, r.capacity.per_expert(T, E, k))
    else:
        kept = jnp.ones(indices.shape, jnp.bool_)
    return indices, weights, kept


def _capacity_mask(indices, E: int, capacity: int):
    """As seif.routing.capacity_mask: priority is choice-major, token-minor; an assignment is
    kept iff fewer than `capacity` earlier ones went to the same expert."""
    import jax.numpy as jnp

    T, k = indices.shape
    flat = indices.T.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=E)
    starts = jnp.cumsum(sizes) - sizes
    pos_sorted = jnp.arange(flat.shape[0]) - starts[flat[order]]
    position = jnp.zeros_like(pos_sorted).at[order].set(pos_sorted)
    return (position < capacity).reshape(k, T).T


def _check(params: Mapping, layer: LayerSpec, H: int) -> None:
    r = layer.routing
    rows = layer.num_experts * (r.slots_per_expert or 1) if r.kind == "soft_moe" \
        else layer.num_experts
    try:
        got = tuple(params["router"]["kernel"].shape)
        if got != (H, rows):
            raise RoutingError(f"router kernel is {list(got)}; expected [{H}, {rows}]")
        for proj in layer.experts.projections:
            shape = tuple(params["experts"][proj]["kernel"].shape)
            I = layer.experts.intermediate_size
            want = (layer.num_experts, H, I) if proj != "down" else (layer.num_experts, I, H)
            if shape != want:
                raise RoutingError(f"experts/{proj}/kernel is {list(shape)}; expected "
                                   f"{list(want)}")
        if r.selection_bias and "selection_bias" not in params["router"]:
            raise RoutingError("routing.selection_bias is set but params lack it")
        if r.router_bias and "bias" not in params["router"]:
            raise RoutingError("routing.router_bias is set but params lack router/bias")
        if layer.output_bias != ("output_bias" in params):
            raise RoutingError("params must hold output_bias/bias exactly when the layer's "
                               "output_bias is set (spec §5.16)")
        if layer.output_bias and tuple(params["output_bias"]["bias"].shape) != (H,):
            raise RoutingError(f"output_bias/bias is {list(params['output_bias']['bias'].shape)}"
                               f"; expected [{H}]")
    except (KeyError, TypeError) as exc:
        raise RoutingError(f"params do not fit layer {layer.index}: missing {exc}") from None


def moe_apply(params: Mapping, x, layer: LayerSpec | StaticLayer, *, compute_dtype=None,
              precision: Any = "highest", impl: str = "ragged_dot"):
    """The MoE layer output [T, H] for tokens x [T, H] (no residual, no norm); pure.

    Jit it with the layer static: ``jax.jit(functools.partial(moe_apply, layer=spec))`` or
    ``jax.jit(moe_apply, static_argnames="layer")(params, x, layer=static(spec))``.
    Router logits and routing are float32 (normative, highest matmul precision). Experts run in
    `compute_dtype` (default float32, the reference's precision; pass bfloat16 for speed) with
    `precision` ("highest" by default so fp32 means fp32 on GPU/TPU too; None = backend
    default). `impl` picks the grouped matmul for token-choice dispatch (see `grouped_matmul`).
    """
    import jax.numpy as jnp

    layer = _as_layer(layer)
    r = layer.routing
    H = layer.hidden_size
    if x.ndim != 2 or x.shape[1] != H:
        raise RoutingError(f"x is {list(x.shape)}; expected [T, {H}]")
    _check(params, layer, H)
    cdt = jnp.dtype(compute_dtype or jnp.float32)
    T = x.shape[0]
    if T == 0:
        return jnp.zeros((0, H), cdt)
    xf = x.astype(jnp.float32)
    router = params["router"]
    logits = jnp.matmul(xf, router["kernel"].astype(jnp.float32), precision="highest")
    if r.router_bias:
        logits = logits + router["bias"].astype(jnp.float32)
    xc = x.astype(cdt)
    E = layer.num_experts
    if r.kind in ("topk", "group_topk", "sparse_mixer"):
        out = _token_choice(params, xc, logits, layer, cdt, precision, impl)
    elif r.kind == "expert_choice":
        out = _expert_choice(params, xc, logits, layer, cdt, precision)
    elif r.kind == "soft_moe":
        S = r.slots_per_expert
        dispatch, combine = _softmax(logits, 0), _softmax(logits, 1)
        slot_in = jnp.matmul(dispatch.T.astype(cdt), xc, precision=precision)   # [E*S, H]
        slot_out = _ffn_batched(slot_in.reshape(E, S, H), layer.experts, params["experts"],
                                cdt, precision).reshape(E * S, H)
        out = jnp.matmul(combine.astype(cdt), slot_out, precision=precision)
    else:
        raise RoutingError(f"unknown routing kind {r.kind!r}")

    if layer.shared_experts is not None:
        se = layer.shared_experts
        ys = _ffn_batched(jnp.broadcast_to(xc, (se.count, T, H)), se.ffn,
                          params["shared_experts"], cdt, precision)
        shared = jnp.zeros((T, H), cdt)
        for s in range(se.count):        # in order, like the reference
            shared = shared + ys[s]
        if se.gate:
            g = jnp.matmul(xc, params["shared_gate"]["kernel"].astype(cdt), precision=precision)
            shared = (1.0 / (1.0 + jnp.exp(-g))).astype(cdt) * shared
        out = out + shared
    if layer.output_bias:                   # last, on every token (spec §5.16)
        out = out + params["output_bias"]["bias"].astype(cdt)
    return out.astype(cdt)


def _token_choice(params, x, logits, layer, cdt, precision, impl):
    """Sorted dispatch: the T*k assignments are sorted by expert (dropped ones last), the
    experts run as grouped matmuls over the sorted rows, and the results are un-sorted and
    summed over the k choices in order 0..k-1 (the reference's accumulation order)."""
    import jax.numpy as jnp

    r = layer.routing
    E = layer.num_experts
    T, H = x.shape
    sel = params["router"].get("selection_bias") if r.selection_bias else None
    indices, weights, kept = route(logits, layer, sel)
    k = indices.shape[1]
    weights = weights.astype(cdt)
    key = jnp.where(kept, indices, E).reshape(-1)            # dropped -> past the last expert
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    group_sizes = jnp.bincount(key, length=E + 1)[:E]
    tok = order // k
    w_sorted = weights.reshape(-1)[order][:, None]
    xs = x[tok]
    if r.weight_on == "input":       # Llama 4: the weight scales what goes into the expert
        xs = w_sorted * xs
    row_group = jnp.minimum(sorted_key, E - 1)
    ys = _ffn_sorted(xs, group_sizes, row_group, layer.experts, params["experts"], cdt, impl,
                     precision)
    if r.weight_on != "input":
        ys = w_sorted * ys
    ys = jnp.where((sorted_key < E)[:, None], ys, jnp.zeros_like(ys))
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    contrib = ys[inverse].reshape(T, k, H)
    if r.capacity is not None and r.capacity.drop_policy == "passthrough_scaled":
        contrib = jnp.where(kept[..., None], contrib, weights[..., None] * x[:, None, :])
    out = jnp.zeros((T, H), cdt)
    for j in range(k):
        out = out + contrib[:, j]
    return out


def _expert_choice(params, x, logits, layer, cdt, precision):
    """Each expert takes its top-C tokens by score (lower token index on ties): a gather to
    [E, C, H], one batched FFN, a scatter-add back."""
    import jax.numpy as jnp

    r = layer.routing
    T, H = x.shape
    E = layer.num_experts
    scores = _score(logits, r.scoring, -1)
    C = r.capacity.per_expert(T, E, 1, clip=True)
    by_expert = scores.T                                     # [E, T]
    token_idx = _topk(by_expert, C)                          # [E, C]
    w = (jnp.take_along_axis(by_expert, token_idx, axis=-1) * jnp.float32(r.scale)).astype(cdt)
    xe = x[token_idx]                                        # [E, C, H]
    if r.weight_on == "input":
        y = _ffn_batched(w[..., None] * xe, layer.experts, params["experts"], cdt, precision)
    else:
        y = w[..., None] * _ffn_batched(xe, layer.experts, params["experts"], cdt, precision)
    return jnp.zeros((T, H), cdt).at[token_idx.reshape(-1)].add(y.reshape(-1, H))


# =========================================================================== saving
def _layers_and_params(params, layer_specs) -> list[tuple[LayerSpec, Mapping]]:
    if layer_specs is None:          # what load() returns: {l: (params, spec)}
        return [(_as_layer(spec), p) for p, spec in params.values()]
    specs = list(layer_specs.values()) if isinstance(layer_specs, Mapping) else list(layer_specs)
    out = []
    for spec in specs:
        spec = _as_layer(spec)
        p = params.get(spec.index, params.get(str(spec.index)))
        if p is None:
            raise ConversionError(f"no params for MoE layer {spec.index}")
        out.append((spec, p))
    return out


def save(params: Mapping, layer_specs, out: str | os.PathLike, *,
         dense: Mapping[str, Any] | None = None, model: ModelInfo | None = None,
         source_names: Mapping[str, str] | None = None,
         metadata: Mapping[str, str] | None = None, overwrite: bool = False,
         max_shard_bytes: int | None = None, alignment: int = 64,
         progress: Callable[[int], None] | None = None) -> Path:
    """Write JAX/Flax MoE params as a SEIF checkpoint at `out`.

    `params` is {layer index: params pytree} with `layer_specs` the matching `LayerSpec`s, or
    what `load` returns ({l: (params, spec)}) with `layer_specs=None`. `dense` adds the
    non-MoE tensors under their names. Stacked experts are split and transposed back to
    [out, in]; nothing is cast, so a load -> save round trip gives the same bytes.
    """
    from seif.writer import DEFAULT_MAX_SHARD_BYTES
    from seif.writer import save as seif_save

    pairs = _layers_and_params(params, layer_specs)
    tensors: dict[str, np.ndarray] = {}
    for spec, p in pairs:
        tensors.update(params_to_tensors(spec, p))
    for name, a in (dense or {}).items():
        if name in tensors:
            raise ConversionError("a dense tensor has a canonical MoE tensor name", field=name)
        tensors[name] = np.ascontiguousarray(np.asarray(a))
    return seif_save(out, tensors, [spec for spec, _ in pairs], model=model or ModelInfo(
        source_framework="jax"), source_names=source_names, metadata=metadata,
        overwrite=overwrite, max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
        alignment=alignment, progress=progress)


# =========================================================================== msgpack (CLI)
def _atomic_write(dst: Path, data: bytes, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise ConversionError("destination exists (pass overwrite=True / --overwrite)",
                              path=str(dst))
    tmp = dst.parent / f"{dst.name}.partial-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_flax(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            dtype: str | None = None, show_progress: bool | None = None, **options) -> Path:
    """SEIF -> one Flax msgpack file (`flax.serialization.msgpack_serialize`) holding
    {"layers": {str(l): params}, "dense": {name: array}, "seif": {descriptors, model info,
    source names, tensor order}}, so `from_flax` can rebuild the same checkpoint.

    The whole model is held in memory once (msgpack is a single blob). Quantized tensors are
    refused unless `dtype` asks to dequantize them: passing them through would need a
    quantization-aware Flax layout that does not exist.
    """
    from flax import serialization

    if options:
        raise ConversionError(f"options not supported for seif -> flax: {', '.join(options)}")
    target = dtypes.normalize_name(dtype) if dtype else None
    if target is not None and target not in _CASTABLE:
        raise ConversionError(f"--dtype must be a float type ({', '.join(sorted(_CASTABLE))})")
    with _open_checkpoint(src) as ckpt:
        m = ckpt.manifest
        quantized = [n for n, t in m.tensors.items() if t.quantization is not None]
        if quantized and target is None:
            raise ConversionError(f"{quantized[0]} is quantized ({len(quantized)} tensors); pass "
                                  "--dtype to dequantize for Flax", path=str(src))
        companions = {c for t in m.tensors.values() if t.quantization
                      for c in (t.quantization.scale, t.quantization.zero_point) if c}
        moe = _moe_tensor_names(ckpt)
        total = sum(m.resolve(n).nbytes for n in m.tensors)
        with byte_progress(total, "exporting", show_progress) as advance:
            raw = _reader(ckpt, target, threading.Lock())

            def get(name: str) -> np.ndarray:
                a = raw(name)
                advance(m.resolve(name).nbytes)
                return a

            layers = {str(layer.index): tensors_to_params(layer, get) for layer in m.layers}
            dense = {n: get(n) for n in m.tensors if n not in moe and n not in companions}
        meta = {
            "format": MSGPACK_FORMAT, "version": MSGPACK_VERSION,
            "layers": {str(layer.index): layer.to_dict() for layer in m.layers},
            "model": m.model.to_dict(),
            "metadata": dict(m.metadata),
            "layout": m.layout.to_dict(),
            "source_names": {n: t.source_name for n, t in m.tensors.items()
                             if t.source_name is not None and n not in companions},
            "tensor_order": [n for n in m.tensors if n not in companions],
        }
        blob = serialization.msgpack_serialize({"layers": layers, "dense": dense, "seif": meta})
    out = Path(dst)
    _atomic_write(out, blob, overwrite)
    return out


def _open_checkpoint(src):
    from seif.reader import Checkpoint

    return Checkpoint(src)


def from_flax(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
              dtype: str | None = None, show_progress: bool | None = None,
              max_shard_bytes: int | None = None, **options) -> Path:
    """A Flax msgpack written by `to_flax` (or by hand in the same layout) -> SEIF.

    The "seif" section is required: routing cannot be guessed from array shapes. Layer
    descriptors go through `LayerSpec.from_dict` (the same validation as a manifest) and the
    arrays through the writer's shape checks, so a malformed file is a SeifError, never a
    half-written checkpoint.
    """
    from flax import serialization

    if options:
        raise ConversionError(f"options not supported for flax -> seif: {', '.join(options)}")
    target = dtypes.normalize_name(dtype) if dtype else None
    if target is not None and target not in _CASTABLE:
        raise ConversionError(f"--dtype must be a float type ({', '.join(sorted(_CASTABLE))})")
    path = Path(src)
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except OSError as exc:
        raise ConversionError(f"cannot read: {exc}", path=str(path)) from None
    except Exception as exc:  # msgpack raises many types on garbage input
        raise ConversionError(f"not a Flax msgpack file: {exc}", path=str(path)) from None
    if not isinstance(tree, dict) or not isinstance(tree.get("seif"), dict) \
            or tree["seif"].get("format") != MSGPACK_FORMAT:
        raise ConversionError("no 'seif' section with the layer descriptors (routing cannot be "
                              "inferred from shapes); write it with seif.converters.jax.save "
                              "or to_flax", path=str(path))
    meta = tree["seif"]
    if meta.get("version") != MSGPACK_VERSION:
        raise ConversionError(f"seif-flax version {meta.get('version')!r}; this reader knows "
                              f"{MSGPACK_VERSION}", path=str(path))
    try:
        specs = [LayerSpec.from_dict(d, f"seif.layers.{k}") for k, d in
                 _dict(meta.get("layers", {}), "seif.layers").items()]
        model = ModelInfo.from_dict(meta.get("model") or {})
    except SeifError as exc:
        raise ConversionError(f"bad layer descriptor: {exc}", path=str(path)) from None
    params = _dict(tree.get("layers", {}), "layers")
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:
        p = params.get(str(spec.index))
        if not isinstance(p, dict):
            raise ConversionError(f"no params for MoE layer {spec.index}", path=str(path))
        tensors.update(params_to_tensors(spec, p))
    for name, a in _dict(tree.get("dense", {}), "dense").items():
        if not isinstance(a, np.ndarray):
            raise ConversionError("dense entry is not an array", path=str(path), field=name)
        if name in tensors:
            raise ConversionError("a dense tensor has a canonical MoE tensor name", field=name)
        tensors[name] = a
    if target is not None:
        np_target = dtypes.to_numpy(target)
        tensors = {n: (a.astype(np_target) if dtypes.from_numpy(a.dtype) in _CASTABLE
                       and ".router." not in n else a) for n, a in tensors.items()}
    order = [n for n in meta.get("tensor_order", []) if n in tensors]
    order += [n for n in tensors if n not in set(order)]
    layout = meta.get("layout") or {}
    source_names = {n: s for n, s in _dict(meta.get("source_names", {}),
                                           "seif.source_names").items() if n in tensors}
    total = sum(a.nbytes for a in tensors.values())
    with byte_progress(total, "writing", show_progress) as advance:
        from seif.writer import save as seif_save
        return seif_save(dst, {n: tensors[n] for n in order}, specs, model=model,
                         source_names=source_names,
                         metadata={str(k): str(v) for k, v in
                                   _dict(meta.get("metadata", {}), "seif.metadata").items()},
                         overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes or layout.get("max_shard_bytes")
                         or 4 * 1024**3, alignment=layout.get("alignment", 64),
                         progress=advance)


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise FormatError(f"{where} must be a map, got {type(value).__name__}")
    return value


def register() -> None:
    """Entry point (`seif.converters`: flax): SEIF <-> Flax msgpack for `seif convert`."""
    from seif.convert import register as add

    add("seif", "flax", to_flax)
    add("flax", "seif", from_flax)

