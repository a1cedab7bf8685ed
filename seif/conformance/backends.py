"""Backends: what the conformance runner calls, the NumPy reference, and deliberately broken
backends that prove the suite can fail.

A backend is one small class. Subclass :class:`Backend`, set ``name``, and implement what you
support; say in :meth:`Backend.applies` which cases do not apply, and why. Register it under the
entry point group ``seif.conformance_backends``
(``numpy = "seif.conformance.backends:NumpyBackend"``) or pass ``module:Class`` to
``seif conformance run --backend``.

Outputs may be NumPy arrays or anything ``numpy.asarray`` accepts (torch tensors on CPU, JAX
arrays); the runner converts them.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from ..manifest import LayerSpec
from ..moe import MoEParams, ffn_forward, moe_forward
from ..routing import (
    RoutingResult,
    _sigmoid,
    expert_choice,
    route,
    router_logits,
    soft_moe_weights,
)
from .cases import Case

__all__ = ["Backend", "NumpyBackend", "resolve_backend"]

ENTRY_POINT_GROUP = "seif.conformance_backends"
TOKEN_CHOICE = ("topk", "group_topk", "sparse_mixer")


class Backend:
    """Base class of conformance backends.

    Override:

    * ``name``: shown in reports.
    * ``applies(case) -> (bool, reason)``: default: every case whose kind has a method here
      (``route`` for ``router`` cases, ``moe`` for ``moe``, ``load`` for ``format``).
    * ``route(case)``: router cases. Inputs: ``case.inputs["logits"]`` [T, E] (storage dtype;
      compute in float32, §6.1), ``case.inputs.get("selection_bias")``, descriptor
      ``case.routing``. Return ``(indices, weights)`` — token choice: [T, k] best first and
      their weights; with ``routing.capacity`` return ``(indices, weights, kept)`` with kept
      [T, k] bool; expert choice: [E, C] token indices per expert (best first) and weights;
      Soft MoE: ``(dispatch, combine)``, both [T, E * slots].
    * ``moe(case)``: MoE cases: ``case.inputs["x"]`` [T, H], tensors ``case.tensors`` by
      canonical name (quantized ones described by ``case.quantization``; ``case.moe_params()``
      dequantizes), descriptor ``case.layer``. Return y [T, H].
    * ``load(path)``: format cases: read the whole checkpoint at ``path``. Raise a
      ``seif.errors.SeifError`` subclass for malformed input (the case names the class).
      Return ``{tensor name: real values}`` (dequantized) to have values checked, or None.
      Set ``verifies_checksums = False`` if ``load`` does not verify checksums; the
      IntegrityError cases then do not apply.
    """

    name = "backend"
    verifies_checksums = True

    def applies(self, case: Case) -> tuple[bool, str]:
        method = {"router": "route", "moe": "moe", "format": "load"}[case.kind]
        if getattr(type(self), method) is getattr(Backend, method):
            return False, f"backend does not implement {method}()"
        if case.kind == "format" and case.expect_error == "IntegrityError" \
                and not self.verifies_checksums:
            return False, "backend does not verify checksums"
        return True, ""

    def route(self, case: Case):
        raise NotImplementedError

    def moe(self, case: Case):
        raise NotImplementedError

    def load(self, path: Path):
        raise NotImplementedError


# ------------------------------------------------------------------------ the reference
class NumpyBackend(Backend):
    """The project's reference implementation (`seif.routing`, `seif.moe`, `seif.open`) in
    float32, the precision the spec prescribes. Must pass every case."""

    name = "numpy"
    dtype = np.float32

    def _token_choice(self, logits: np.ndarray, layer: LayerSpec,
                      selection_bias) -> RoutingResult:
        return route(logits, layer.routing, selection_bias, dtype=self.dtype)

    def route(self, case: Case):
        layer = case.layer_spec()
        z = np.asarray(case.inputs["logits"]).astype(np.float32)
        kind = layer.routing.kind
        if kind in TOKEN_CHOICE:
            res = self._token_choice(z, layer, case.inputs.get("selection_bias"))
            return res.indices, res.weights, res.kept
        if kind == "expert_choice":
            return expert_choice(z, layer.routing, dtype=self.dtype)
        return soft_moe_weights(z, dtype=self.dtype)

    def moe(self, case: Case):
        return moe_forward(case.inputs["x"], case.layer_spec(), case.moe_params(np.float32),
                           dtype=self.dtype)

    def load(self, path: Path):
        from ..reader import Checkpoint
        from ..validate import validate
        validate(path, deep=self.verifies_checksums)
        with Checkpoint(path) as ckpt:
            return {name: ckpt.dequantized(name) for name in ckpt.tensor_names()}


# ------------------------------------------------------------- deliberately broken backends
def _combine(x: np.ndarray, layer: LayerSpec, params: MoEParams, res: RoutingResult
             ) -> np.ndarray:
    """A token-choice layer output from a given routing (float32), shared experts included."""
    dt = np.float32
    x = np.asarray(x).astype(dt)
    out = np.zeros_like(x)
    r = layer.routing
    for t in range(x.shape[0]):
        for j in range(res.indices.shape[1]):
            e, w = int(res.indices[t, j]), res.weights[t, j]
            if not res.kept[t, j]:
                if r.capacity is not None and r.capacity.drop_policy == "passthrough_scaled":
                    out[t] += w * x[t]
                continue
            if r.weight_on == "input":
                out[t] += ffn_forward(w * x[t:t + 1], layer.experts, params.experts[e], dt)[0]
            else:
                out[t] += w * ffn_forward(x[t:t + 1], layer.experts, params.experts[e], dt)[0]
    for weights in params.shared:
        sh = ffn_forward(x, layer.shared_experts.ffn, weights, dt)
        if params.shared_gate is not None:
            sh = _sigmoid(x @ params.shared_gate.astype(dt).T) * sh
        out += sh
    if params.output_bias is not None:
        out += params.output_bias.astype(dt)
    return out


class HighestIndexTiesBackend(NumpyBackend):
    """BROKEN on purpose: ties go to the *highest* index (ONNX Runtime's com.microsoft.MoE on
    CPU does this). Implemented by reversing the expert (expert choice: token) axis."""

    name = "broken-highest-index-ties"

    def _token_choice(self, logits, layer, selection_bias):
        E = logits.shape[1]
        sb = None if selection_bias is None else np.asarray(selection_bias)[::-1]
        res = route(logits[:, ::-1], layer.routing, sb, dtype=self.dtype)
        res.indices = E - 1 - res.indices
        return res

    def route(self, case):
        if case.routing["kind"] == "expert_choice":
            z = np.asarray(case.inputs["logits"]).astype(np.float32)
            tok, w = expert_choice(z[::-1], case.layer_spec().routing, dtype=self.dtype)
            return z.shape[0] - 1 - tok, w
        return super().route(case)

    def moe(self, case):
        layer, params = case.layer_spec(), case.moe_params(np.float32)
        x = np.asarray(case.inputs["x"]).astype(np.float32)
        kind = layer.routing.kind
        if kind == "expert_choice":
            return moe_forward(x[::-1], layer, params, dtype=self.dtype)[::-1]
        if kind == "soft_moe":
            return moe_forward(x, layer, params, dtype=self.dtype)
        rev = dataclasses.replace(
            params, router_weight=params.router_weight[::-1],
            router_bias=None if params.router_bias is None else params.router_bias[::-1],
            selection_bias=(None if params.selection_bias is None
                            else params.selection_bias[::-1]),
            experts=params.experts[::-1])
        return moe_forward(x, layer, rev, dtype=self.dtype)


def _replace_routing(layer: LayerSpec, **changes) -> LayerSpec:
    return dataclasses.replace(layer, routing=dataclasses.replace(layer.routing, **changes))


class SoftmaxAfterTopkBackend(NumpyBackend):
    """BROKEN on purpose: where the descriptor says ``softmax`` (softmax over all E, then
    top-k), it selects on the logits and takes the softmax over the k selected (that is
    ``softmax_topk``). Equal only when renormalized by ``sum`` or when k = E."""

    name = "broken-softmax-after-topk"

    def _swap(self, layer: LayerSpec) -> LayerSpec:
        if layer.routing.scoring == "softmax" and layer.routing.kind in TOKEN_CHOICE:
            return _replace_routing(layer, scoring="softmax_topk")
        return layer

    def _token_choice(self, logits, layer, selection_bias):
        return route(logits, self._swap(layer).routing, selection_bias, dtype=self.dtype)

    def moe(self, case):
        return moe_forward(case.inputs["x"], self._swap(case.layer_spec()),
                           case.moe_params(np.float32), dtype=self.dtype)


class MissingRenormalizationBackend(NumpyBackend):
    """BROKEN on purpose: ignores ``normalize`` (never divides by the sum or Lp norm)."""

    name = "broken-missing-renormalization"

    def _token_choice(self, logits, layer, selection_bias):
        return route(logits, _replace_routing(layer, normalize="none").routing,
                     selection_bias, dtype=self.dtype)

    def moe(self, case):
        return moe_forward(case.inputs["x"], _replace_routing(case.layer_spec(),
                                                              normalize="none"),
                           case.moe_params(np.float32), dtype=self.dtype)


class Fp16RouterBackend(NumpyBackend):
    """BROKEN on purpose: router math in float16 (logits and weights rounded to fp16), where
    §6.1 requires float32."""

    name = "broken-fp16-router"

    @staticmethod
    def _h(a):
        with np.errstate(over="ignore"):
            return np.asarray(a).astype(np.float16).astype(np.float32)

    def _token_choice(self, logits, layer, selection_bias):
        sb = None if selection_bias is None else self._h(selection_bias)
        res = route(self._h(logits), layer.routing, sb, dtype=self.dtype)
        res.weights = self._h(res.weights)
        return res

    def route(self, case):
        out = super().route(case)
        if case.routing["kind"] in TOKEN_CHOICE:
            return out
        z = self._h(case.inputs["logits"])
        if case.routing["kind"] == "expert_choice":
            tok, w = expert_choice(z, case.layer_spec().routing, dtype=self.dtype)
            return tok, self._h(w)
        d, c = soft_moe_weights(z, dtype=self.dtype)
        return self._h(d), self._h(c)

    def moe(self, case):
        layer, params = case.layer_spec(), case.moe_params(np.float32)
        if layer.routing.kind not in TOKEN_CHOICE:
            return super().moe(case)
        x = np.asarray(case.inputs["x"]).astype(np.float32)
        logits = self._h(router_logits(self._h(x).astype(np.float16),
                                       self._h(params.router_weight).astype(np.float16),
                                       None if params.router_bias is None
                                       else self._h(params.router_bias), dtype=np.float32))
        res = self._token_choice(logits, layer, params.selection_bias)
        return _combine(x, layer, params, res)


BROKEN = {
    "broken-highest-index-ties": HighestIndexTiesBackend,
    "broken-softmax-after-topk": SoftmaxAfterTopkBackend,
    "broken-missing-renormalization": MissingRenormalizationBackend,
    "broken-fp16-router": Fp16RouterBackend,
}


# ------------------------------------------------------------------------------ discovery
def available_backends() -> dict[str, str]:
    """Entry-point name -> ``module:attr`` for every registered backend (plus the built-in
    broken ones, for demonstrations)."""
    out = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    out.setdefault("numpy", "seif.conformance.backends:NumpyBackend")
    for name, cls in BROKEN.items():
        out.setdefault(name, f"{cls.__module__}:{cls.__name__}")
    return out


def resolve_backend(spec: str) -> Backend:
    """A backend instance from an entry-point name or ``module:Class`` (a class, or a
    factory returning an instance)."""
    from ..errors import SeifError

    registered = available_backends()
    target = registered.get(spec, spec)
    if ":" not in target:
        raise SeifError(f"unknown backend {spec!r}; registered: {', '.join(sorted(registered))}"
                        "; or pass module:Class")
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SeifError(f"cannot load backend {target!r}: {exc}") from None
    backend = obj() if callable(obj) else obj
    if not all(hasattr(backend, m) for m in ("applies", "route", "moe", "load")):
        raise SeifError(f"{target!r} is not a conformance backend (subclass "
                        "seif.conformance.Backend)")
    if not getattr(backend, "name", None) or backend.name == "backend":
        backend.name = spec
    return backend
