"""SEIF <-> ONNX: the `ai.seif` operator domain (spec/ops.md), export, lowering, import.

Export (`seif convert X.seif OUT.onnx --to onnx`) writes one MoE layer per model: input
`hidden_states` float32 [T, H] (T dynamic), output `output` [T, H], weights as initializers
(external data beyond 2 GB). Targets:

* ``portable`` / ``seif-kernels``: one `ai.seif.SeifMoE` node whose model-local ONNX function
  body (standard ops, opset 21, IR 10) computes the layer exactly per spec §5-6, so ONNX Runtime
  and `onnx.reference` run it; when the `libseif_ort.so` custom-op library is registered, its
  kernel replaces the body (a kernel wins over a same-named local function). The two targets
  write the same graph; `seif-kernels` only records the intent in the model metadata.
* ``ort``: a lowering to ONNX Runtime's own `com.microsoft.MoE` (fp32, SwiGLU rows interleaved,
  `swiglu_fusion=1`). Plain softmax top-k routing feeds the router logits straight to the op;
  every other token-choice router is computed in front of it (an `ai.seif.SeifRouter` function
  node, i.e. standard ops) and passed as log-weights, with one Mul by the weights' sum after it.
  Capacity, expert choice, Soft MoE, `weight_on: input` and activations the op lacks are refused.

`--all-layers` writes one model holding one SeifMoE node per layer, all reading `hidden_states`,
with outputs `output_<index>`; this needs every layer to share one configuration (a model holds
one SeifMoE function body), otherwise export the layers one at a time with `--layer`.

Import (`seif convert model.onnx OUT.seif --from onnx`) reads `ai.seif.SeifMoE` nodes back
(attributes -> routing/FFN descriptors, initializers -> per-expert tensors, byte-identical for
fp32) and `com.microsoft.MoE` nodes (un-interleaving fused SwiGLU), identifying the router only
when it is exactly a pattern this module emits, or a plain MatMul (+ Add) of router logits.

The function bodies compute every expert densely and mask: they are a portable reference, not a
fast path. `onnx` is imported lazily: `import seif` never imports it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seif.errors import ConversionError, FormatError
from seif.manifest import (
    Capacity,
    FFNSpec,
    LayerSpec,
    ModelInfo,
    RoutingSpec,
    SharedExpertsSpec,
    Training,
)

__all__ = [
    "DOMAIN",
    "IR_VERSION",
    "MOE_INPUTS",
    "OPSET",
    "TARGETS",
    "export_layers",
    "from_onnx",
    "import_layers",
    "layer_attributes",
    "moe_model",
    "operator_refusal",
    "ort_lowering_refusal",
    "register",
    "router_model",
    "to_onnx",
]

DOMAIN = "ai.seif"
DOMAIN_VERSION = 1
MS_DOMAIN = "com.microsoft"
OPSET = 21
IR_VERSION = 10
TARGETS = ("portable", "seif-kernels", "ort")
EXTERNAL_DATA_BYTES = 2**31 - 2**26        # protobuf's 2 GiB limit, with room for the graph
LOG_WEIGHT_FILL = -1.0e4                    # router_probs outside the selected experts

# SeifMoE's inputs, in order (spec/ops.md). Absent optional inputs are "".
MOE_INPUTS = (
    "hidden_states", "router_weight", "router_bias", "selection_bias",
    "gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias",
    "shared_gate_proj", "shared_up_proj", "shared_down_proj",
    "shared_gate_bias", "shared_up_bias", "shared_down_bias", "shared_expert_gate",
)
ROUTER_INPUTS = ("logits", "selection_bias")
ROUTER_OUTPUTS = ("indices", "weights", "kept")

# Attribute name -> (type, default). Types: "s" string, "i" int, "f" float.
ROUTER_ATTRIBUTES: dict[str, tuple[str, Any]] = {
    "kind": ("s", "topk"), "top_k": ("i", 1), "scoring": ("s", "softmax"),
    "normalize": ("s", "none"), "norm_p": ("f", 1.0), "epsilon": ("f", 0.0),
    "epsilon_rule": ("s", "add"), "scale": ("f", 1.0), "n_group": ("i", 1),
    "topk_group": ("i", 1), "group_score": ("s", "max"), "group_mask": ("s", "neg_inf"),
    "jitter_eps": ("f", 0.0), "capacity_tokens": ("i", 0), "capacity_factor": ("f", 0.0),
}
MOE_ATTRIBUTES: dict[str, tuple[str, Any]] = {
    **ROUTER_ATTRIBUTES,
    "activation": ("s", "swiglu"), "alpha": ("f", 1.702), "limit": ("f", 7.0),
    "weight_on": ("s", "output"), "drop_policy": ("s", "zero"), "slots_per_expert": ("i", 0),
}
TOKEN_CHOICE = ("topk", "group_topk", "sparse_mixer")


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConversionError("ONNX support needs the 'onnx' package: pip install "
                              "'seif[onnx]'") from None
    return onnx


# =========================================================================== attributes
def _f32_decimal(value: float) -> float:
    """The shortest decimal that round-trips float32(value), as a Python float: how a float
    attribute (stored as float32) is read back (1e-20 -> 1e-20, not 9.99999968e-21)."""
    return float(str(np.float32(value)))


def layer_attributes(layer: LayerSpec) -> dict[str, Any]:
    """The SeifMoE node attributes (spec/ops.md) describing `layer`; all of them, explicitly."""
    r, ffn = layer.routing, layer.experts
    cap = r.capacity
    return {
        "kind": r.kind, "top_k": int(r.top_k), "scoring": r.scoring, "normalize": r.normalize,
        "norm_p": float(r.norm_p), "epsilon": float(r.epsilon), "epsilon_rule": r.epsilon_rule,
        "scale": float(r.scale), "n_group": int(r.n_group or 1),
        "topk_group": int(r.topk_group or 1), "group_score": r.group_score,
        "group_mask": r.group_mask, "jitter_eps": float(r.jitter_eps),
        "capacity_tokens": int(cap.tokens or 0) if cap else 0,
        "capacity_factor": float(cap.factor or 0.0) if cap else 0.0,
        "activation": ffn.activation, "alpha": float(ffn.alpha), "limit": float(ffn.limit),
        "weight_on": r.weight_on, "drop_policy": cap.drop_policy if cap else "zero",
        "slots_per_expert": int(r.slots_per_expert or 0),
    }


def _router_attributes(layer: LayerSpec) -> dict[str, Any]:
    attrs = layer_attributes(layer)
    return {k: attrs[k] for k in ROUTER_ATTRIBUTES}


def operator_refusal(layer: LayerSpec) -> str | None:
    """Why one SeifMoE node cannot hold `layer` (None: it can): the operator has one activation
    attribute for the routed and the shared experts (swiglu_oai's alpha and limit included).
    The exporter and the torch module's whole-layer native call both ask."""
    se = layer.shared_experts
    if se is not None:
        a, b = se.ffn, layer.experts
        if a.activation != b.activation or (
                a.activation == "swiglu_oai" and (a.alpha, a.limit) != (b.alpha, b.limit)):
            return (f"shared experts use {a.activation}, routed experts {b.activation}; SeifMoE "
                    f"has one activation attribute for both")
    return None


def _check_exportable(layer: LayerSpec) -> None:
    why_not = operator_refusal(layer)
    if why_not is not None:
        raise ConversionError(f"layer {layer.index}: {why_not}")


# =========================================================================== graph builder
class _Builder:
    """Appends ONNX nodes with fresh output names; used for function bodies and graphs."""

    def __init__(self, prefix: str = ""):
        self.onnx = _onnx()
        self.nodes: list = []
        self.prefix = prefix
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs):
        helper = self.onnx.helper
        outs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, domain=domain,
                                name=self.fresh(f"n_{op_type}"), **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [],
                       value=self.onnx.numpy_helper.from_array(arr, name=self.fresh("c")))

    # small conveniences ------------------------------------------------------------------
    def f32(self, x: str) -> str:
        return self.op("Cast", [x], to=self.onnx.TensorProto.FLOAT)

    def unsqueeze(self, x: str, axes) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes), np.int64)])

    def dim(self, x: str, axis: int) -> str:
        """1-D int64 [1]: x.shape[axis]."""
        end = axis + 1 if axis != -1 else None
        return self.op("Shape", [x], start=axis) if end is None \
            else self.op("Shape", [x], start=axis, end=end)

    def scalar(self, x1d: str) -> str:
        return self.op("Squeeze", [x1d, self.const([0], np.int64)])

    def arange(self, n1d: str) -> str:
        return self.op("Range", [self.const(0, np.int64), self.scalar(n1d),
                                 self.const(1, np.int64)])


