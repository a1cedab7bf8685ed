"""A Flax NNX module around `seif.converters.jax.moe_apply`.

Kept apart from `seif.converters.jax` so that loading, converting and the functional forward do
not import `flax.nnx` (the CLI's msgpack conversion only needs `flax.serialization`); importing
this module imports flax.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seif.manifest import LayerSpec

from . import jax as sj

__all__ = ["SeifMoE"]


class SeifMoE(nnx.Module):
    """One SEIF MoE layer as an NNX module.

    Params are `nnx.Param`s in the stacked layout of `seif.converters.jax`; the descriptor is
    kept as a hashable `StaticLayer` because NNX hashes a module's static attributes into its
    graph definition (that is what `nnx.jit` caches on). Calling it on [..., H] runs `moe_apply`
    on the flattened tokens.

    Build it from a checkpoint with `SeifMoE.from_checkpoint(path, l, mesh=...)`, from params
    with `SeifMoE(layer, params)`, or randomly with `SeifMoE(layer, rngs=nnx.Rngs(0))`.
    """

    def __init__(self, layer: LayerSpec | sj.StaticLayer, params: dict | None = None, *,
                 rngs: nnx.Rngs | None = None, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = None, impl: str = "ragged_dot",
                 precision: Any = "highest"):
        self.layer = sj.static(layer)
        self.compute_dtype = compute_dtype
        self.impl = impl
        self.precision = precision
        if params is None:
            if rngs is None:
                raise ValueError("SeifMoE needs params or rngs")
            params = _random_params(self.layer.layer, rngs, param_dtype)
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    @classmethod
    def from_checkpoint(cls, path, l: int, *, mesh=None, dtype: str | None = None,
                        expert_axis: str = "expert", **kwargs) -> SeifMoE:
        """Layer `l` of a SEIF checkpoint (expert-sharded over `mesh` when given)."""
        params, layer = sj.load_layer(path, l, mesh, dtype=dtype, expert_axis=expert_axis)
        return cls(layer, params, **kwargs)

    def to_params(self) -> dict:
        """The plain params pytree, e.g. for `seif.converters.jax.save`."""
        return jax.tree.map(lambda v: v[...], self.params,
                            is_leaf=lambda v: isinstance(v, nnx.Variable))

    def __call__(self, x):
        lead = x.shape[:-1]
        y = sj.moe_apply(self.to_params(), x.reshape(-1, x.shape[-1]), self.layer,
                         compute_dtype=self.compute_dtype, precision=self.precision,
                         impl=self.impl)
        return y.reshape(*lead, y.shape[-1])


def _random_params(layer: LayerSpec, rngs: nnx.Rngs, dtype: Any) -> dict:
    """N(0, 1/fan_in) kernels and N(0, 0.1^2) vectors, like `seif.moe.random_layer_params`
    (activations keep unit scale through the layer)."""
    expected = layer.expected_tensors()

    class _Info:   # what `_layer_shapes` reads from `Checkpoint.info`, from the descriptor
        quantization = None

        def __init__(self, name: str):
            self.shape = list(expected[name])

    shapes = sj._layer_shapes(layer, _Info)
    leaves: list[tuple[str, tuple[int, ...]]] = []

    def collect(node):
        for k, v in node.items():
            collect(v) if isinstance(v, dict) else leaves.append((k, v))

    collect(shapes)
    # One draw for all leaves, cut on the host: a jax.random call per leaf shape would compile
    # a sampler per shape (seconds for one layer on CPU).
    total = sum(math.prod(shape) for _, shape in leaves)
    flat = np.asarray(jax.random.normal(rngs.params(), (total,), jnp.float32))
    cursor = 0

    def draw(key: str, shape: tuple[int, ...]):
        nonlocal cursor
        n = math.prod(shape)
        scale = 1.0 / math.sqrt(shape[-2]) if key == "kernel" else 0.1
        out = (flat[cursor:cursor + n].reshape(shape) * scale).astype(dtype)
        cursor += n
        return jnp.asarray(out)

    def walk(node):
        return {k: walk(v) if isinstance(v, dict) else draw(k, v) for k, v in node.items()}

    return walk(shapes)
