"""Reference MoE layer forward for SEIF, in NumPy: activations, one expert FFN, the whole layer.

Like :mod:`seif.routing`, this is the definition other backends are checked against, so it is
written to be read. Experts are run the way a sparse kernel would run them (each expert once, on
the tokens routed to it), never as a dense all-experts product, so a reader can see that dropped
or unrouted tokens really never reach an expert.

Conventions: weights are torch-style [out, in]; an FFN is ``down(act(gate x + b, up x + b)) + b``;
everything is computed in float32 (or float64 when asked) whatever the stored dtype. Capacity is
counted over the T tokens passed in, so pass one sequence at a time for families that count it
per sequence (Switch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import RoutingError
from .manifest import ACTIVATIONS, GATED_ACTIVATIONS, FFNSpec, LayerSpec
from .routing import (
    _compute_dtype,
    _sigmoid,
    expert_choice,
    route,
    router_logits,
    soft_moe_weights,
)

__all__ = [
    "MoEParams",
    "activation",
    "ffn_forward",
    "moe_forward",
    "random_layer_params",
]

_erf = np.frompyfunc(math.erf, 1, 1)
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------- activations
def _gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). math.erf is vectorised with
    frompyfunc because the core package may not depend on scipy; slow, but exact."""
    return 0.5 * x * (1.0 + _erf(x * _SQRT_HALF).astype(np.float64))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU (gelu_pytorch_tanh, gelu_new): a different function, not a
    rounding of the exact one, so the two are separate activation names."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