def _topk_idx(b: _Builder, v: str, k1d: str, rank: int = 2) -> str:
    """Indices of the k largest entries along the last axis, best first, under spec §6.2's
    order: NaN first (NaNs by index), then larger values, equal values (+0 == -0) to the lower
    index. ONNX TopK breaks ties to the lower index, which makes it a stable sort: sorting by
    value (NaN keyed as 0) and then by is-NaN gives exactly that order, with no NaN ever
    reaching TopK."""
    ax = rank - 1          # onnx.reference mishandles negative GatherElements axes
    isnan = b.op("IsNaN", [v])
    zero = b.const(0.0)
    key = b.op("Add", [b.op("Where", [isnan, zero, v]), zero])        # -0 -> +0
    n = b.dim(v, -1)
    _, perm = b.op("TopK", [key, n], n_out=2, axis=ax, largest=1, sorted=1)
    nan_key = b.op("GatherElements", [b.op("Cast", [isnan], to=b.onnx.TensorProto.FLOAT), perm],
                   axis=ax)
    _, pos = b.op("TopK", [nan_key, k1d], n_out=2, axis=ax, largest=1, sorted=1)
    return b.op("GatherElements", [perm, pos], axis=ax)


def _k(b: _Builder, k: int) -> str:
    return b.const([k], np.int64)


def _sigmoid(b: _Builder, v: str) -> str:
    """1 / (1 + exp(-v)), as spec §6 and the reference (`seif.routing._sigmoid`) compute it.
    Not ONNX `Sigmoid`: ONNX Runtime's CPU Sigmoid (MLAS) is accurate only in absolute terms
    (sigmoid(-10) comes out 2e-4 too small relatively, sigmoid(-20) as 0), far outside the
    router's float32 tolerance, while its `Exp` is accurate. Very negative v: exp overflows to
    inf and the result is exactly 0, the correctly rounded answer; NaN stays NaN."""
    return b.op("Reciprocal", [b.op("Add", [b.op("Exp", [b.op("Neg", [v])]), b.const(1.0)])])


# =========================================================================== router body
def _capacity_c(b: _Builder, cap: Capacity, T1d: str, E1d: str, top_k: int,
                clip: bool) -> str:
    """C (int64 [1]) per spec §5.6, the factor form evaluated in float64 left to right."""
    tp = b.onnx.TensorProto
    if cap.tokens is not None:
        c = b.const([cap.tokens], np.int64)
    else:
        t = b.op("Cast", [T1d], to=tp.DOUBLE)
        e = b.op("Cast", [E1d], to=tp.DOUBLE)
        prod = b.op("Mul", [b.const([cap.factor], np.float64), t])
        prod = b.op("Mul", [prod, b.const([float(top_k)], np.float64)])
        c = b.op("Cast", [b.op("Ceil", [b.op("Div", [prod, e])])], to=tp.INT64)
    return b.op("Min", [c, T1d]) if clip else c


def _sparse_mixer(b: _Builder, z: str, jitter_eps: float) -> tuple[str, str]:
    two_eps = b.const(np.float32(2 * jitter_eps))
    E1d = b.dim(z, 1)
    rng = b.arange(E1d)
    absz = b.op("Abs", [z])
    neg_inf = b.const(-np.inf)
    eligible = z
    idx, wts = [], []
    for _ in range(2):
        i = _topk_idx(b, eligible, _k(b, 1))                       # [T, 1]
        m = b.op("GatherElements", [eligible, i], axis=1)          # [T, 1]
        factor = b.op("Max", [absz, m])
        gap = b.op("Div", [b.op("Sub", [m, z]), factor])
        masked = b.op("Greater", [gap, two_eps])
        gates = b.op("Where", [masked, neg_inf, eligible])
        probs = b.op("Softmax", [gates], axis=1)
        idx.append(i)
        wts.append(b.op("GatherElements", [probs, i], axis=1))
        chosen = b.op("Equal", [i, rng])                            # [T, E]
        eligible = b.op("Where", [chosen, neg_inf, eligible])
    return (b.op("Concat", idx, axis=1), b.op("Concat", wts, axis=1))


