"""The JAX conformance backend: `seif.converters.jax` (``route``, ``moe_apply``, ``load``).

Registered as ``jax = "seif.conformance.backends_jax:JaxBackend"`` (entry point group
``seif.conformance_backends``); ``seif conformance run --backend jax``.

* Router cases (token choice: ``topk``, ``group_topk``, ``sparse_mixer``):
  ``seif.converters.jax.route(logits, layer, selection_bias)`` under ``jax.jit`` (the layer a
  static argument), on the case's logits in their storage dtype (``route`` computes in float32).
* MoE cases: the case's canonical tensors through ``tensors_to_params`` (stacked, ``[in, out]``
  kernels; quantized experts dequantized to float32, as ``load`` does), then ``moe_apply``
  under ``jax.jit`` on x in its storage dtype, with the module's defaults (float32 experts,
  ``precision="highest"``) and ``impl`` (``ragged_dot`` by default, or ``tiled``).
* Format cases: ``seif.converters.jax.load`` (every MoE layer's params pytree) plus
  ``load_dense`` (every other tensor), mapped back to canonical names with
  ``params_to_tensors``, so the values checked are the JAX arrays a user gets. The JAX loader
  reads through ``seif.Checkpoint`` and does not verify checksums (``verifies_checksums =
  False``: the IntegrityError cases do not apply).

JAX is imported when a method first runs, never by ``import seif.conformance``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .backends import TOKEN_CHOICE, Backend
from .cases import Case

__all__ = ["JaxBackend"]

NA_EXPERT_CHOICE_ROUTER = (
    "seif.converters.jax.route is token-choice routing only ([T, k] indices, weights, kept); "
    "expert-choice selection ([E, C] tokens) happens inside moe_apply and is not returned, so "
    "it is checked through the moe/expert_choice cases instead")
NA_SOFT_MOE_ROUTER = (
    "seif.converters.jax exposes no Soft MoE dispatch/combine weights (computed inside "
    "moe_apply); they are checked through the moe/soft_moe cases instead")


@functools.lru_cache(maxsize=1)
def _jitted():
    """(route, moe_apply) compiled with the layer static; jax imported here, once."""
    import jax

    from ..converters import jax as conv

    route = jax.jit(conv.route, static_argnames="layer")
    moe = jax.jit(conv.moe_apply, static_argnames=("layer", "impl"))
    return route, moe


class JaxBackend(Backend):
    """`seif.converters.jax` on the default JAX device (see the module docstring)."""

    name = "jax"
    verifies_checksums = False

    def __init__(self, impl: str = "ragged_dot"):
        self.impl = impl
        if impl != "ragged_dot":
            self.name = f"jax-{impl}"

    def applies(self, case: Case) -> tuple[bool, str]:
        if case.kind == "router":
            kind = case.routing["kind"]
            if kind == "expert_choice":
                return False, NA_EXPERT_CHOICE_ROUTER
            if kind == "soft_moe":
                return False, NA_SOFT_MOE_ROUTER
        return super().applies(case)

    # -------------------------------------------------------------------- router cases
    def route(self, case: Case):
        import jax.numpy as jnp

        from ..converters.jax import static
        layer = case.layer_spec()
        if layer.routing.kind not in TOKEN_CHOICE:  # pragma: no cover - applies() says so
            raise NotImplementedError(layer.routing.kind)
        route, _ = _jitted()
        sb = case.inputs.get("selection_bias")
        idx, w, kept = route(jnp.asarray(case.inputs["logits"]), layer=static(layer),
                             selection_bias=None if sb is None else jnp.asarray(sb))
        return np.asarray(idx), np.asarray(w), np.asarray(kept)

    # ----------------------------------------------------------------------- MoE cases
    def params(self, case: Case) -> dict:
        """The case's layer as the JAX params pytree (jax.Array leaves)."""
        import jax

        from ..converters.jax import tensors_to_params
        real = case.real_tensors(np.float32) if case.quantization else {}

        def get(name: str) -> np.ndarray:
            return real[name] if name in case.quantization else case.tensors[name]

        return jax.tree.map(jax.numpy.asarray, tensors_to_params(case.layer_spec(), get))

    def moe(self, case: Case):
        import jax.numpy as jnp

        from ..converters.jax import static
        _, moe = _jitted()
        y = moe(self.params(case), jnp.asarray(case.inputs["x"]),
                layer=static(case.layer_spec()), impl=self.impl)
        return np.asarray(y.astype(jnp.float32))

    # --------------------------------------------------------------------- format cases
    def load(self, path: Path):
        from ..converters import jax as conv

        out: dict[str, np.ndarray] = {}
        for params, layer in conv.load(path).values():
            out.update(conv.params_to_tensors(layer, params))
        for name, a in conv.load_dense(path).items():
            out[name] = np.asarray(a)
        return out