def activation(name: str, gate: np.ndarray | None, up: np.ndarray, *, alpha: float = 1.702,
               limit: float = 7.0) -> np.ndarray:
    """The expert activation `name` (manifest.ACTIVATIONS) applied to projections gate and up.

    Gated: swiglu = silu(gate) * up (Mixtral, Qwen, DeepSeek, Llama 4); geglu = gelu_erf(gate) *
    up; geglu_tanh = gelu_tanh(gate) * up; swiglu_oai (gpt-oss) = (clip(up, -limit, limit) + 1) *
    g * sigmoid(alpha g) with g = min(gate, limit).
    Ungated (gate is None): relu, gelu (erf), gelu_tanh, silu, relu2 = relu(up)^2 (Nemotron-H).

    Computed in float64 and rounded once to up's dtype, so the reference is as close to the exact
    value as float64 allows, independent of how a backend fuses the steps.
    """
    if name not in ACTIVATIONS:
        raise RoutingError(f"unknown activation {name!r}")
    up = np.asarray(up)
    out_dtype = up.dtype
    u = up.astype(np.float64)
    if name in GATED_ACTIVATIONS:
        if gate is None:
            raise RoutingError(f"{name} is gated and needs a gate projection")
        gate = np.asarray(gate)
        if gate.shape != up.shape:
            raise RoutingError(f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape")
        g = gate.astype(np.float64)
        if name == "swiglu":
            out = _silu(g) * u
        elif name == "geglu":
            out = _gelu_erf(g) * u
        elif name == "geglu_tanh":
            out = _gelu_tanh(g) * u
        else:  # swiglu_oai: the clamps bound the product for fp8/fp4 inference (gpt-oss).
            g = np.minimum(g, limit)
            u = np.clip(u, -limit, limit)
            out = (u + 1.0) * (g * _sigmoid(alpha * g))
    else:
        if gate is not None:
            raise RoutingError(f"{name} is ungated; gate must be None")
        if name == "relu":
            out = np.maximum(u, 0.0)
        elif name == "gelu":
            out = _gelu_erf(u)
        elif name == "gelu_tanh":
            out = _gelu_tanh(u)
        elif name == "silu":
            out = _silu(u)
        else:  # relu2
            out = np.maximum(u, 0.0) ** 2
    return np.asarray(out, dtype=np.float64).astype(out_dtype)


# --------------------------------------------------------------------------- one expert
def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, dt: np.dtype,
            what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise RoutingError(f"{what} weight is {list(w.shape)}; expected [out, {x.shape[1]}]")
    y = x @ w.astype(dt).T
    if b is not None:
        b = np.asarray(b)
        if b.shape != (w.shape[0],):
            raise RoutingError(f"{what} bias is {list(b.shape)}; expected [{w.shape[0]}]")
        y = y + b.astype(dt)
    return y.astype(dt, copy=False)


def ffn_forward(x: np.ndarray, ffn: FFNSpec, weights: dict[str, np.ndarray],
                dtype=np.float32) -> np.ndarray:
    """One expert: down(act(gate x + gate_bias, up x + up_bias)) + down_bias, all in `dtype`.

    `weights` has "gate" (gated activations only), "up", "down", each [out, in], and
    "<proj>_bias" when ffn.bias. x is [N, H]; the result is [N, H].
    """
    dt = _compute_dtype(dtype)
    x = np.asarray(x)
    if x.ndim != 2:
        raise RoutingError(f"expert input must be [N, H], got {list(x.shape)}")
    x = x.astype(dt)
    for proj in ffn.projections:
        if proj not in weights:
            raise RoutingError(f"expert weights lack {proj!r}")
        if ffn.bias and f"{proj}_bias" not in weights:
            raise RoutingError(f"expert weights lack {proj}_bias")

    def bias(proj: str):
        return weights[f"{proj}_bias"] if ffn.bias else None

    up = _linear(x, weights["up"], bias("up"), dt, "up")
    gate = _linear(x, weights["gate"], bias("gate"), dt, "gate") if ffn.gated else None
    if gate is not None and gate.shape != up.shape:
        raise RoutingError("gate and up projections have different output sizes")
    h = activation(ffn.activation, gate, up, alpha=ffn.alpha, limit=ffn.limit)
    return _linear(h, weights["down"], bias("down"), dt, "down")


# --------------------------------------------------------------------------- parameters
@dataclass
class MoEParams:
    """The tensors of one MoE layer, by role.

    router_weight: [E, H] ([E*S, H] for soft_moe); router_bias: [E] or None;
    selection_bias: [E] or None (DeepSeek-V3 e_score_correction_bias);
    experts: one dict per expert with keys "gate", "up", "down" (+ "<proj>_bias");
    shared: one such dict per shared expert; shared_gate: [1, H] or None;
    output_bias: [H] or None (SEIF 1.1 `layer.output_bias`: JetMoE's block bias).
    """

    router_weight: np.ndarray
    router_bias: np.ndarray | None = None
    selection_bias: np.ndarray | None = None
    experts: list[dict[str, np.ndarray]] = field(default_factory=list)
    shared: list[dict[str, np.ndarray]] = field(default_factory=list)
    shared_gate: np.ndarray | None = None
    output_bias: np.ndarray | None = None

    @classmethod
    def from_tensors(cls, layer: LayerSpec, get: Callable[[str], np.ndarray]) -> MoEParams:
        """Collect a layer's tensors by their canonical SEIF names (spec §4.1) via `get`."""
        r = layer.routing

        def ffn_dict(ffn: FFNSpec, name: Callable[[str, str], str]) -> dict[str, np.ndarray]:
            out = {}
            for proj in ffn.projections:
                out[proj] = get(name(proj, "weight"))
                if ffn.bias:
                    out[f"{proj}_bias"] = get(name(proj, "bias"))
            return out

        shared, shared_gate = [], None
        if layer.shared_experts is not None:
            se = layer.shared_experts
            shared = [ffn_dict(se.ffn, lambda p, part, s=s: layer.shared_name(s, p, part))
                      for s in range(se.count)]
            if se.gate:
                shared_gate = get(layer.shared_gate_name())
        return cls(
            router_weight=get(layer.router_name()),
            router_bias=get(layer.router_name("bias")) if r.router_bias else None,
            selection_bias=get(layer.router_name("selection_bias")) if r.selection_bias else None,
            experts=[ffn_dict(layer.experts, lambda p, part, e=e: layer.expert_name(e, p, part))
                     for e in range(layer.num_experts)],
            shared=shared,
            shared_gate=shared_gate,
            output_bias=get(layer.output_bias_name()) if layer.output_bias else None,
        )


    def to_tensors(self, layer: LayerSpec) -> dict[str, np.ndarray]:
        """The inverse of `from_tensors`: canonical SEIF name -> array, ready for `seif.save`."""
        r = layer.routing
        out = {layer.router_name(): self.router_weight}
        if r.router_bias:
            out[layer.router_name("bias")] = self.router_bias
        if r.selection_bias:
            out[layer.router_name("selection_bias")] = self.selection_bias

        def put(weights: dict[str, np.ndarray], ffn: FFNSpec, name) -> None:
            for proj in ffn.projections:
                out[name(proj, "weight")] = weights[proj]
                if ffn.bias:
                    out[name(proj, "bias")] = weights[f"{proj}_bias"]

        for e, weights in enumerate(self.experts):
            put(weights, layer.experts, lambda p, part, e=e: layer.expert_name(e, p, part))
        if layer.shared_experts is not None:
            for s, weights in enumerate(self.shared):
                put(weights, layer.shared_experts.ffn,
                    lambda p, part, s=s: layer.shared_name(s, p, part))
            if layer.shared_experts.gate:
                out[layer.shared_gate_name()] = self.shared_gate
        if layer.output_bias:
            out[layer.output_bias_name()] = self.output_bias
        return out

def random_layer_params(layer: LayerSpec, rng: np.random.Generator,
                        dtype=np.float32) -> MoEParams:
    """Random parameters shaped for `layer`, for demos and tests.

    Weights are N(0, 1/fan_in) so activations keep unit scale through a layer; biases are
    N(0, 0.1^2); the selection bias is N(0, 0.1^2) so it matters without dominating the scores.
    `dtype` may be any NumPy or ml_dtypes float type (e.g. ml_dtypes.bfloat16).
    """
    H, E, r = layer.hidden_size, layer.num_experts, layer.routing
    rows = E * (r.slots_per_expert or 1) if r.kind == "soft_moe" else E

    def w(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(dtype)

    def b(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(dtype)

    def ffn_dict(ffn: FFNSpec) -> dict[str, np.ndarray]:
        I = ffn.intermediate_size
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        out = {}
        for proj in ffn.projections:
            out[proj] = w(*shapes[proj])
            if ffn.bias:
                out[f"{proj}_bias"] = b(shapes[proj][0])
        return out

    se = layer.shared_experts
    return MoEParams(
        router_weight=w(rows, H),
        router_bias=b(rows) if r.router_bias else None,
        selection_bias=b(E) if r.selection_bias else None,
        experts=[ffn_dict(layer.experts) for _ in range(E)],
        shared=[ffn_dict(se.ffn) for _ in range(se.count)] if se else [],
        shared_gate=w(1, H) if se and se.gate else None,
        output_bias=b(H) if layer.output_bias else None,
    )


# --------------------------------------------------------------------------- the layer
def _check_params(layer: LayerSpec, params: MoEParams, H: int) -> None:
    r = layer.routing
    if len(params.experts) != layer.num_experts:
        raise RoutingError(f"{len(params.experts)} expert weight sets for "
                           f"{layer.num_experts} experts")
    if r.router_bias != (params.router_bias is not None):
        raise RoutingError("router bias must be given exactly when routing.router_bias is set")
    rows = layer.num_experts * (r.slots_per_expert or 1) if r.kind == "soft_moe" \
        else layer.num_experts
    if np.shape(params.router_weight) != (rows, H):
        raise RoutingError(f"router weight is {list(np.shape(params.router_weight))}; "
                           f"expected [{rows}, {H}]")
    n_shared = layer.shared_experts.count if layer.shared_experts else 0
    if len(params.shared) != n_shared:
        raise RoutingError(f"{len(params.shared)} shared expert weight sets for {n_shared}")
    wants_gate = bool(layer.shared_experts and layer.shared_experts.gate)
    if wants_gate != (params.shared_gate is not None):
        raise RoutingError("shared_gate must be given exactly when shared_experts.gate is set")
    if wants_gate and np.shape(params.shared_gate) != (1, H):
        raise RoutingError(f"shared gate is {list(np.shape(params.shared_gate))}; "
                           f"expected [1, {H}]")
    if layer.output_bias != (params.output_bias is not None):
        raise RoutingError("output_bias must be given exactly when the layer's output_bias is set")
    if layer.output_bias and np.shape(params.output_bias) != (H,):
        raise RoutingError(f"output bias is {list(np.shape(params.output_bias))}; "
                           f"expected [{H}]")


def _token_choice(x, logits, layer, params, dt) -> np.ndarray:
    r = layer.routing
    res = route(logits, r, params.selection_bias, dt)
    T, k = res.indices.shape
    # contrib[t, j] is what assignment j of token t adds; summing j = 0..k-1 in order afterwards
    # fixes the accumulation order independently of which expert ran first.
    contrib = np.zeros((T, k, x.shape[1]), dtype=dt)
    for e in np.unique(res.indices[res.kept]):
        tok, slot = np.nonzero((res.indices == e) & res.kept)   # distinct tokens: k experts differ
        w = res.weights[tok, slot][:, None]
        if r.weight_on == "input":      # Llama 4: the weight scales what goes into the expert
            contrib[tok, slot] = ffn_forward(w * x[tok], layer.experts, params.experts[e], dt)
        else:
            contrib[tok, slot] = w * ffn_forward(x[tok], layer.experts, params.experts[e], dt)
    if r.capacity is not None and r.capacity.drop_policy == "passthrough_scaled":
        # Older Switch releases: a dropped token's expert output is replaced by its input,
        # still multiplied by the router probability.
        tok, slot = np.nonzero(~res.kept)
        contrib[tok, slot] = res.weights[tok, slot][:, None] * x[tok]
    out = np.zeros((T, x.shape[1]), dtype=dt)
    for j in range(k):
        out += contrib[:, j]
    return out


def _expert_choice(x, logits, layer, params, dt) -> np.ndarray:
    token_idx, weights = expert_choice(logits, layer.routing, dt)
    out = np.zeros_like(x)
    for e in range(layer.num_experts):
        tok = token_idx[e]
        if tok.size == 0:
            continue
        w = weights[e][:, None]
        if layer.routing.weight_on == "input":
            y = ffn_forward(w * x[tok], layer.experts, params.experts[e], dt)
        else:
            y = w * ffn_forward(x[tok], layer.experts, params.experts[e], dt)
        out[tok] += y    # an expert picks distinct tokens, so fancy += is safe
    return out


def _soft_moe(x, logits, layer, params, dt) -> np.ndarray:
    S = layer.routing.slots_per_expert
    dispatch, combine = soft_moe_weights(logits, dt)
    slot_in = dispatch.T @ x                        # [E*S, H]: each slot a convex mix of tokens
    slot_out = np.zeros_like(slot_in)
    if x.shape[0] > 0:
        for e in range(layer.num_experts):
            rows = slice(e * S, (e + 1) * S)
            slot_out[rows] = ffn_forward(slot_in[rows], layer.experts, params.experts[e], dt)
    return (combine @ slot_out).astype(dt, copy=False)


def moe_forward(x: np.ndarray, layer: LayerSpec, params: MoEParams,
                dtype=np.float32) -> np.ndarray:
    """The MoE layer's output [T, H] for tokens x [T, H] (no residual, no norm).

    Token choice: y_t = sum over kept assignments j of w_tj * FFN_e(x_t) (or FFN_e(w_tj * x_t)
    when weight_on is "input"); a dropped assignment adds nothing (drop_policy "zero") or
    w_tj * x_t ("passthrough_scaled"). Expert choice: y_t = sum over experts that picked t.
    Soft MoE: slots = dispatch^T x, slot e*S+s goes through expert e, y = combine @ slots.
    Shared experts: + sum_s FFN_s(x), times sigmoid(x . shared_gate) when gated (Qwen2-MoE).
    Output bias (SEIF 1.1, JetMoE): + output_bias [H], last, on every token (spec §5.16).
    """
    dt = _compute_dtype(dtype)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != layer.hidden_size:
        raise RoutingError(f"x is {list(x.shape)}; expected [T, {layer.hidden_size}]")
    x = x.astype(dt)
    _check_params(layer, params, x.shape[1])
    logits = router_logits(x, params.router_weight, params.router_bias, dt)
    kind = layer.routing.kind
    if kind in ("topk", "group_topk", "sparse_mixer"):
        out = _token_choice(x, logits, layer, params, dt)
    elif kind == "expert_choice":
        out = _expert_choice(x, logits, layer, params, dt)
    elif kind == "soft_moe":
        if layer.routing.slots_per_expert is None:
            raise RoutingError("soft_moe needs slots_per_expert")
        out = _soft_moe(x, logits, layer, params, dt)
    else:
        raise RoutingError(f"unknown routing kind {kind!r}")

    if params.shared:
        shared = np.zeros_like(x)
        for weights in params.shared:
            shared += ffn_forward(x, layer.shared_experts.ffn, weights, dt)
        if params.shared_gate is not None:
            gate = x @ np.asarray(params.shared_gate).astype(dt).T     # [T, 1]
            shared = _sigmoid(gate) * shared
        out = out + shared
    if params.output_bias is not None:
        out = out + np.asarray(params.output_bias).astype(dt)
    return out.astype(dt, copy=False)