def _group_limit(b: _Builder, c: str, r: RoutingSpec) -> str:
    G = r.n_group
    # [T, G, P] spelled with T and P taken from the data (ORT rewrites [0, G, -1]-like shapes
    # to contain -1, which it then refuses for T = 0).
    per = b.op("Div", [b.dim(c, 1), b.const([G], np.int64)])
    c3 = b.op("Reshape", [c, b.op("Concat", [b.dim(c, 0), b.const([G], np.int64), per],
                                  axis=0)])
    n_best = 1 if r.group_score == "max" else 2
    top = b.op("GatherElements", [c3, _topk_idx(b, c3, _k(b, n_best), rank=3)], axis=2)
    if r.group_score == "max":       # via top-1 so a NaN in a group makes its score NaN
        gs = b.op("Squeeze", [top, b.const([-1], np.int64)])
    else:
        first = b.op("Slice", [top, b.const([0], np.int64), b.const([1], np.int64),
                               b.const([2], np.int64)])
        second = b.op("Slice", [top, b.const([1], np.int64), b.const([2], np.int64),
                                b.const([2], np.int64)])
        gs = b.op("Squeeze", [b.op("Add", [first, second]), b.const([-1], np.int64)])
    best = _topk_idx(b, gs, _k(b, r.topk_group))                   # [T, topk_group]
    zeros = b.op("ConstantOfShape", [b.op("Shape", [gs])],
                 value=b.onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    ones = b.op("ConstantOfShape", [b.op("Shape", [best])],
                value=b.onnx.numpy_helper.from_array(np.ones(1, np.float32)))
    keep = b.op("Greater", [b.op("ScatterElements", [zeros, best, ones], axis=1),
                            b.const(0.5)])                           # [T, G]
    keep = b.op("Expand", [b.unsqueeze(keep, [-1]), b.op("Shape", [c3])])
    keep = b.op("Reshape", [keep, b.op("Shape", [c])])
    fill = b.const(-np.inf if r.group_mask == "neg_inf" else 0.0)
    return b.op("Where", [keep, c, fill])


def _normalize_scale(b: _Builder, w: str, r: RoutingSpec) -> str:
    if r.normalize != "none":
        if r.normalize == "sum":
            size = b.op("ReduceSum", [w, b.const([-1], np.int64)], keepdims=1)
        else:
            p = b.const(np.float32(r.norm_p))
            powed = b.op("Pow", [b.op("Abs", [w]), p])
            size = b.op("ReduceSum", [powed, b.const([-1], np.int64)], keepdims=1)
            size = b.op("Pow", [size, b.const(np.float32(1.0 / r.norm_p))])
        eps = b.const(np.float32(r.epsilon))
        denom = b.op("Add" if r.epsilon_rule == "add" else "Max", [size, eps])
        w = b.op("Div", [w, denom])
    return b.op("Mul", [w, b.const(np.float32(r.scale))])


def _router_body(b: _Builder, r: RoutingSpec, logits: str, sel_bias: str | None,
                 out_names: list[str] | None = None) -> tuple[str, str, str]:
    """Token-choice routing (spec §5.1-5.7, 5.11, capacity 5.6) -> (indices, weights, kept)."""
    tp = b.onnx.TensorProto
    z = b.f32(logits)
    k = r.top_k
    if r.kind == "sparse_mixer":
        idx, w = _sparse_mixer(b, z, r.jitter_eps)
    else:
        after = r.scoring in ("softmax_topk", "sigmoid_topk")
        if after:
            s = z
        elif r.scoring == "softmax":
            s = b.op("Softmax", [z], axis=1)
        else:
            s = _sigmoid(b, z)
        c = s if sel_bias is None else b.op("Add", [s, b.f32(sel_bias)])
        if r.kind == "group_topk":
            c = _group_limit(b, c, r)
        idx = _topk_idx(b, c, _k(b, k))
        w = b.op("GatherElements", [s, idx], axis=1)
        if r.scoring == "softmax_topk":
            w = b.op("Softmax", [w], axis=1)
        elif r.scoring == "sigmoid_topk":
            w = _sigmoid(b, w)
    w = _normalize_scale(b, w, r)
    if r.capacity is not None:
        T1d, E1d = b.dim(z, 0), b.dim(z, 1)
        C = _capacity_c(b, r.capacity, T1d, E1d, k, clip=False)
        flat = b.op("Reshape", [b.op("Transpose", [idx], perm=[1, 0]),
                                b.const([-1], np.int64)])           # choice-major, token-minor
        onehot = b.op("Cast", [b.op("Equal", [b.unsqueeze(flat, [-1]), b.arange(E1d)])],
                      to=tp.INT64)                                  # [k*T, E]
        before = b.op("CumSum", [onehot, b.const(0, np.int64)], exclusive=1)
        pos = b.op("ReduceSum", [b.op("Mul", [before, onehot]), b.const([1], np.int64)],
                   keepdims=0)
        kept = b.op("Less", [pos, C])
        kept = b.op("Transpose", [b.op("Reshape", [kept, b.const([k, -1], np.int64)])],
                    perm=[1, 0])
    else:
        kept = b.op("ConstantOfShape", [b.op("Shape", [idx])],
                    value=b.onnx.numpy_helper.from_array(np.ones(1, bool)))
    if out_names:
        idx = b.op("Identity", [idx], outputs=[out_names[0]])
        w = b.op("Identity", [w], outputs=[out_names[1]])
        kept = b.op("Identity", [kept], outputs=[out_names[2]])
    return idx, w, kept


# =========================================================================== MoE body
def _activation(b: _Builder, name: str, g: str | None, u: str, alpha: float,
                limit: float) -> str:
    def gelu(v, approx):
        # Spelled out (Erf / Tanh) rather than opset-20 Gelu, which onnx.reference only runs
        # after shape inference; 0.5 v (1 + erf(v / sqrt 2)) and its tanh approximation.
        if approx == "none":
            inner = b.op("Erf", [b.op("Mul", [v, b.const(np.float32(math.sqrt(0.5)))])])
        else:
            cube = b.op("Mul", [b.op("Mul", [v, v]), v])
            poly = b.op("Add", [v, b.op("Mul", [cube, b.const(np.float32(0.044715))])])
            inner = b.op("Tanh", [b.op("Mul", [poly, b.const(
                np.float32(math.sqrt(2.0 / math.pi)))])])
        half = b.op("Mul", [v, b.const(0.5)])
        return b.op("Mul", [half, b.op("Add", [inner, b.const(1.0)])])

    def silu(v):
        return b.op("Mul", [v, _sigmoid(b, v)])

    if name == "swiglu":
        return b.op("Mul", [silu(g), u])
    if name == "geglu":
        return b.op("Mul", [gelu(g, "none"), u])
    if name == "geglu_tanh":
        return b.op("Mul", [gelu(g, "tanh"), u])
    if name == "swiglu_oai":
        lim = np.float32(limit)
        g2 = b.op("Min", [g, b.const(lim)])
        u2 = b.op("Clip", [u, b.const(-lim), b.const(lim)])
        glu = b.op("Mul", [g2, _sigmoid(b, b.op("Mul", [g2, b.const(np.float32(alpha))]))])
        return b.op("Mul", [b.op("Add", [u2, b.const(1.0)]), glu])
    if name == "relu":
        return b.op("Relu", [u])
    if name == "gelu":
        return gelu(u, "none")
    if name == "gelu_tanh":
        return gelu(u, "tanh")
    if name == "silu":
        return silu(u)
    if name == "relu2":
        r = b.op("Relu", [u])
        return b.op("Mul", [r, r])
    raise ConversionError(f"unknown activation {name!r}")


def _dense_ffn(b: _Builder, X: str, ffn: FFNSpec, w: dict[str, str | None]) -> str:
    """All experts on X ([N, H] broadcast, or [E, N, H]) -> [E, N, H]; w maps gate/up/down and
    *_bias to stacked input names ([E, out, in], [E, out])."""
    def lin(inp, weight, bias):
        wt = b.op("Transpose", [b.f32(weight)], perm=[0, 2, 1])
        y = b.op("MatMul", [inp, wt])
        if bias is not None:
            y = b.op("Add", [y, b.unsqueeze(b.f32(bias), [1])])
        return y

    up = lin(X, w["up"], w.get("up_bias"))
    gate = lin(X, w["gate"], w.get("gate_bias")) if ffn.gated else None
    h = _activation(b, ffn.activation, gate, up, ffn.alpha, ffn.limit)
    return lin(h, w["down"], w.get("down_bias"))


def _moe_body(b: _Builder, layer: LayerSpec, present: set[str], out_name: str | None = None,
              router_fn: bool = True) -> str:
    r = layer.routing
    inp = {n: (n if n in present else None) for n in MOE_INPUTS}
    x = b.f32(inp["hidden_states"])
    logits = b.op("MatMul", [x, b.op("Transpose", [b.f32(inp["router_weight"])], perm=[1, 0])])
    if inp["router_bias"]:
        logits = b.op("Add", [logits, b.f32(inp["router_bias"])])
    experts = {"gate": inp["gate_proj"], "up": inp["up_proj"], "down": inp["down_proj"],
               "gate_bias": inp["gate_bias"], "up_bias": inp["up_bias"],
               "down_bias": inp["down_bias"]}
    zero = b.const(0.0)
    if r.kind == "soft_moe":
        S = r.slots_per_expert
        H1d = b.dim(x, 1)
        D = b.op("Softmax", [logits], axis=0)
        Cw = b.op("Softmax", [logits], axis=1)
        slot_in = b.op("MatMul", [b.op("Transpose", [D], perm=[1, 0]), x])    # [E*S, H]
        X3 = b.op("Reshape", [slot_in, b.op("Concat", [b.const([-1, S], np.int64), H1d],
                                              axis=0)])                        # [E, S, H]
        Y3 = _dense_ffn(b, X3, layer.experts, experts)
        Y = b.op("Reshape", [Y3, b.op("Concat", [b.const([-1], np.int64), H1d], axis=0)])
        out = b.op("MatMul", [Cw, Y])
    else:
        if r.kind == "expert_choice":
            s = b.op("Softmax", [logits], axis=1) if r.scoring == "softmax" \
                else _sigmoid(b, logits)
            sT = b.op("Transpose", [s], perm=[1, 0])                            # [E, T]
            C = _capacity_c(b, r.capacity, b.dim(x, 0), b.dim(logits, 1), 1, clip=True)
            tok = _topk_idx(b, sT, C)                                          # [E, C]
            g = b.op("Mul", [b.op("GatherElements", [sT, tok], axis=1),
                             b.const(np.float32(r.scale))])
            zeros = b.op("ConstantOfShape", [b.op("Shape", [sT])],
                         value=b.onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
            ones = b.op("ConstantOfShape", [b.op("Shape", [tok])],
                        value=b.onnx.numpy_helper.from_array(np.ones(1, np.float32)))
            WT = b.op("ScatterElements", [zeros, tok, g], axis=1)             # [E, T]
            MT = b.op("Greater", [b.op("ScatterElements", [zeros, tok, ones], axis=1),
                                  b.const(0.5)])
        else:
            if router_fn:
                idx, w, kept = b.op("SeifRouter", [logits, inp["selection_bias"] or ""],
                                    n_out=3, domain=DOMAIN, **_router_attributes(layer))
            else:
                idx, w, kept = _router_body(b, r, logits, inp["selection_bias"])
            rng = b.arange(b.dim(logits, 1))
            sel = b.op("And", [b.op("Equal", [b.unsqueeze(idx, [-1]), rng]),
                               b.unsqueeze(kept, [-1])])                      # [T, k, E]
            W = b.op("ReduceSum", [b.op("Where", [sel, b.unsqueeze(w, [-1]), zero]),
                                   b.const([1], np.int64)], keepdims=0)       # [T, E]
            M = b.op("ReduceMax", [b.op("Cast", [sel], to=b.onnx.TensorProto.INT32),
                                   b.const([1], np.int64)], keepdims=0)
            WT = b.op("Transpose", [W], perm=[1, 0])
            MT = b.op("Transpose", [b.op("Cast", [M], to=b.onnx.TensorProto.BOOL)],
                      perm=[1, 0])
        W3 = b.unsqueeze(WT, [-1])                                            # [E, T, 1]
        M3 = b.unsqueeze(MT, [-1])
        if r.weight_on == "input":
            Y = _dense_ffn(b, b.op("Mul", [W3, x]), layer.experts, experts)
        else:
            Y = b.op("Mul", [W3, _dense_ffn(b, x, layer.experts, experts)])
        out = b.op("ReduceSum", [b.op("Where", [M3, Y, zero]), b.const([0], np.int64)],
                   keepdims=0)
        if r.kind in TOKEN_CHOICE and r.capacity is not None \
                and r.capacity.drop_policy == "passthrough_scaled":
            dropped = b.op("ReduceSum", [b.op("Where", [kept, zero, w]),
                                         b.const([1], np.int64)], keepdims=1)  # [T, 1]
            out = b.op("Add", [out, b.op("Mul", [dropped, x])])
    if layer.shared_experts is not None:
        shared = {"gate": inp["shared_gate_proj"], "up": inp["shared_up_proj"],
                  "down": inp["shared_down_proj"], "gate_bias": inp["shared_gate_bias"],
                  "up_bias": inp["shared_up_bias"], "down_bias": inp["shared_down_bias"]}
        sh = b.op("ReduceSum", [_dense_ffn(b, x, layer.shared_experts.ffn, shared),
                                b.const([0], np.int64)], keepdims=0)
        if inp["shared_expert_gate"]:
            gate = b.op("MatMul", [x, b.op("Transpose", [b.f32(inp["shared_expert_gate"])],
                                            perm=[1, 0])])
            sh = b.op("Mul", [_sigmoid(b, gate), sh])
        out = b.op("Add", [out, sh])
    return b.op("CastLike", [out, inp["hidden_states"]], outputs=[out_name] if out_name else None)


def _present_inputs(layer: LayerSpec) -> set[str]:
    r, ffn, se = layer.routing, layer.experts, layer.shared_experts
    present = {"hidden_states", "router_weight", "up_proj", "down_proj"}
    if r.router_bias:
        present.add("router_bias")
    if r.selection_bias:
        present.add("selection_bias")
    if ffn.gated:
        present.add("gate_proj")
    if ffn.bias:
        present |= {"up_bias", "down_bias"} | ({"gate_bias"} if ffn.gated else set())
    if se is not None:
        present |= {"shared_up_proj", "shared_down_proj"}
        if se.ffn.gated:
            present.add("shared_gate_proj")
        if se.ffn.bias:
            present |= {"shared_up_bias", "shared_down_bias"} | (
                {"shared_gate_bias"} if se.ffn.gated else set())
        if se.gate:
            present.add("shared_expert_gate")
    return present


def _functions(layer: LayerSpec, with_moe: bool = True) -> list:
    """The model-local functions for `layer`'s configuration: SeifRouter (token choice) first,
    since a caller must follow its callee for onnx.reference, then SeifMoE."""
    onnx = _onnx()
    helper = onnx.helper
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    funcs = []
    if layer.routing.kind in TOKEN_CHOICE:
        b = _Builder("r_")
        _router_body(b, layer.routing, "logits",
                     "selection_bias" if layer.routing.selection_bias else None,
                     out_names=list(ROUTER_OUTPUTS))
        funcs.append(helper.make_function(
            DOMAIN, "SeifRouter", list(ROUTER_INPUTS), list(ROUTER_OUTPUTS), b.nodes, opsets,
            attributes=list(ROUTER_ATTRIBUTES),
            doc_string=f"SEIF router, body specialised to {json.dumps(_router_attributes(layer))}"))
    if with_moe:
        b = _Builder("m_")
        _moe_body(b, layer, _present_inputs(layer), out_name="output")
        funcs.append(helper.make_function(
            DOMAIN, "SeifMoE", list(MOE_INPUTS), ["output"], b.nodes, opsets,
            attributes=list(MOE_ATTRIBUTES),
            doc_string="SEIF MoE layer (dense-with-masking reference body), specialised to "
                       + json.dumps(layer_attributes(layer))))
    return funcs


def _config_key(layer: LayerSpec) -> str:
    return json.dumps([layer_attributes(layer), sorted(_present_inputs(layer)),
                       layer.shared_experts.ffn.to_dict() if layer.shared_experts else None])


# =========================================================================== tensors
def _stack(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.ascontiguousarray(np.stack([np.asarray(a) for a in arrays]).astype(dtype,
                                                                              copy=False))


def _moe_initializers(layer: LayerSpec, params, dtype) -> dict[str, np.ndarray]:
    """Contract input name -> stacked array ([E, out, in] experts)."""
    out: dict[str, np.ndarray] = {
        "router_weight": np.asarray(params.router_weight).astype(dtype, copy=False)}
    if params.router_bias is not None:
        out["router_bias"] = np.asarray(params.router_bias).astype(dtype, copy=False)
    if params.selection_bias is not None:
        out["selection_bias"] = np.asarray(params.selection_bias).astype(dtype, copy=False)
    for prefix, group, ffn in (("", params.experts, layer.experts),
                               ("shared_", params.shared,
                                layer.shared_experts.ffn if layer.shared_experts else None)):
        if not group:
            continue
        for proj in ffn.projections:
            out[f"{prefix}{proj}_proj"] = _stack([e[proj] for e in group], dtype)
            if ffn.bias:
                out[f"{prefix}{proj}_bias"] = _stack([e[f"{proj}_bias"] for e in group], dtype)
    if params.shared_gate is not None:
        out["shared_expert_gate"] = np.asarray(params.shared_gate).astype(dtype, copy=False)
    return out


def _np_dtype(dtype) -> type:
    if dtype in (None, "f32", "float32", "F32", np.float32):
        return np.float32
    if dtype in ("f16", "float16", "F16", np.float16):
        return np.float16
    if dtype in ("bf16", "bfloat16", "BF16"):
        import ml_dtypes
        return ml_dtypes.bfloat16
    raise ConversionError(f"unsupported dtype {dtype!r} for ONNX export (f32, f16, bf16)")


def _initializer(name: str, arr: np.ndarray):
    onnx = _onnx()
    if arr.dtype.name == "bfloat16":
        t = onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, arr.shape,
                                    arr.view(np.uint16).tobytes(), raw=True)
        return t
    return onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name=name)


# =========================================================================== models
def _make_model(graph, functions, extra_opsets=(), metadata: dict[str, str] | None = None):
    onnx = _onnx()
    helper = onnx.helper
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions,
                              ir_version=IR_VERSION, producer_name="seif",
                              producer_version=_seif_version())
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model


