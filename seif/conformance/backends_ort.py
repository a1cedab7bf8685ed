"""The ONNX Runtime conformance backends: the three ways SEIF layers run in ORT.

* :class:`OrtFunctionBackend` (``ort-function``): models from `seif.converters.onnx` with
  ``ai.seif.SeifRouter`` / ``ai.seif.SeifMoE`` nodes and their model-local function bodies
  (standard ONNX ops), run by stock ONNX Runtime on CPU *without* ``libseif_ort.so``.
* :class:`OrtKernelBackend` (``ort-kernels``): the same models with ``libseif_ort.so``
  registered (``seif.runtime.library_path()``), so the custom-op kernels replace the bodies.
  Not applicable (every case, with the reason) when the library is not built.
* :class:`OrtComMicrosoftBackend` (``ort-com-microsoft``): the ``--target ort`` lowering to ONNX
  Runtime's own ``com.microsoft.MoE`` (spec/ops.md §6); layers the lowering refuses are not
  applicable, with the refusal (`ort_lowering_refusal`) as the reason.
  :class:`OrtComMicrosoftStockBackend` (``ort-com-microsoft-stock``) is the same lowering with
  ``ort_router="stock"``: ORT's own routing for plain softmax top-k, which fails the exact-tie
  and NaN-token cases (kept runnable so that finding stays visible).

What is run:

* Router cases (token choice): ``router_model(layer, selection_bias)``, one ``SeifRouter`` node,
  fed the case's logits as float32. fp16/bf16 logits are widened to float32 first, which is
  exact and is what §6.1 prescribes (the router computes in float32 whatever the storage
  dtype); the router model's input is declared float32. For ``com.microsoft`` see
  :class:`OrtComMicrosoftBackend`: the lowering's router graph is run in front of a probe MoE
  whose experts return one-hot vectors, so the output *is* the dense routing weights.
* MoE cases: ``moe_model([(layer, params)], target=...)`` fed x as float32 (fp16/bf16 x widened
  exactly; the exported model's ``hidden_states`` is float32). The portable/kernel models keep
  fp16/bf16 weights in their stored dtype (``dtype="f16"``/``"bf16"``, W of spec/ops.md);
  quantized experts (FP8, MXFP4, int4, int8) are dequantized to float32, as
  ``seif convert --to onnx`` does (the op has no quantized weight inputs). The ``com.microsoft``
  lowering is float32 only; fp16/bf16/quantized layers are exported to float32, which holds
  their values exactly, as ``seif convert --to onnx --target ort`` does for such checkpoints.
* Format cases: not applicable; the checkpoint reader is seif's own (``seif.open``), checked by
  the numpy backend.

onnx and onnxruntime are imported when a method first runs, never by ``import seif.conformance``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .backends import TOKEN_CHOICE, Backend
from .cases import Case

__all__ = ["OrtComMicrosoftBackend", "OrtComMicrosoftStockBackend", "OrtFunctionBackend",
           "OrtKernelBackend"]

NA_FORMAT = ("format cases test a checkpoint reader; ONNX Runtime reads no SEIF checkpoint "
             "(seif convert --to onnx reads through seif.open, whose format cases the numpy "
             "backend runs)")
NA_ROUTER_KIND = ("ai.seif.SeifRouter is token-choice routing only (spec/ops.md §2); {kind} "
                  "exists only inside SeifMoE and is checked through the moe/{kind} cases")
NA_SHARED_ACTIVATION = ("the SeifMoE op has one activation attribute for routed and shared "
                        "experts (spec/ops.md §3), the exporter refuses this layer: {why}")
NA_NO_LIBRARY = ("libseif_ort.so not found (build it with `make native`, or set "
                 "$SEIF_ORT_LIBRARY): the ai.seif kernels cannot be registered")
NA_MS_ROUTER_KIND = ("com.microsoft.MoE routes tokens by top-k token choice; the lowering "
                     "refuses {kind}, so there is no router to test")
NA_MS_UNOBSERVABLE = ("the reference selects experts with weight {what}; com.microsoft.MoE has "
                      "no index output and an expert that enters the sum with weight {what} "
                      "leaves no trace in its output, so which expert the op selected there "
                      "cannot be observed (the moe/ cases check the same edge through layer "
                      "outputs)")

_ONNX_DTYPE = {"fp16": "f16", "bf16": "bf16"}


def _ort():
    import onnxruntime as ort
    return ort


def _conv():
    from ..converters import onnx as conv
    return conv


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).astype(np.float32))


class _OrtBackend(Backend):
    """Shared plumbing: one InferenceSession per case, CPU execution provider."""

    name = "ort"
    target = "portable"
    use_library = False

    def __init__(self, threads: int = 1):
        self.threads = threads

    # ------------------------------------------------------------------ sessions
    def library(self) -> Path | None:
        if not self.use_library:
            return None
        from ..runtime.library import library_path
        return library_path()

    def session(self, model):
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        lib = self.library()
        if lib is not None:
            so.register_custom_ops_library(str(lib))
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])

    # ------------------------------------------------------------------ applicability
    def applies(self, case: Case) -> tuple[bool, str]:
        if case.kind == "format":
            return False, NA_FORMAT
        if self.use_library and self.library() is None:
            return False, NA_NO_LIBRARY
        kind = case.routing.get("kind")
        if case.kind == "router" and kind not in TOKEN_CHOICE:
            return False, NA_ROUTER_KIND.format(kind=kind)
        if case.kind == "moe":
            from ..errors import ConversionError
            try:
                _conv()._check_exportable(case.layer_spec())
            except ConversionError as exc:
                return False, NA_SHARED_ACTIVATION.format(why=exc.one_line())
        return True, ""

    # ------------------------------------------------------------------ cases
    def route(self, case: Case):
        layer = case.layer_spec()
        sb = case.inputs.get("selection_bias")
        model = _conv().router_model(layer, None if sb is None else _f32(sb))
        idx, w, kept = self.session(model).run(
            None, {"logits": _f32(case.inputs["logits"])})
        return idx, w, kept

    def export_dtype(self, case: Case) -> str | None:
        """The weight dtype of the exported model: the stored one (fp16, bf16), else float32
        (quantized experts are dequantized)."""
        return _ONNX_DTYPE.get(case.dtype)

    def moe(self, case: Case):
        model = _conv().moe_model([(case.layer_spec(), case.moe_params(np.float32))],
                                  target=self.target, dtype=self.export_dtype(case))
        (y,) = self.session(model).run(None, {"hidden_states": _f32(case.inputs["x"])})
        return y

    def load(self, path: Path):  # pragma: no cover - applies() declares format cases N/A
        raise NotImplementedError(NA_FORMAT)


class OrtFunctionBackend(_OrtBackend):
    """ai.seif models on their standard-op function bodies (no custom-op library)."""

    name = "ort-function"


class OrtKernelBackend(_OrtBackend):
    """ai.seif models with libseif_ort.so registered: the custom-op kernels run."""

    name = "ort-kernels"
    use_library = True


class OrtComMicrosoftBackend(_OrtBackend):
    """The ``--target ort`` lowering to ``com.microsoft.MoE`` (spec/ops.md §6).

    MoE cases run ``moe_model(..., target="ort")`` (float32; see the module docstring).

    Router cases: com.microsoft.MoE has no routing output, so the lowering's router is probed.
    The probe is the lowering's own graph for the case's routing (`_ort_layer`: plain softmax
    top-k straight into the op, or the SeifRouter log-weight form with its Mul by the weights'
    sum), with two changes: the router MatMul is replaced by the case's logits (a matmul with
    an identity would turn an infinite logit into NaN), and the experts are ungated ReLU FFNs
    with zero weights and biases (1; one-hot of e), so expert e returns the unit vector e and
    the op's output is the dense weight vector Σ_j w_j·onehot(idx_j) it applied. The selected
    set is the non-zero entries; the op has no order of its own (its output is a sum), so they
    are listed best first by the case's choice values (exact ties lower index first), which
    leaves the set and the weights to be checked. Cases whose reference weights include 0 or
    NaN are not applicable: such a selection leaves no trace in the op's output.

    ``router="seif"`` (the exporter's default, ``ort-com-microsoft``) lowers every router
    through the SeifRouter log-weight form: §6.2 ties and §6.3 NaN exactly. ``router="stock"``
    (``ort-com-microsoft-stock``, :class:`OrtComMicrosoftStockBackend`) lowers plain softmax
    top-k routing straight into the op, whose own top-k breaks exact ties to the higher index
    and outputs 0 for a NaN token: those cases fail (see tests/test_conformance_ort.py).
    """

    name = "ort-com-microsoft"
    target = "ort"

    def __init__(self, threads: int = 1, router: str = "seif"):
        super().__init__(threads)
        self.router = router
        if router != "seif":
            self.name = f"ort-com-microsoft-{router}"

    def applies(self, case: Case) -> tuple[bool, str]:
        if case.kind == "format":
            return False, NA_FORMAT
        kind = case.routing.get("kind")
        if case.kind == "router" and kind not in TOKEN_CHOICE:
            return False, NA_MS_ROUTER_KIND.format(kind=kind)
        layer = case.layer_spec()
        refusal = _conv().ort_lowering_refusal(layer)
        if refusal:
            return False, f"the com.microsoft.MoE lowering refuses this layer: {refusal}"
        ok, why = super().applies(case)
        if not ok:
            return ok, why
        if case.kind == "router":
            w = np.asarray(case.expected["weights"], np.float64)
            if np.isnan(w).any():
                return False, NA_MS_UNOBSERVABLE.format(what="NaN")
            if (w == 0).any():
                return False, NA_MS_UNOBSERVABLE.format(what="0")
        return True, ""

    def export_dtype(self, case: Case) -> str | None:
        return None      # the lowering is float32 only; fp16/bf16 values widen exactly

    def moe(self, case: Case):
        model = _conv().moe_model([(case.layer_spec(), case.moe_params(np.float32))],
                                  target="ort", ort_router=self.router)
        (y,) = self.session(model).run(None, {"hidden_states": _f32(case.inputs["x"])})
        return y

    def probe_model(self, layer, selection_bias):
        """The lowering's router graph in front of a one-hot probe MoE (see the class doc)."""
        conv = _conv()
        onnx = conv._onnx()
        from ..manifest import FFNSpec, LayerSpec
        from ..moe import MoEParams
        E = layer.num_experts
        routing = dataclasses.replace(layer.routing, router_bias=False)
        probe = LayerSpec(0, E, E, routing, FFNSpec(1, "relu", bias=True))
        experts = [{"up": np.zeros((1, E), np.float32), "up_bias": np.ones(1, np.float32),
                    "down": np.zeros((E, 1), np.float32),
                    "down_bias": np.eye(E, dtype=np.float32)[e]} for e in range(E)]
        params = MoEParams(np.eye(E, dtype=np.float32), None,
                           None if selection_bias is None else _f32(selection_bias), experts)
        nodes, inits, functions = conv._ort_layer(probe, params, "output", self.router)
        matmul = nodes[0]
        assert matmul.op_type == "MatMul" and matmul.input[0] == "hidden_states"
        helper, tp = onnx.helper, onnx.TensorProto
        nodes[0] = helper.make_node("Identity", ["logits"], list(matmul.output),
                                    name="probe_logits")
        inits = [t for t in inits if t.name != matmul.input[1]]
        graph = helper.make_graph(
            nodes, "seif_ort_router_probe",
            [helper.make_tensor_value_info("hidden_states", tp.FLOAT, ["T", E]),
             helper.make_tensor_value_info("logits", tp.FLOAT, ["T", E])],
            [helper.make_tensor_value_info("output", tp.FLOAT, ["T", E])], inits)
        return conv._make_model(graph, functions, [(conv.MS_DOMAIN, 1)])

    def route(self, case: Case):
        from .tolerance import _rank_key
        layer = case.layer_spec()
        z = _f32(case.inputs["logits"])
        T, k = z.shape[0], layer.routing.top_k
        model = self.probe_model(layer, case.inputs.get("selection_bias"))
        (dense,) = self.session(model).run(
            None, {"hidden_states": np.zeros_like(z), "logits": z})
        idx = np.zeros((T, k), np.int64)
        w = np.zeros((T, k), np.float32)
        for t in range(T):
            row = dense[t]
            sel = np.nonzero((row != 0) | np.isnan(row))[0]
            if len(sel) != k:
                raise AssertionError(f"token {t}: the op applied {len(sel)} non-zero "
                                     f"weight(s), expected k = {k}: {row.tolist()}")
            key = _rank_key(case.expected["choice"][t])
            order = sorted(sel.tolist(), key=lambda e: (-key[e], e))
            idx[t], w[t] = order, row[order]
        return idx, w


class OrtComMicrosoftStockBackend(OrtComMicrosoftBackend):
    """The com.microsoft.MoE lowering with ORT's own routing for plain softmax top-k
    (``moe_model(..., target="ort", ort_router="stock")``): not conforming on exact ties
    (higher index) and NaN tokens (0), which this backend makes visible."""

    def __init__(self, threads: int = 1):
        super().__init__(threads, router="stock")
