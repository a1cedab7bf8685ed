"""The PyTorch conformance backend: `seif.converters.torch.SparseMoE` and its router.

Registered as ``torch = "seif.conformance.backends_torch:TorchBackend"`` (entry point group
``seif.conformance_backends``); ``seif conformance run --backend torch``.

* Router cases (token choice: ``topk``, ``group_topk``, ``sparse_mixer``): the case's logits go
  through ``SparseMoE._route`` — the routing half of ``SparseMoE.route(x)`` after its router
  matmul, i.e. the code every forward runs (scores, selection bias, group limit,
  ``topk_lowest_index``, normalization, scale, capacity), in float32 on a CPU module built from
  the case's layer descriptor. Logits are passed directly rather than through a router matmul
  with an identity weight, which would turn an infinite logit into NaN (inf * 0).
* MoE cases: ``SparseMoE.from_params(layer, MoEParams)`` with the weights in their stored dtype
  (fp32 / fp16 / bf16 kept, as ``SparseMoE.from_checkpoint`` keeps them; quantized experts
  dequantized to float32, as ``from_checkpoint`` does), then ``module(x)`` on x in its stored
  dtype: experts run in the weights' dtype, the router in float32 (§6.1), the output comes back
  in x's dtype. ``grouped_mm`` selects the dispatch path: None lets the module choose per call
  (``torch._grouped_mm`` for the catalogue's tiny experts), True forces ``torch._grouped_mm``,
  False the loop of one matmul per active expert.

Torch is imported when a method first runs, never by ``import seif.conformance``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends import TOKEN_CHOICE, Backend
from .cases import Case

__all__ = ["TorchBackend"]

NA_EXPERT_CHOICE_ROUTER = (
    "SparseMoE exposes token-choice routing only (route()/_route() return [T, k] indices, "
    "weights, kept); expert-choice selection ([E, C] tokens) is computed inside forward() and "
    "not returned, so it is checked through the moe/expert_choice cases instead")
NA_SOFT_MOE_ROUTER = (
    "SparseMoE does not expose Soft MoE dispatch/combine weights (computed inside forward()); "
    "they are checked through the moe/soft_moe cases instead")
NA_FORMAT = (
    "format cases test a checkpoint reader; the torch backend has none of its own "
    "(SparseMoE.from_checkpoint reads through seif.open, covered by the numpy backend's "
    "format cases, and there is no torch loader for dense tensors)")


def _torch():
    import torch

    from ..converters import torch as conv
    return torch, conv


class TorchBackend(Backend):
    """`seif.converters.torch.SparseMoE` on CPU (see the module docstring)."""

    name = "torch"

    def __init__(self, grouped_mm: bool | None = None):
        self.grouped_mm = grouped_mm
        if grouped_mm is False:
            self.name = "torch-per-expert"

    def applies(self, case: Case) -> tuple[bool, str]:
        if case.kind == "format":
            return False, NA_FORMAT
        if case.kind == "router":
            kind = case.routing["kind"]
            if kind == "expert_choice":
                return False, NA_EXPERT_CHOICE_ROUTER
            if kind == "soft_moe":
                return False, NA_SOFT_MOE_ROUTER
        return True, ""

    # -------------------------------------------------------------------- router cases
    def route(self, case: Case):
        torch, conv = _torch()
        layer = case.layer_spec()
        if layer.routing.kind not in TOKEN_CHOICE:  # pragma: no cover - applies() says so
            raise NotImplementedError(layer.routing.kind)
        module = conv.SparseMoE(layer, torch.float32)
        sb = case.inputs.get("selection_bias")
        if sb is not None:
            module.selection_bias = conv._from_numpy(sb)
        z = conv._from_numpy(case.inputs["logits"]).float()   # §6.1: routing in float32
        with torch.no_grad():
            idx, w, kept = module._route(z)
        return idx.numpy(), w.numpy(), kept.numpy()

    # ----------------------------------------------------------------------- MoE cases
    def module(self, case: Case):
        """The case's layer as a `SparseMoE` (weights in their stored dtype)."""
        _, conv = _torch()
        from ..moe import MoEParams
        layer = case.layer_spec()
        real = case.real_tensors(np.float32) if case.quantization else {}

        def get(name: str) -> np.ndarray:
            return real[name] if name in case.quantization else case.tensors[name]

        params = MoEParams.from_tensors(layer, get)
        return conv.SparseMoE.from_params(layer, params, grouped_mm=self.grouped_mm)

    def moe(self, case: Case):
        torch, conv = _torch()
        module = self.module(case)
        x = conv._from_numpy(case.inputs["x"])
        with torch.no_grad():
            y = module(x)
        return y.float().numpy()

    def load(self, path: Path):  # pragma: no cover - applies() declares format cases N/A
        raise NotImplementedError(NA_FORMAT)