def _seif_version() -> str:
    import seif
    return seif.__version__


def router_model(layer: LayerSpec, selection_bias: np.ndarray | None = None):
    """A model with one `ai.seif.SeifRouter` node: input `logits` float [N, E], outputs
    `indices`, `weights`, `kept` (for testing the router function and kernels)."""
    onnx = _onnx()
    helper, tp = onnx.helper, onnx.TensorProto
    if layer.routing.kind not in TOKEN_CHOICE:
        raise ConversionError(f"SeifRouter handles {', '.join(TOKEN_CHOICE)}, not "
                              f"{layer.routing.kind}")
    E = layer.num_experts
    inits = []
    if layer.routing.selection_bias:
        if selection_bias is None:
            raise ConversionError("this routing needs a selection bias")
        inits.append(_initializer("selection_bias", np.asarray(selection_bias, np.float32)))
    node = helper.make_node("SeifRouter", ["logits", "selection_bias" if inits else ""],
                            list(ROUTER_OUTPUTS), domain=DOMAIN, name="router",
                            **_router_attributes(layer))
    k = layer.routing.top_k
    graph = helper.make_graph(
        [node], "seif_router", [helper.make_tensor_value_info("logits", tp.FLOAT, ["N", E])],
        [helper.make_tensor_value_info("indices", tp.INT64, ["N", k]),
         helper.make_tensor_value_info("weights", tp.FLOAT, ["N", k]),
         helper.make_tensor_value_info("kept", tp.BOOL, ["N", k])], inits)
    return _make_model(graph, _functions(layer, with_moe=False))


def moe_model(layers_params: list[tuple[LayerSpec, Any]], *, target: str = "portable",
              dtype=None, model_info: ModelInfo | None = None, ort_router: str = "seif"):
    """The ONNX model (ModelProto) for one or more MoE layers with their `seif.moe.MoEParams`.

    One layer: output `output`; several: outputs `output_<index>`, all from `hidden_states`.
    `ort_router` (target ``ort`` only): ``seif`` (the default) computes every router with the
    `SeifRouter` log-weight form, which follows spec §6.2 and §6.3 exactly; ``stock`` feeds plain
    softmax top-k logits straight to com.microsoft.MoE, one subgraph less, but its own top-k
    breaks exact ties to the higher index and turns a NaN token into 0 (not conforming: the
    conformance suite's ``ort-com-microsoft-stock`` backend shows exactly which cases fail).
    """
    onnx = _onnx()
    helper, tp = onnx.helper, onnx.TensorProto
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if not layers_params:
        raise ConversionError("no layers to export")
    if ort_router not in ("seif", "stock"):
        raise ConversionError(f"unknown ort_router {ort_router!r}; use seif or stock")
    H = layers_params[0][0].hidden_size
    if any(layer.hidden_size != H for layer, _ in layers_params):
        raise ConversionError("layers differ in hidden size; export them one at a time")
    single = len(layers_params) == 1
    nodes, inits, outputs, functions = [], [], [], {}
    extra_opsets = []
    for layer, params in layers_params:
        _check_exportable(layer)
        final_name = "output" if single else f"output_{layer.index}"
        # SEIF 1.1 output bias (§5.16): an Add of the [H] bias after the layer's MoE output, so
        # the op contract (and its kernels) stay what they are; import reads the Add back.
        out_name = f"layers.{layer.index}.moe_output" if layer.output_bias else final_name
        if target == "ort":
            refusal = ort_lowering_refusal(layer)
            if refusal:
                raise ConversionError(f"layer {layer.index} cannot be lowered to "
                                      f"com.microsoft.MoE: {refusal}")
            if dtype not in (None, "f32", "float32"):
                raise ConversionError("--target ort is float32 only (the CPU MoE kernel)")
            n, i, fns = _ort_layer(layer, params, out_name, ort_router)
            nodes += n
            inits += i
            for f in fns:
                functions.setdefault((f.name, _config_key(layer)), f)
            extra_opsets = [(MS_DOMAIN, 1)]
        else:
            arrays = _moe_initializers(layer, params, _np_dtype(dtype))
            names = []
            for name in MOE_INPUTS:
                if name == "hidden_states":
                    names.append("hidden_states")
                elif name in arrays:
                    names.append(f"layers.{layer.index}.{name}")
                    inits.append(_initializer(names[-1], arrays[name]))
                else:
                    names.append("")
            while names and names[-1] == "":
                names.pop()
            names += [""] * (len(MOE_INPUTS) - len(names))   # onnx.reference wants them all
            nodes.append(helper.make_node("SeifMoE", names, [out_name], domain=DOMAIN,
                                          name=f"layers.{layer.index}.moe",
                                          **layer_attributes(layer)))
            for f in _functions(layer):
                functions.setdefault((f.name, _config_key(layer)), f)
        if layer.output_bias:
            nodes.append(_output_bias_node(layer, params, out_name, final_name, inits))
        outputs.append(helper.make_tensor_value_info(final_name, tp.FLOAT, ["T", H]))
    by_name: dict[str, list] = {}
    for (name, _key), f in functions.items():
        by_name.setdefault(name, []).append(f)
    if any(len(v) > 1 for v in by_name.values()):
        raise ConversionError(
            "these layers differ in configuration, and a model holds one SeifMoE function "
            "body (ONNX Runtime and onnx.reference do not honour function overloads); export "
            "the layers one at a time with --layer")
    ordered = by_name.get("SeifRouter", []) + by_name.get("SeifMoE", [])
    graph = helper.make_graph(
        nodes, "seif_moe", [helper.make_tensor_value_info("hidden_states", tp.FLOAT, ["T", H])],
        outputs, inits)
    meta = {"seif.target": target,
            "seif.layers": json.dumps([layer.to_dict() for layer, _ in layers_params])}
    if model_info is not None:
        meta["seif.model"] = json.dumps(model_info.to_dict())
    return _make_model(graph, ordered, extra_opsets, meta)


def _output_bias_node(layer: LayerSpec, params, moe_out: str, out_name: str, inits: list):
    """`out_name = moe_out + layers.{l}.output_bias` (float32 [H], like the layer output)."""
    bias = getattr(params, "output_bias", None)
    if bias is None or np.shape(bias) != (layer.hidden_size,):
        raise ConversionError(f"layer {layer.index} declares output_bias but its parameters "
                              f"hold {None if bias is None else list(np.shape(bias))}; "
                              f"expected [{layer.hidden_size}]")
    name = f"layers.{layer.index}.output_bias"
    inits.append(_initializer(name, np.ascontiguousarray(bias, dtype=np.float32)))
    return _onnx().helper.make_node("Add", [moe_out, name], [out_name], name=name)


# =========================================================================== ORT lowering
_ORT_ACTIVATIONS = {"swiglu": "swiglu", "swiglu_oai": "swiglu", "relu": "relu",
                    "gelu_tanh": "gelu", "silu": "silu"}


def ort_lowering_refusal(layer: LayerSpec) -> str | None:
    """Why `layer` cannot be lowered exactly to com.microsoft.MoE, or None if it can."""
    r, ffn = layer.routing, layer.experts
    if r.kind == "expert_choice":
        return "expert-choice routing (experts pick tokens) is not top-k token choice"
    if r.kind == "soft_moe":
        return "Soft MoE mixes tokens into slots; com.microsoft.MoE routes tokens to experts"
    if r.capacity is not None:
        return "capacity drops assignments depending on other tokens; com.microsoft.MoE " \
               "keeps every top-k assignment"
    if r.weight_on == "input":
        return "weight_on: input scales the expert's input; com.microsoft.MoE scales outputs"
    if ffn.activation not in _ORT_ACTIVATIONS:
        return (f"activation {ffn.activation} has no exact com.microsoft.MoE equivalent "
                "(its gelu is the tanh form; no geglu, no relu2)")
    if r.scale <= 0:
        return "a non-positive routed scale cannot pass through log-weights"
    return None


def _is_plain_softmax(layer: LayerSpec) -> bool:
    """Routing com.microsoft.MoE computes itself: softmax top-k, weights normalized (sum) or
    not, nothing else. An epsilon is harmless when it cannot change the sum (sum >= 1/E)."""
    r, E = layer.routing, layer.num_experts
    if r.kind != "topk" or r.scoring != "softmax" or r.selection_bias or r.scale != 1.0:
        return False
    if r.normalize == "none":
        return True
    if r.normalize != "sum":
        return False
    if r.epsilon_rule == "add":
        return r.epsilon == 0 or r.epsilon < 2.0**-30 / E
    return r.epsilon < 1.0 / E


def _ort_expert_weights(layer: LayerSpec, params) -> dict[str, np.ndarray]:
    """fc1 [E, 2I, H] (gate/up rows interleaved, swiglu_fusion=1) or [E, I, H], fc2 [E, H, I]."""
    ffn = layer.experts
    up = _stack([e["up"] for e in params.experts], np.float32)
    out = {"fc2": _stack([e["down"] for e in params.experts], np.float32)}
    if ffn.gated:
        gate = _stack([e["gate"] for e in params.experts], np.float32)
        E, I, H = up.shape
        fc1 = np.empty((E, 2 * I, H), np.float32)
        fc1[:, 0::2], fc1[:, 1::2] = gate, up
        out["fc1"] = fc1
    else:
        out["fc1"] = up
    if ffn.bias:
        ub = _stack([e["up_bias"] for e in params.experts], np.float32)
        if ffn.gated:
            gb = _stack([e["gate_bias"] for e in params.experts], np.float32)
            b1 = np.empty((ub.shape[0], 2 * ub.shape[1]), np.float32)
            b1[:, 0::2], b1[:, 1::2] = gb, ub
            out["fc1_bias"] = b1
        else:
            out["fc1_bias"] = ub
        out["fc2_bias"] = _stack([e["down_bias"] for e in params.experts], np.float32)
    return out


def _ort_moe_attributes(layer: LayerSpec, plain: bool) -> dict[str, Any]:
    ffn, r = layer.experts, layer.routing
    attrs: dict[str, Any] = {"k": int(r.top_k), "activation_type": _ORT_ACTIVATIONS[ffn.activation],
                             "normalize_routing_weights": int(r.normalize == "sum" or not plain)}
    if ffn.gated:
        attrs["swiglu_fusion"] = 1
        if ffn.activation == "swiglu_oai":
            attrs.update(activation_alpha=float(ffn.alpha), activation_beta=1.0,
                         swiglu_limit=float(ffn.limit))
        else:
            attrs.update(activation_alpha=1.0, activation_beta=0.0)
    return attrs


def _ort_layer(layer: LayerSpec, params, out_name: str, router: str = "seif"):
    """Nodes, initializers and functions computing `layer` with com.microsoft.MoE (`router`:
    see `moe_model`'s `ort_router`)."""
    onnx = _onnx()
    p = f"layers.{layer.index}."
    b = _Builder(p)
    inits = []

    def init(name, arr):
        inits.append(_initializer(p + name, np.ascontiguousarray(arr, dtype=np.float32)))
        return p + name

    x = "hidden_states"
    logits = b.op("MatMul", [x, init("router.weight_t",
                                     np.asarray(params.router_weight, np.float32).T)])
    if params.router_bias is not None:
        logits = b.op("Add", [logits, init("router.bias", params.router_bias)])
    ew = _ort_expert_weights(layer, params)
    fc = [init("experts.fc1", ew["fc1"]),
          init("experts.fc1_bias", ew["fc1_bias"]) if "fc1_bias" in ew else "",
          init("experts.fc2", ew["fc2"]),
          init("experts.fc2_bias", ew["fc2_bias"]) if "fc2_bias" in ew else ""]
    while fc[-1] == "":
        fc.pop()
    plain = router == "stock" and _is_plain_softmax(layer)
    functions = []
    moe_out = out_name if layer.shared_experts is None else None
    if plain:
        b.op("MoE", [x, logits, *fc], domain=MS_DOMAIN,
             outputs=[moe_out or b.fresh("moe")], **_ort_moe_attributes(layer, True))
        out = b.nodes[-1].output[0]
    else:
        sel = init("router.selection_bias", params.selection_bias) \
            if params.selection_bias is not None else ""
        idx, w, _kept = b.op("SeifRouter", [logits, sel], n_out=3, domain=DOMAIN,
                             **_router_attributes(layer))
        functions = _functions(layer, with_moe=False)
        fill = b.op("ConstantOfShape", [b.op("Shape", [logits])],
                    value=onnx.numpy_helper.from_array(np.full(1, LOG_WEIGHT_FILL, np.float32)))
        probs = b.op("ScatterElements", [fill, idx, b.op("Log", [w])], axis=1)
        moe = b.op("MoE", [x, probs, *fc], domain=MS_DOMAIN, **_ort_moe_attributes(layer, False))
        total = b.op("ReduceSum", [w, b.const([1], np.int64)], keepdims=1)
        out = b.op("Mul", [moe, total], outputs=[moe_out] if moe_out else None)
    if layer.shared_experts is not None:
        se = layer.shared_experts
        sh = None
        for s, weights in enumerate(params.shared):
            def lin(inp, proj, s=s, weights=weights):
                y = b.op("MatMul", [inp, init(f"shared_experts.{s}.{proj}.weight_t",
                                              np.asarray(weights[proj], np.float32).T)])
                if se.ffn.bias:
                    y = b.op("Add", [y, init(f"shared_experts.{s}.{proj}.bias",
                                             weights[f"{proj}_bias"])])
                return y
            h = _activation(b, se.ffn.activation, lin(x, "gate") if se.ffn.gated else None,
                            lin(x, "up"), se.ffn.alpha, se.ffn.limit)
            y = lin(h, "down")
            sh = y if sh is None else b.op("Add", [sh, y])
        if params.shared_gate is not None:
            g = b.op("MatMul", [x, init("shared_experts.gate.weight_t",
                                        np.asarray(params.shared_gate, np.float32).T)])
            sh = b.op("Mul", [_sigmoid(b, g), sh])
        b.op("Add", [out, sh], outputs=[out_name])
    return b.nodes, inits, functions


# =========================================================================== export entry
def _save_model(model, dst: Path) -> None:
    onnx = _onnx()
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        if size > EXTERNAL_DATA_BYTES:
            data = dst.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_layers(src, layer: int | None = None, all_layers: bool = False):
    """(ckpt model info, [(LayerSpec, MoEParams)]) selected from the checkpoint at `src`."""
    import seif
    ckpt = seif.open(src)
    try:
        layers = ckpt.layers
        if not layers:
            raise ConversionError("the checkpoint has no MoE layers", path=str(src))
        if all_layers and layer is not None:
            raise ConversionError("give --layer or --all-layers, not both")
        if all_layers:
            chosen = layers
        elif layer is not None:
            try:
                chosen = [ckpt.layer(int(layer))]
            except KeyError as exc:
                raise ConversionError(str(exc.args[0]), path=str(src)) from None
        elif len(layers) == 1:
            chosen = layers
        else:
            raise ConversionError(f"the checkpoint has {len(layers)} MoE layers "
                                  f"({[x.index for x in layers]}); pick one with --layer or "
                                  "export all with --all-layers", path=str(src))
        return ckpt.manifest.model, [(spec, ckpt.moe_params(spec.index)) for spec in chosen]
    finally:
        ckpt.close()


def to_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            dtype: str | None = None, show_progress: bool | None = None,
            layer: int | None = None, all_layers: bool = False, target: str = "portable",
            **options) -> Path:
    """SEIF checkpoint `src` -> ONNX model `dst` (see the module docstring)."""
    if options:
        raise ConversionError(f"options not supported for seif -> onnx: {', '.join(options)}")
    target = target or "portable"
    if target not in TARGETS:
        raise ConversionError(f"unknown --target {target!r}; use one of {', '.join(TARGETS)}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError("destination exists (pass --overwrite)", path=str(dst))
    info, chosen = export_layers(src, layer, all_layers)
    model = moe_model(chosen, target=target, dtype=dtype, model_info=info)
    _save_model(model, dst)
    return dst


# =========================================================================== import
@dataclass
class _Graph:
    producers: dict[str, Any]
    inits: dict[str, np.ndarray]
    functions: dict[tuple[str, str], Any]


def _attr_dict(node) -> dict[str, Any]:
    onnx = _onnx()
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _typed_attrs(node, table: dict[str, tuple[str, Any]], where: str) -> dict[str, Any]:
    raw = _attr_dict(node)
    unknown = set(raw) - set(table)
    if unknown:
        raise ConversionError(f"unknown attribute(s) {sorted(unknown)}", field=where)
    out = {}
    for name, (kind, default) in table.items():
        v = raw.get(name, default)
        if kind == "s" and not isinstance(v, str) or kind == "i" and not isinstance(v, int) \
                or kind == "f" and not isinstance(v, (int, float)):
            raise ConversionError(f"attribute {name} has the wrong type", field=where)
        out[name] = _f32_decimal(v) if kind == "f" and name in raw else (
            float(v) if kind == "f" else v)
    return out


def _routing_from_attrs(a: dict[str, Any], router_bias: bool, selection_bias: bool,
                        where: str) -> RoutingSpec:
    from seif.errors import SeifError
    cap = None
    if a["capacity_tokens"] or a["capacity_factor"]:
        cap = Capacity(tokens=a["capacity_tokens"] or None,
                       factor=a["capacity_factor"] or None, drop_policy=a["drop_policy"])
    d = {"kind": a["kind"], "top_k": a["top_k"], "scoring": a["scoring"],
         "router_bias": router_bias, "selection_bias": selection_bias,
         "normalize": a["normalize"], "norm_p": a["norm_p"], "epsilon": a["epsilon"],
         "epsilon_rule": a["epsilon_rule"], "scale": a["scale"], "weight_on": a["weight_on"],
         "group_score": a["group_score"], "group_mask": a["group_mask"],
         "jitter_eps": a["jitter_eps"]}
    if a["kind"] == "group_topk":
        d.update(n_group=a["n_group"], topk_group=a["topk_group"])
    if a["slots_per_expert"]:
        d["slots_per_expert"] = a["slots_per_expert"]
    if cap is not None:
        d["capacity"] = cap.to_dict()
    try:
        return RoutingSpec.from_dict(d, where)
    except SeifError as exc:
        raise ConversionError(f"routing attributes do not describe a valid SEIF routing: "
                              f"{exc.one_line()}", field=where) from None


def _init(g: _Graph, name: str, where: str) -> np.ndarray | None:
    if name == "":
        return None
    if name not in g.inits:
        raise ConversionError(f"input {name!r} is computed in the graph, not a stored "
                              "initializer; only exported weights can be imported", field=where)
    return g.inits[name]


def _ffn_from_stacks(prefix: str, arrays: dict[str, np.ndarray | None], activation: str,
                     alpha: float, limit: float, where: str) -> tuple[FFNSpec, list[dict]]:
    up, down, gate = arrays[f"{prefix}up_proj"], arrays[f"{prefix}down_proj"], \
        arrays[f"{prefix}gate_proj"]
    biases = [arrays[f"{prefix}{p}_bias"] for p in ("gate", "up", "down")]
    if up is None or down is None or up.ndim != 3 or down.ndim != 3:
        raise ConversionError(f"{prefix}up_proj/{prefix}down_proj must be [E, out, in]",
                              field=where)
    ffn = FFNSpec(int(up.shape[1]), activation, bias=biases[1] is not None, alpha=alpha,
                  limit=limit)
    if ffn.gated != (gate is not None):
        raise ConversionError(f"activation {activation} {'needs' if ffn.gated else 'takes no'} "
                              f"{prefix}gate_proj", field=where)
    wanted = [ffn.bias and ffn.gated, ffn.bias, ffn.bias]
    if [b is not None for b in biases] != wanted:
        raise ConversionError(f"{prefix} biases must be given for all projections or none",
                              field=where)
    experts = []
    for e in range(up.shape[0]):
        d = {"up": up[e], "down": down[e]}
        if ffn.gated:
            d["gate"] = gate[e]
        if ffn.bias:
            d["up_bias"], d["down_bias"] = biases[1][e], biases[2][e]
            if ffn.gated:
                d["gate_bias"] = biases[0][e]
        experts.append(d)
    return ffn, experts


def _layer_index(node, fallback: int) -> int:
    parts = node.name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return fallback


def _from_seif_node(node, g: _Graph, index: int):
    from seif.moe import MoEParams
    where = f"node {node.name or node.op_type}"
    a = _typed_attrs(node, MOE_ATTRIBUTES, where)
    names = list(node.input) + [""] * (len(MOE_INPUTS) - len(node.input))
    if len(names) > len(MOE_INPUTS):
        raise ConversionError(f"SeifMoE takes {len(MOE_INPUTS)} inputs", field=where)
    arrays = {n: (None if n == "hidden_states" else _init(g, v, where))
              for n, v in zip(MOE_INPUTS, names)}
    if arrays["router_weight"] is None or arrays["up_proj"] is None:
        raise ConversionError("SeifMoE needs router_weight and up_proj", field=where)
    routing = _routing_from_attrs(a, arrays["router_bias"] is not None,
                                  arrays["selection_bias"] is not None, where)
    ffn, experts = _ffn_from_stacks("", arrays, a["activation"], a["alpha"], a["limit"], where)
    E, _, H = arrays["up_proj"].shape
    shared, shared_spec = [], None
    if arrays["shared_up_proj"] is not None:
        sffn, shared = _ffn_from_stacks("shared_", arrays, a["activation"], a["alpha"],
                                        a["limit"], where)
        shared_spec = SharedExpertsSpec(len(shared), sffn, arrays["shared_expert_gate"] is not None)
    elif arrays["shared_expert_gate"] is not None:
        raise ConversionError("shared_expert_gate without shared experts", field=where)
    layer = LayerSpec(index, int(E), int(H), routing, ffn, shared_spec)
    params = MoEParams(arrays["router_weight"], arrays["router_bias"], arrays["selection_bias"],
                       experts, shared, arrays["shared_expert_gate"])
    return layer, params


def _producer(g: _Graph, name: str):
    return g.producers.get(name)


def _router_from_matmul(g: _Graph, name: str, x: str, where: str):
    """(router weight [E, H], bias or None) from `MatMul(x, W^T) [+ Add(b)]` or Gemm."""
    node = _producer(g, name)
    bias = None
    if node is not None and node.op_type == "Add":
        a, c = node.input
        if c in g.inits and a not in g.inits:
            bias, node = g.inits[c], _producer(g, a)
        elif a in g.inits:
            bias, node = g.inits[a], _producer(g, c)
    if node is None:
        raise ConversionError("cannot identify the router: router_probs is not computed from "
                              "the hidden states by MatMul (+ Add)", field=where)
    if node.op_type == "MatMul" and node.input[0] == x and node.input[1] in g.inits:
        w = np.ascontiguousarray(g.inits[node.input[1]].T)
    elif node.op_type == "Gemm" and node.input[0] == x and node.input[1] in g.inits:
        at = _attr_dict(node)
        if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or (
                len(node.input) > 2 and node.input[2] and at.get("beta", 1.0) != 1.0):
            raise ConversionError("cannot identify the router Gemm", field=where)
        w = g.inits[node.input[1]]
        w = np.ascontiguousarray(w if at.get("transB", 0) else w.T)
        if len(node.input) > 2 and node.input[2]:
            if bias is not None:
                raise ConversionError("cannot identify the router (two biases)", field=where)
            bias = g.inits.get(node.input[2])
    else:
        raise ConversionError(f"cannot identify the router: router_probs comes from "
                              f"{node.op_type}, not a MatMul of the hidden states", field=where)
    return w, bias


def _node_signature(nodes) -> list:
    onnx = _onnx()
    sig = []
    for n in nodes:
        attrs = []
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, onnx.TensorProto):
                v = onnx.numpy_helper.to_array(v).tolist()
            attrs.append((a.name, v))
        sig.append((n.op_type, n.domain, sorted(attrs, key=lambda t: t[0])))
    return sig


def _from_ms_moe(node, g: _Graph, all_nodes, index: int):
    from seif.moe import MoEParams
    where = f"node {node.name or 'MoE'}"
    a = _attr_dict(node)
    x = node.input[0]
    names = list(node.input) + [""] * (8 - len(node.input))
    fc1, fc1b, fc2, fc2b, fc3 = (_init(g, names[i], where) for i in (2, 3, 4, 5, 6))
    if fc3 is not None:
        raise ConversionError("separate fc3 weights (swiglu_fusion=0) are not imported",
                              field=where)
    if a.get("use_sparse_mixer", 0):
        raise ConversionError("use_sparse_mixer: its CPU and CUDA semantics differ (CPU "
                              "ignores it); refusing to guess", field=where)
    act = a.get("activation_type", b"relu")
    act = act.decode() if isinstance(act, bytes) else act
    alpha, beta = float(a.get("activation_alpha", 1.0)), float(a.get("activation_beta", 0.0))
    limit = a.get("swiglu_limit")
    if act == "swiglu":
        if a.get("swiglu_fusion", 0) not in (1, 2):
            raise ConversionError("only fused SwiGLU (swiglu_fusion 1 or 2) is imported",
                                  field=where)
        if alpha == 1.0 and beta == 0.0 and limit is None:
            activation, ffn_alpha, ffn_limit = "swiglu", 1.702, 7.0
        elif beta == 1.0 and limit is not None:
            activation, ffn_alpha, ffn_limit = "swiglu_oai", _f32_decimal(alpha), \
                _f32_decimal(limit)
        else:
            raise ConversionError(f"SwiGLU with alpha={alpha}, beta={beta}, limit={limit} "
                                  "is no SEIF activation", field=where)
        if a.get("swiglu_fusion") == 1:
            gate, up = fc1[:, 0::2], fc1[:, 1::2]
            gb, ub = (fc1b[:, 0::2], fc1b[:, 1::2]) if fc1b is not None else (None, None)
        else:
            half = fc1.shape[1] // 2
            gate, up = fc1[:, :half], fc1[:, half:]
            gb, ub = (fc1b[:, :half], fc1b[:, half:]) if fc1b is not None else (None, None)
    elif act in ("relu", "gelu", "silu"):
        activation = {"relu": "relu", "gelu": "gelu_tanh", "silu": "silu"}[act]
        ffn_alpha, ffn_limit = 1.702, 7.0
        gate, up, gb, ub = None, fc1, None, fc1b
    else:
        raise ConversionError(f"activation_type {act!r} is no SEIF activation", field=where)
    if (fc1b is None) != (fc2b is None):
        raise ConversionError("fc1 and fc2 biases must both be present or absent", field=where)
    arrays = {"gate_proj": None if gate is None else np.ascontiguousarray(gate),
              "up_proj": np.ascontiguousarray(up), "down_proj": fc2,
              "gate_bias": None if gb is None else np.ascontiguousarray(gb),
              "up_bias": None if ub is None else np.ascontiguousarray(ub), "down_bias": fc2b}
    ffn, experts = _ffn_from_stacks("", arrays, activation, ffn_alpha, ffn_limit, where)
    E, _, H = arrays["up_proj"].shape
    k = int(a.get("k", 1))
    probs = _producer(g, node.input[1])
    if probs is not None and probs.op_type == "ScatterElements":
        routing, params_router = _log_weight_router(g, probs, x, k, int(E), where)
        # The pattern must be exactly what this module emits for that routing.
        layer = LayerSpec(index, int(E), int(H), routing, ffn)
        params = MoEParams(*params_router, experts)
        expected = _ort_layer(layer, params, "output", "seif")[0]
        mine = [n for n in all_nodes if n.op_type != "MoE" and
                not (n.op_type == "MatMul" and n.input[0] == x and n.input[1] in g.inits)]
        want = [n for n in expected if n.op_type != "MoE" and n.op_type != "MatMul"]
        if _node_signature(mine) != _node_signature(want):
            raise ConversionError("the graph in front of com.microsoft.MoE is not a router "
                                  "pattern SEIF emits; refusing to guess its routing",
                                  field=where)
        return layer, params
    w, bias = _router_from_matmul(g, node.input[1], x, where)
    routing = RoutingSpec("topk", k, "softmax", router_bias=bias is not None,
                          normalize="sum" if a.get("normalize_routing_weights", 0) else "none")
    routing.check(where, int(E))
    layer = LayerSpec(index, int(E), int(H), routing, ffn)
    return layer, MoEParams(w, bias, None, experts)


def _log_weight_router(g: _Graph, scatter, x: str, k: int, E: int, where: str):
    """Follow ScatterElements(fill, idx, Log(w)) back to the SeifRouter node that made idx/w."""
    log = _producer(g, scatter.input[2])
    router = _producer(g, scatter.input[1])
    if log is None or log.op_type != "Log" or router is None or \
            router.op_type != "SeifRouter" or router.domain != DOMAIN or \
            _producer(g, log.input[0]) is not router:
        raise ConversionError("router_probs is a scatter, but not of SeifRouter log-weights; "
                              "refusing to guess the routing", field=where)
    a = _typed_attrs(router, ROUTER_ATTRIBUTES, where)
    if a["capacity_tokens"] or a["capacity_factor"]:
        raise ConversionError("a capacity router in front of com.microsoft.MoE", field=where)
    a.update(activation="swiglu", alpha=1.702, limit=7.0, weight_on="output",
             drop_policy="zero", slots_per_expert=0)
    w, bias = _router_from_matmul(g, router.input[0], x, where)
    sel = _init(g, router.input[1] if len(router.input) > 1 else "", where)
    routing = _routing_from_attrs(a, bias is not None, sel is not None, where)
    if routing.top_k != k:
        raise ConversionError(f"SeifRouter top_k {routing.top_k} != MoE k {k}", field=where)
    routing.check(where, E)
    return routing, (w, bias, sel)


def import_layers(model) -> list[tuple[LayerSpec, Any]]:
    """[(LayerSpec, MoEParams)] for every SeifMoE / com.microsoft.MoE node of `model`."""
    onnx = _onnx()
    graph = model.graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    g = _Graph({o: n for n in graph.node for o in n.output}, inits,
               {(f.domain, f.name): f for f in model.functions})
    meta = {p.key: p.value for p in model.metadata_props}
    described = {}
    try:
        for d in json.loads(meta.get("seif.layers", "[]")):
            described[int(d["index"])] = d
    except (ValueError, TypeError, KeyError):
        described = {}
    out = []
    moe_nodes = [n for n in graph.node if (n.domain, n.op_type) in ((DOMAIN, "SeifMoE"),
                                                                   (MS_DOMAIN, "MoE"))]
    if not moe_nodes:
        raise ConversionError("no ai.seif.SeifMoE or com.microsoft.MoE node in the graph")
    ms_nodes = [n for n in moe_nodes if n.domain == MS_DOMAIN]
    for fallback, node in enumerate(moe_nodes):
        if node.domain == DOMAIN:
            layer, params = _from_seif_node(node, g, _layer_index(node, fallback))
        else:
            prefix = node.name.rsplit(".", 1)[0] + "." if "." in node.name else ""
            if len(ms_nodes) == 1:
                mine = list(graph.node)
            else:
                mine = [n for n in graph.node if prefix and n.name.startswith(prefix)]
            # the output bias's Add (read by _read_output_bias) is not part of the router
            mine = [n for n in mine if not (n.op_type == "Add" and n.name.endswith(
                ".output_bias"))]
            idx = int(prefix.split(".")[1]) if prefix.startswith("layers.") and \
                prefix.split(".")[1].isdigit() else fallback
            if _has_shared(graph):
                raise ConversionError("shared experts around com.microsoft.MoE are not "
                                      "imported yet; export with --target portable",
                                      field=node.name)
            layer, params = _from_ms_moe(node, g, mine, idx)
        _read_output_bias(graph, g, layer, params, described.get(layer.index))
        _restore_descriptor(layer, described.get(layer.index))
        out.append((layer, params))
    return out


def _read_output_bias(graph, g: _Graph, layer: LayerSpec, params, described: dict | None
                      ) -> None:
    """The SEIF 1.1 output bias written by `_output_bias_node`: an Add named
    `layers.{l}.output_bias` of a float [H] initializer. If the exporter's metadata says the
    layer has one and the graph does not, refuse rather than drop it."""
    name = f"layers.{layer.index}.output_bias"
    node = next((n for n in graph.node if n.name == name and n.op_type == "Add"
                 and n.domain in ("", "ai.onnx")), None)
    if node is not None:
        bias = g.inits.get(node.input[1]) if len(node.input) == 2 else None
        if bias is None or bias.shape != (layer.hidden_size,) or bias.dtype.kind != "f":
            raise ConversionError(f"Add {name} must add a float [{layer.hidden_size}] "
                                  f"initializer", field=name)
        layer.output_bias, params.output_bias = True, bias
    elif described and described.get("output_bias"):
        raise ConversionError(f"the model's metadata gives layer {layer.index} an output bias, "
                              f"but the graph has no Add node {name}", field=name)


def _has_shared(graph) -> bool:
    return any("shared_experts" in i for n in graph.node for i in n.input)


def _restore_descriptor(layer: LayerSpec, d: dict | None) -> None:
    """Fields the op contract does not carry (training record, source prefix, expert ids), and
    exact decimal values, from the exporter's metadata when it describes the same layer."""
    if not d:
        return
    try:
        meta = LayerSpec.from_dict(d, "seif.layers")
    except Exception:
        return
    r, m = layer.routing, meta.routing
    same = (r.kind, r.top_k, r.scoring, r.normalize, r.epsilon_rule, r.weight_on) == \
        (m.kind, m.top_k, m.scoring, m.normalize, m.epsilon_rule, m.weight_on) and \
        all(_f32_decimal(getattr(m, f)) == getattr(r, f)
            for f in ("epsilon", "scale", "norm_p", "jitter_eps")) and \
        layer.num_experts == meta.num_experts and layer.experts.activation == \
        meta.experts.activation
    if not same:
        return
    for f in ("epsilon", "scale", "norm_p", "jitter_eps"):
        setattr(r, f, getattr(m, f))
    if r.capacity is not None and m.capacity is not None and \
            r.capacity.factor is not None and m.capacity.factor is not None and \
            _f32_decimal(m.capacity.factor) == r.capacity.factor:
        r.capacity.factor = m.capacity.factor
    r.training = m.training if isinstance(m.training, Training) else r.training
    layer.source_prefix, layer.expert_ids = meta.source_prefix, meta.expert_ids
    if layer.experts.activation == "swiglu_oai":
        for f in ("alpha", "limit"):
            if _f32_decimal(getattr(meta.experts, f)) == getattr(layer.experts, f):
                setattr(layer.experts, f, getattr(meta.experts, f))


def from_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
              dtype: str | None = None, show_progress: bool | None = None, **options) -> Path:
    """ONNX model `src` -> SEIF checkpoint `dst` (MoE layers only)."""
    import seif
    if options:
        raise ConversionError(f"options not supported for onnx -> seif: {', '.join(options)}")
    if dtype is not None:
        raise ConversionError("--dtype is not supported for onnx -> seif; convert, then cast "
                              "with seif -> seif --dtype")
    onnx = _onnx()
    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise FormatError(f"cannot read the ONNX model: {exc}", path=str(src)) from None
    try:
        pairs = import_layers(model)
    except ConversionError as exc:
        if exc.path is None:
            exc.path = str(src)
            exc.args = (exc.one_line(),)
        raise
    indices = [layer.index for layer, _ in pairs]
    if len(set(indices)) != len(indices):
        raise ConversionError(f"several MoE nodes claim the same layer index: {indices}",
                              path=str(src))
    tensors: dict[str, np.ndarray] = {}
    for layer, params in pairs:
        tensors.update({n: np.ascontiguousarray(a) for n, a in params.to_tensors(layer).items()})
    meta = {p.key: p.value for p in model.metadata_props}
    info = ModelInfo(source_framework="onnx")
    if "seif.model" in meta:
        try:
            info = ModelInfo.from_dict(json.loads(meta["seif.model"]))
        except Exception:
            info = ModelInfo(source_framework="onnx")
    return seif.save(dst, tensors, [layer for layer, _ in pairs], model=info, overwrite=overwrite)


def register() -> None:
    from seif.convert import register as add
    add("seif", "onnx", to_onnx)
    add("onnx", "seif", from_onnx)

