"""The case catalogue: deterministic generators for router, MoE and format cases.

Every case draws its data from ``numpy.random.default_rng([seed, hash(id)])``, so a case's
content depends only on the seed and its own id: adding a case never changes another. Expected
values come from the reference (`seif.routing`, `seif.moe`) in float64 (`reference.py`); format
cases are built with `seif.save` and then damaged (`formats.py`).

`catalogue()` returns the cases in a fixed order; `generate(out)` writes them with a
``catalogue.json`` that records the SHA-256 of every file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from ..manifest import (
    SPEC_VERSION,
    Capacity,
    FFNSpec,
    LayerSpec,
    RoutingSpec,
    SharedExpertsSpec,
)
from ..moe import random_layer_params
from .cases import Case, matches, save_case
from .reference import Ambiguous, moe_expected, router_expected

SUITE_VERSION = "1.1.0"      # catalogue version; MAJOR.MINOR follow the spec version
DEFAULT_SEED = 20261101

DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai",
               "relu", "gelu", "gelu_tanh", "silu", "relu2")


def case_rng(seed: int, case_id: str, attempt: int = 0) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest, attempt])


def _layer(E: int, routing: RoutingSpec, *, H: int = 16, I: int = 12, act: str = "swiglu",
           bias: bool = False, shared: SharedExpertsSpec | None = None) -> LayerSpec:
    layer = LayerSpec(0, E, H, routing, FFNSpec(I, act, bias), shared)
    layer.routing.check("routing", E)
    return layer


# =========================================================================== router cases
def _R(kind="topk", k=2, scoring="softmax", **kw) -> RoutingSpec:
    return RoutingSpec(kind, k, scoring, **kw)


# name -> (routing, E, spec_ref, description)
ROUTER_CONFIGS: dict[str, tuple[RoutingSpec, int, str, str]] = {
    "topk/softmax-none-k2": (_R(), 8, "§5.3, §5.4", "softmax scores, top-2, no renormalization "
                             "(Qwen3 norm_topk_prob=false)"),
    "topk/softmax-sum-k2": (_R(normalize="sum"), 8, "§5.4, §5.7", "softmax, top-2, sum "
                            "renormalization (Mixtral)"),
    "topk/sigmoid-sum-eps-k4": (_R(k=4, scoring="sigmoid", normalize="sum", epsilon=1e-20,
                                   scale=2.5), 16, "§5.3, §5.7", "sigmoid, top-4, sum + 1e-20, "
                                "scale 2.5"),
    "topk/softmax_topk-k4": (_R(k=4, scoring="softmax_topk"), 8, "§5.3", "select on logits, "
                             "softmax over the 4 selected (gpt-oss)"),
    "topk/sigmoid_topk-k1": (_R(k=1, scoring="sigmoid_topk"), 8, "§5.3", "select on logits, "
                             "sigmoid of the selected (Llama 4)"),
    "topk/softmax-lp2-k3": (_R(k=3, normalize="lp", norm_p=2.0), 8, "§5.7", "softmax, top-3, "
                            "L2 renormalization (DBRX)"),
    "topk/softmax-selbias-clamp-k3": (_R(k=3, selection_bias=True, normalize="sum",
                                         epsilon=1e-12, epsilon_rule="clamp"), 8,
                                      "§5.4, §5.7", "selection bias chooses, unbiased weights, "
                                      "sum clamped at 1e-12 (ERNIE-4.5)"),
    "topk/sigmoid-selbias-k2": (_R(scoring="sigmoid", selection_bias=True, normalize="sum",
                                   scale=1.5), 8, "§5.4", "sigmoid with selection bias, no "
                                "groups"),
    "group_topk/max-zero-softmax-k3": (_R("group_topk", 3, n_group=4, topk_group=2,
                                          group_score="max", group_mask="zero", scale=16.0),
                                       8, "§5.5", "group-limited greedy: max group score, "
                                       "masked to 0 (DeepSeek-V2)"),
    "group_topk/top2_sum-neginf-sigmoid-k4": (_R("group_topk", 4, "sigmoid", n_group=4,
                                                 topk_group=2, group_score="top2_sum",
                                                 group_mask="neg_inf", selection_bias=True,
                                                 normalize="sum", epsilon=1e-20, scale=2.5),
                                              16, "§5.5", "top-2-sum group score, -inf mask, "
                                              "selection bias (DeepSeek-V3)"),
    "sparse_mixer/jitter0.01": (_R("sparse_mixer", 2, jitter_eps=0.01), 8, "§5.11",
                                "PhiMoE sparse mixer, inference form"),
    "sparse_mixer/jitter0.5": (_R("sparse_mixer", 2, jitter_eps=0.5), 8, "§5.11",
                               "sparse mixer with a wide threshold (several experts unmasked)"),
    "expert_choice/softmax-tokens3": (_R("expert_choice", 1, capacity=Capacity(tokens=3)), 8,
                                      "§5.10", "experts pick 3 tokens by softmax score"),
    "expert_choice/sigmoid-factor1.5": (_R("expert_choice", 1, "sigmoid", scale=2.0,
                                           capacity=Capacity(factor=1.5)), 8, "§5.10, §5.6",
                                        "sigmoid scores, capacity factor 1.5, scale 2"),
    "soft_moe/slots2": (_R("soft_moe", 1, slots_per_expert=2), 4, "§5.12",
                        "Soft MoE dispatch (over tokens) and combine (over slots) weights"),
}


def _router_case(cid: str, routing: RoutingSpec, E: int, logits: np.ndarray, dtype: str,
                 spec_ref: str, desc: str, sel_bias=None, tags: Iterable[str] = ()) -> Case:
    layer = _layer(E, routing, H=8, I=8)
    inputs = {"logits": logits}
    if sel_bias is not None:
        inputs["selection_bias"] = np.asarray(sel_bias, dtype=np.float32)
    with np.errstate(all="ignore"):     # NaN/inf cases compute NaN on purpose (§6.3)
        ex, info = router_expected(layer, logits, inputs.get("selection_bias"))
    tags = set(tags)
    if info["ties"]:
        tags.add("ties")
    if info["alternatives"]:
        tags.add("near-ties")
    if routing.capacity is not None:
        tags.add("capacity")
    return Case(cid, "router", desc, spec_ref, dtype, layer.to_dict(), inputs, {}, {}, ex,
                tags=tuple(sorted(tags)))


def _logits(rng, T, E, dtype, scale=2.0):
    return (rng.standard_normal((T, E)) * scale).astype(DTYPES[dtype])


def _sel_bias(rng, E, routing):
    return (0.1 * rng.standard_normal(E)).astype(np.float32) if routing.selection_bias else None


def _rows(routing: RoutingSpec, E: int) -> int:
    return E * (routing.slots_per_expert or 1) if routing.kind == "soft_moe" else E


def router_cases(seed: int) -> list[Case]:
    out = []
    # 1. every configuration x dtype, random logits
    for name, (routing, E, ref, desc) in ROUTER_CONFIGS.items():
        for dt in DTYPES:
            cid = f"router/{name}/{dt}"
            rng = case_rng(seed, cid)
            z = _logits(rng, 16, _rows(routing, E), dt)
            out.append(_router_case(cid, routing, E, z, dt, ref + ", §6.1",
                                    f"{desc}; random {dt} logits", _sel_bias(rng, E, routing)))
    # 2. exact ties at the k-th place, every scoring and kind, every dtype
    tie_configs = ["topk/softmax-none-k2", "topk/sigmoid-sum-eps-k4", "topk/softmax_topk-k4",
                   "topk/sigmoid_topk-k1", "group_topk/max-zero-softmax-k3",
                   "group_topk/top2_sum-neginf-sigmoid-k4", "sparse_mixer/jitter0.5",
                   "expert_choice/softmax-tokens3"]
    for name in tie_configs:
        routing, E, ref, desc = ROUTER_CONFIGS[name]
        for dt in DTYPES:
            cid = f"router/{name}/ties-kth/{dt}"
            rng = case_rng(seed, cid)
            z, sb = _tied_logits(rng, routing, E, dt)
            out.append(_router_case(cid, routing, E, z, dt, ref + ", §6.2",
                                    f"{desc}; exact ties at the k-th place: the lower index "
                                    "must win", sb, ["exact-ties"]))
    # 3. near-ties (one float32 ulp apart) at the k-th place
    for name in ["topk/softmax-sum-k2", "topk/sigmoid-sum-eps-k4", "topk/softmax_topk-k4",
                 "topk/sigmoid_topk-k1", "group_topk/top2_sum-neginf-sigmoid-k4",
                 "sparse_mixer/jitter0.01", "expert_choice/sigmoid-factor1.5"]:
        routing, E, ref, desc = ROUTER_CONFIGS[name]
        cid = f"router/{name}/near-ties-kth/fp32"
        rng = case_rng(seed, cid)
        z, sb = _tied_logits(rng, routing, E, "fp32", ulp=1)
        out.append(_router_case(cid, routing, E, z, "fp32", ref + ", §6.4",
                                f"{desc}; near-ties (1 ulp) at the k-th place: either "
                                "choice passes, recomputed on it", sb))
    # 4. bf16 router logits with many natural ties (E=64, k=6; E=256, k=8)
    for E, k in ((64, 6), (256, 8)):
        cid = f"router/topk/softmax-sum-k{k}/bf16-natural-ties-E{E}/bf16"
        rng = case_rng(seed, cid)
        z = (rng.standard_normal((32, E)) * 1.5).astype(ml_dtypes.bfloat16)
        out.append(_router_case(cid, _R(k=k, normalize="sum"), E, z, "bf16", "§6.2, §6.4",
                                f"bf16-valued logits, E={E}, k={k}: frequent exact ties"))
    out += _router_edges(seed)
    return out


def _tied_logits(rng, routing: RoutingSpec, E: int, dt: str, ulp: int = 0):
    """Random logits where, per token, the value at rank k+1 equals the k-th (ulp=0) or sits
    `ulp` float32 ulps below it; placed so that the tied partner is sometimes the lower index."""
    T = 16
    rows = _rows(routing, E)
    z = rng.standard_normal((T, rows)) * 2.0
    sb = _sel_bias(rng, E, routing)
    if sb is not None:
        sb = np.zeros_like(sb)     # a bias would break logit ties; keep the field exercised
    k = routing.top_k
    if routing.kind == "expert_choice":
        C = routing.capacity.per_expert(T, E, 1, clip=True)
        half = T // 2
        z[half:] = z[:half] if ulp == 0 else np.nextafter(
            z[:half].astype(np.float32), np.float32(-np.inf)).astype(np.float64)
        del C
        return z.astype(DTYPES[dt]), sb
    if routing.kind == "group_topk":
        G, P = routing.n_group, E // routing.n_group
        for t in range(T):
            grouped = z[t].reshape(G, P)
            order = np.argsort(-grouped.max(axis=1))
            src, dst = order[routing.topk_group - 1], order[routing.topk_group]
            if rng.random() < 0.5:
                src, dst = dst, src
                grouped[src] = grouped[dst] + 0.0
            grouped[dst] = grouped[src][rng.permutation(P)] if ulp == 0 else \
                np.nextafter(grouped[src].astype(np.float32), np.float32(-np.inf))
            z[t] = grouped.reshape(-1)
        return z.astype(DTYPES[dt]), sb
    for t in range(T):
        order = np.argsort(-z[t])
        a, b = order[k - 1], order[k]
        value = np.float64(DTYPES[dt](z[t, a]))
        z[t, a] = value
        z[t, b] = value if ulp == 0 else float(np.nextafter(np.float32(value),
                                                             np.float32(-np.inf)))
    return z.astype(DTYPES[dt]), sb


def _router_edges(seed: int) -> list[Case]:
    out = []

    def add(name, routing, E, z, ref, desc, dt="fp32", sb=None, tags=()):
        cid = f"router/{name}/{dt}"
        out.append(_router_case(cid, routing, E, np.asarray(z).astype(DTYPES[dt]), dt, ref,
                                desc, sb, tags))

    def rng(name):
        return case_rng(seed, "router/" + name)

    # k = 1 and k = E; E not a power of two
    add("topk/edge/k1-sum", _R(k=1, normalize="sum"), 8, _logits(rng("k1"), 16, 8, "fp32"),
        "§5.7", "k = 1 with sum renormalization: every weight is exactly 1")
    add("topk/edge/kE-softmax-none", _R(k=6), 6, _logits(rng("kE"), 16, 6, "fp32"), "§5.4",
        "k = E = 6: every expert, best first")
    add("topk/edge/kE-sigmoid-sum", _R(k=5, scoring="sigmoid", normalize="sum"), 5,
        _logits(rng("kE5"), 16, 5, "fp32"), "§5.4", "k = E = 5 with sigmoid scores")
    add("topk/edge/E7-k3", _R(k=3, normalize="sum"), 7, _logits(rng("E7"), 16, 7, "fp32"),
        "§5.4", "E = 7 (not a power of two)")
    add("group_topk/edge/E6-G3-top2_sum", _R("group_topk", 2, "sigmoid", n_group=3,
                                            topk_group=2, group_score="top2_sum",
                                            normalize="sum"), 6,
        _logits(rng("E6G3"), 16, 6, "fp32"), "§5.5", "E = 6 in 3 groups of 2: top2_sum is the "
        "whole group")
    add("group_topk/edge/E12-G3-max", _R("group_topk", 4, n_group=3, topk_group=1,
                                        group_score="max"), 12,
        _logits(rng("E12"), 16, 12, "fp32"), "§5.5", "E = 12 in 3 groups, one kept, k = all 4 "
        "of it")
    # T = 0 and T = 1
    for name, (routing, E, ref, _d) in [("topk", ROUTER_CONFIGS["topk/softmax-sum-k2"]),
                                          ("group_topk", ROUTER_CONFIGS[
                                              "group_topk/top2_sum-neginf-sigmoid-k4"]),
                                          ("sparse_mixer",
                                           ROUTER_CONFIGS["sparse_mixer/jitter0.01"]),
                                          ("expert_choice",
                                           ROUTER_CONFIGS["expert_choice/softmax-tokens3"]),
                                          ("soft_moe", ROUTER_CONFIGS["soft_moe/slots2"])]:
        rows = _rows(routing, E)
        sb = np.zeros(E, np.float32) if routing.selection_bias else None
        add(f"{name}/edge/T0", routing, E, np.zeros((0, rows)), ref + ", §5.1",
            "T = 0: empty outputs of the right shapes", sb=sb)
        r1 = rng(f"{name}T1")
        add(f"{name}/edge/T1", routing, E, _logits(r1, 1, rows, "fp32"), ref + ", §5.1",
            "T = 1 (expert choice: capacity clipped to 1; Soft MoE: dispatch weights 1)",
            sb=_sel_bias(r1, E, routing))
    # large logits
    base = _logits(rng("large"), 16, 8, "fp32", scale=1.0)
    add("topk/edge/large-logits-1e4", _R(normalize="sum"), 8, 1e4 + base * 8, "§5.1, §6.1",
        "logits near 1e4: softmax must subtract the max")
    add("topk/edge/large-logits-spread-1e30", _R(k=3), 8, base * 1e30, "§6.1",
        "logits of order 1e30: all but the best softmax weight underflow to 0")
    add("topk/edge/near-fp32-max", _R(k=2), 8,
        np.clip(base, -1, 1) * np.float32(3.0e38), "§6.1, §6.3",
        "logits near the float32 maximum: z - max may overflow to -inf, giving 0")
    add("topk/edge/sigmoid-saturated", _R(k=2, scoring="sigmoid", normalize="sum"), 8,
        17 + np.abs(base) * 4, "§6.4", "sigmoid of logits 17..30 is 1.0 in float32: near-ties "
        "the reference separates, either choice passes")
    # infinities and NaN
    zi = _logits(rng("inf"), 8, 8, "fp32")
    zi[:, 3] = -np.inf
    zi[::2, 6] = -np.inf
    add("topk/edge/neg-inf-logits", _R(k=2, normalize="sum"), 8, zi, "§6.1, §6.2",
        "-inf logits get softmax weight 0 and rank last")
    zp = _logits(rng("posinf"), 8, 8, "fp32")
    zp[::3, 2] = np.inf
    add("topk/edge/pos-inf-logit-sigmoid", _R(k=2, scoring="sigmoid"), 8, zp, "§6.1, §6.3",
        "+inf logit: sigmoid 1, ranked first")
    add("topk/edge/pos-inf-logit-softmax", _R(k=2), 8, zp, "§6.1, §6.3",
        "+inf logit under softmax: inf - inf is NaN, so the token's weights are NaN (IEEE)")
    zn = _logits(rng("nan"), 8, 8, "fp32")
    zn[1, 4] = np.nan
    zn[3, 0] = np.nan
    zn[5, :] = np.nan
    add("topk/edge/nan-softmax", _R(k=2, normalize="sum"), 8, zn, "§6.2, §6.3",
        "a NaN logit poisons the token's softmax: NaN weights, experts still chosen "
        "(NaN first, then by index)", tags=["nan"])
    add("topk/edge/nan-sigmoid", _R(k=2, scoring="sigmoid"), 8, zn, "§6.2, §6.3",
        "NaN sigmoid score ranks first; other weights stay finite", tags=["nan"])
    zn2 = _logits(rng("nan2"), 8, 8, "fp32")
    zn2[:, [2, 5, 6]] = np.nan
    add("topk/edge/nan-kth-sigmoid_topk", _R(k=2, scoring="sigmoid_topk"), 8, zn2,
        "§6.2", "three NaNs compete for two places: the lower indices win", tags=["nan"])
    add("group_topk/edge/nan", ROUTER_CONFIGS["group_topk/top2_sum-neginf-sigmoid-k4"][0], 16,
        np.where(np.arange(16) == 9, np.nan, _logits(rng("gnan"), 8, 16, "fp32")), "§6.2, §5.5",
        "NaN in one expert: its group scores NaN and is kept first",
        sb=np.zeros(16, np.float32), tags=["nan"])
    # signed zeros
    zz = np.zeros((8, 8), np.float32)
    zz[:, ::2] = -0.0
    zz[4:, 1::3] = -0.0
    add("topk/edge/signed-zeros-sigmoid_topk", _R(k=3, scoring="sigmoid_topk"), 8, zz, "§6.2",
        "+0 and -0 logits are equal: lower indices win (JAX ranks +0 above -0)")
    add("topk/edge/signed-zeros-softmax_topk", _R(k=2, scoring="softmax_topk"), 8, zz,
        "§6.2", "all-zero logits of both signs: experts 0 and 1, weights 1/2")
    # group-limited edge cases
    g = ROUTER_CONFIGS["group_topk/max-zero-softmax-k3"][0]
    neg_bias = _R("group_topk", 3, n_group=4, topk_group=2, group_mask="zero",
                  selection_bias=True)
    add("group_topk/edge/zero-mask-negative-bias", neg_bias, 8,
        _logits(rng("zmask"), 16, 8, "fp32"), "§5.4, §5.5", "mask value 0 with choice values "
        "below 0 (negative selection bias): masked experts are chosen, lower index first",
        sb=np.full(8, -0.5, np.float32))
    add("group_topk/edge/topk_group-eq-n_group", _R("group_topk", 3, n_group=4, topk_group=4),
        8, _logits(rng("allg"), 16, 8, "fp32"), "§5.5", "every group kept: equals plain top-k")
    add("group_topk/edge/k-fills-kept-groups", _R("group_topk", 4, n_group=4, topk_group=2,
                                                 group_score="top2_sum"), 8,
        _logits(rng("fill"), 16, 8, "fp32"), "§5.5", "k equals the experts in the kept groups")
    add("group_topk/edge/one-group", _R("group_topk", 2, n_group=1, topk_group=1), 8,
        _logits(rng("one"), 16, 8, "fp32"), "§5.5", "a single group of all experts")
    del g
    # capacity overflow (routing decides `kept`)
    add("topk/capacity/tokens1-k1", _R(k=1, capacity=Capacity(tokens=2)), 4,
        _logits(rng("cap1"), 16, 4, "fp32"), "§5.6", "capacity 2 per expert for 16 tokens: "
        "later tokens are dropped", tags=["capacity"])
    add("topk/capacity/factor0.5-k2", _R(k=2, normalize="sum", capacity=Capacity(factor=0.5)),
        4, _logits(rng("cap2"), 16, 4, "fp32"), "§5.6", "factor 0.5, k = 2: first choices of "
        "all tokens before second choices", tags=["capacity"])
    add("topk/capacity/factor1.25-ceil", _R(k=2, capacity=Capacity(factor=1.25)), 6,
        _logits(rng("cap3"), 11, 6, "fp32"), "§5.6", "C = ceil(1.25 * 11 * 2 / 6) = 5",
        tags=["capacity"])
    add("topk/capacity/passthrough", _R(k=1, capacity=Capacity(tokens=3,
                                                               drop_policy="passthrough_scaled")),
        4, _logits(rng("cap4"), 16, 4, "fp32"), "§5.6", "passthrough_scaled: same `kept` as zero",
        tags=["capacity"])
    add("expert_choice/capacity/tokens-gt-T", _R("expert_choice", 1,
                                                 capacity=Capacity(tokens=100)), 4,
        _logits(rng("cap5"), 6, 4, "fp32"), "§5.6, §5.10", "capacity above T is clipped to T")
    add("sparse_mixer/capacity/tokens2", _R("sparse_mixer", 2, jitter_eps=0.01,
                                            capacity=Capacity(tokens=2)), 4,
        _logits(rng("cap6"), 10, 4, "fp32"), "§5.6, §5.11", "sparse mixer with capacity",
        tags=["capacity"])
    # normalization epsilon edge cases
    tiny = -30.0 + _logits(rng("tiny"), 8, 8, "fp32", scale=0.1)
    add("topk/edge/clamp-eps-tiny-sum", _R(k=2, scoring="sigmoid", normalize="sum",
                                           epsilon=1e-12, epsilon_rule="clamp"), 8, tiny,
        "§5.7", "sum of weights ~2e-13 < epsilon 1e-12: the clamp decides")
    add("topk/edge/add-eps-tiny-sum", _R(k=2, scoring="sigmoid", normalize="sum",
                                         epsilon=1e-12), 8, tiny, "§5.7",
        "sum of weights ~2e-13: epsilon added to the denominator")
    add("topk/edge/lp-half", _R(k=3, normalize="lp", norm_p=0.5, scale=0.7), 8,
        _logits(rng("lp"), 16, 8, "fp32"), "§5.7", "L0.5 renormalization and scale 0.7")
    return out


# ============================================================================== moe cases
MOE_KINDS: dict[str, tuple[Callable[[], RoutingSpec], int, str]] = {
    "topk": (lambda: _R(k=2, normalize="sum"), 8, "§5.4, §5.8"),
    "group_topk": (lambda: _R("group_topk", 2, "sigmoid", selection_bias=True, normalize="sum",
                              epsilon=1e-20, scale=2.5, n_group=4, topk_group=2,
                              group_score="top2_sum"), 8, "§5.5, §5.8"),
    "sparse_mixer": (lambda: _R("sparse_mixer", 2, jitter_eps=0.01), 8, "§5.11, §5.8"),
    "expert_choice": (lambda: _R("expert_choice", 1, capacity=Capacity(factor=2.0)), 4,
                      "§5.10"),
    "soft_moe": (lambda: _R("soft_moe", 1, slots_per_expert=2), 4, "§5.12"),
}


def _moe_case(seed: int, cid: str, layer_fn: Callable[[np.random.Generator], tuple],
              desc: str, spec_ref: str, dtype: str, tags: Iterable[str] = ()) -> Case:
    """`layer_fn(rng)` -> (layer, x, tensors, quantization, real MoEParams). Redraws (next
    attempt of the case's rng) when the data would be ambiguous where alternatives are not
    enumerated (capacity, expert choice)."""
    for attempt in range(50):
        rng = case_rng(seed, cid, attempt)
        layer, x, tensors, quant, params = layer_fn(rng)
        try:
            with np.errstate(all="ignore"):
                ex, info = moe_expected(layer, x, params)
        except Ambiguous:
            continue
        tags = set(tags)
        if info["ties"]:
            tags.add("ties")
        if info["alternatives"]:
            tags.add("near-ties")
        if layer.routing.capacity is not None:
            tags.add("capacity")
        if layer.shared_experts is not None:
            tags.add("shared")
        return Case(cid, "moe", desc, spec_ref, dtype, layer.to_dict(), {"x": x}, tensors,
                    quant, ex, tags=tuple(sorted(tags)))
    raise RuntimeError(f"{cid}: could not draw unambiguous data")


def _plain(layer: LayerSpec, T: int, dtype: str, x_scale: float = 1.0,
           router_scale: float = 1.0):
    """A layer_fn with random weights in `dtype` (N(0, 1/fan_in)) and x ~ N(0, x_scale^2)."""
    def fn(rng):
        dt = DTYPES[dtype]
        params = random_layer_params(layer, rng, np.float32)
        params.router_weight = params.router_weight * np.float32(router_scale)
        tensors = {k: v.astype(dt) for k, v in params.to_tensors(layer).items()}
        from ..moe import MoEParams
        real = MoEParams.from_tensors(layer, lambda n: tensors[n].astype(np.float32))
        x = (rng.standard_normal((T, layer.hidden_size)) * x_scale).astype(dt)
        return layer, x, tensors, {}, real
    return fn


def moe_cases(seed: int) -> list[Case]:
    out = []
    for kind, (make, E, ref) in MOE_KINDS.items():
        for act in ACTIVATIONS:
            for dt in DTYPES:
                bias = act in ("swiglu_oai", "relu2")
                routing = make()
                if act == "swiglu_oai" and kind == "topk":
                    routing.router_bias = True
                layer = _layer(E, routing, act=act, bias=bias)
                cid = f"moe/{kind}/{act}/{dt}"
                out.append(_moe_case(seed, cid, _plain(layer, 8, dt), f"{kind} routing, {act} "
                                     f"experts{' with biases' if bias else ''}, {dt} weights",
                                     f"{ref}, §5.13, §6.1", dt))
    out += _moe_edges(seed)
    out += _moe_quantized(seed)
    out += _moe_output_bias(seed)
    return out


def _dyadic_tie_layer(layer: LayerSpec, T: int, dtype: str, delta: float = 0.0):
    """Router rows and x with values on a coarse dyadic grid, so every float32 dot product is
    exact whatever the summation order; rows e and e + E/2 are identical (exact logit ties),
    or, with `delta`, differ by `delta` in their first column (near-ties: the logits differ by
    delta * x[:, 0], which float32 rounding may or may not resolve)."""
    def fn(rng):
        dt = DTYPES[dtype]
        E, H = layer.num_experts, layer.hidden_size
        params = random_layer_params(layer, rng, np.float32)
        base = rng.integers(-4, 5, size=(E // 2, H)) / 8.0
        params.router_weight = np.concatenate([base, base]).astype(np.float32)
        params.router_weight[E // 2:, 0] += np.float32(delta)
        tensors = {k: v.astype(dt) for k, v in params.to_tensors(layer).items()}
        from ..moe import MoEParams
        real = MoEParams.from_tensors(layer, lambda n: tensors[n].astype(np.float32))
        x = (rng.integers(-4, 5, size=(T, H)) / 4.0).astype(dt)
        return layer, x, tensors, {}, real
    return fn


def _moe_edges(seed: int) -> list[Case]:
    out = []

    def add(name, layer, fn_or_T, desc, ref, dt="fp32", tags=(), **kw):
        fn = _plain(layer, fn_or_T, dt, **kw) if isinstance(fn_or_T, int) else fn_or_T
        out.append(_moe_case(seed, f"moe/{name}/{dt}", fn, desc, ref, dt, tags))

    topk2 = lambda: _R(k=2, normalize="sum")  # noqa: E731
    # exact ties (duplicate router rows on a dyadic grid) and the lower-index rule
    for dt in DTYPES:
        add("topk/ties-kth/swiglu", _layer(8, _R(k=3)), _dyadic_tie_layer(
            _layer(8, _R(k=3)), 16, dt), "identical router rows give exact ties at the 3rd "
            "place: the lower expert index must be used", "§6.2, §5.4", dt, ["exact-ties"])
    add("topk/ties-kth-sigmoid/swiglu", _layer(8, _R(k=1, scoring="sigmoid")),
        _dyadic_tie_layer(_layer(8, _R(k=1, scoring="sigmoid")), 16, "fp32"),
        "exact sigmoid ties for the single expert", "§6.2", tags=["exact-ties"])
    for name, routing in (("topk/near-ties-kth/swiglu", _R(k=3)),
                          ("topk/near-ties-kth-sigmoid/swiglu",
                           _R(k=2, scoring="sigmoid", normalize="sum"))):
        add(name, _layer(8, routing), _dyadic_tie_layer(_layer(8, routing), 16, "fp32",
                                                        delta=2.0 ** -22),
            "twin router rows 2^-22 apart: near-ties at the k-th place; a token may use "
            "either expert and is compared with the output recomputed on its choice",
            "§6.4, §5.4")
    gl = _layer(8, _R("group_topk", 2, n_group=4, topk_group=1, group_score="max"))
    add("group_topk/ties-group/swiglu", gl, _dyadic_tie_layer(gl, 16, "fp32"),
        "twin groups tie on group score: the lower group must be kept", "§5.5, §6.2",
        tags=["exact-ties"])
    # k = 1, k = E, E not a power of two, T = 0, T = 1
    add("topk/k1/swiglu", _layer(8, _R(k=1, normalize="sum")), 8,
        "k = 1 with sum normalization (weight 1)", "§5.7")
    add("topk/kE-E6/gelu", _layer(6, _R(k=6), act="gelu"), 8, "k = E = 6: a dense "
        "softmax-weighted mixture", "§5.4")
    add("topk/E5-k3/silu", _layer(5, _R(k=3, normalize="sum"), act="silu"), 8,
        "E = 5 experts", "§5.4")
    add("group_topk/E6-G3/swiglu", _layer(6, _R("group_topk", 2, "sigmoid", n_group=3,
                                                topk_group=2, group_score="top2_sum",
                                                normalize="sum")), 8,
        "E = 6 in 3 groups of 2", "§5.5")
    for kind, (make, E, ref) in MOE_KINDS.items():
        add(f"{kind}/T0/swiglu", _layer(E, make()), 0, "T = 0: output [0, H]", ref + ", §5.1")
        add(f"{kind}/T1/swiglu", _layer(E, make()), 1, "T = 1", ref + ", §5.1")
    # capacity overflow
    add("topk/capacity-zero/relu", _layer(4, _R(k=2, normalize="sum",
                                                capacity=Capacity(tokens=3)), act="relu"), 16,
        "capacity 3: dropped assignments add nothing", "§5.6")
    add("topk/capacity-passthrough/relu", _layer(4, _R(k=1, capacity=Capacity(
        factor=0.5, drop_policy="passthrough_scaled")), act="relu"), 16,
        "Switch-style: a dropped token passes through scaled by its weight", "§5.6")
    add("expert_choice/capacity-tokens/relu2", _layer(4, _R("expert_choice", 1, "sigmoid",
                                                           capacity=Capacity(tokens=3)),
                                                      act="relu2"), 12,
        "expert choice with a fixed capacity of 3", "§5.6, §5.10")
    # shared experts, weight_on input, biases
    add("topk/shared-gated/swiglu", _layer(8, topk2(), shared=SharedExpertsSpec(
        1, FFNSpec(20, "swiglu"), gate=True)), 8, "a gated shared expert (Qwen2-MoE)", "§5.14")
    add("group_topk/shared/swiglu", _layer(8, MOE_KINDS["group_topk"][0](),
                                           shared=SharedExpertsSpec(1, FFNSpec(24, "swiglu"))),
        8, "DeepSeek-V3 layer: group-limited sigmoid routing plus a shared expert", "§5.14")
    add("topk/shared-2-ungated/gelu", _layer(8, topk2(), act="gelu", shared=SharedExpertsSpec(
        2, FFNSpec(8, "gelu_tanh", bias=True))), 8, "two ungated shared experts with biases",
        "§5.14")
    add("expert_choice/shared/swiglu", _layer(4, MOE_KINDS["expert_choice"][0](),
                                              shared=SharedExpertsSpec(1, FFNSpec(8, "swiglu"),
                                                                       gate=True)), 8,
        "expert choice plus a gated shared expert (unchosen tokens get only the shared)",
        "§5.10, §5.14")
    add("topk/weight-on-input/swiglu", _layer(8, _R(k=1, scoring="sigmoid_topk",
                                                   weight_on="input"),
                                              shared=SharedExpertsSpec(1, FFNSpec(8,
                                                                                  "swiglu"))),
        8, "Llama 4: the weight scales the expert input", "§5.8")
    add("expert_choice/weight-on-input/silu", _layer(4, _R("expert_choice", 1,
                                                          capacity=Capacity(factor=1.0),
                                                          weight_on="input"), act="silu"), 8,
        "expert choice with weight_on input", "§5.8, §5.10")
    add("topk/router-bias/swiglu", _layer(8, _R(k=4, scoring="softmax_topk",
                                               router_bias=True), bias=True), 8,
        "router bias and expert biases (gpt-oss shape)", "§5.2, §5.13")
    # special values
    nan_layer = _layer(8, topk2())

    def nan_fn(rng):
        layer, x, t, q, p = _plain(nan_layer, 8, "fp32")(rng)
        x = x.copy()
        x[2, 5] = np.nan
        return layer, x, t, q, p
    add("topk/nan-token/swiglu", nan_layer, nan_fn, "a NaN in one token makes that token's "
        "output NaN and leaves the others alone", "§6.3", tags=["nan"])
    add("topk/large-router-logits/swiglu", _layer(8, topk2()), 8, "router logits of order "
        "1e3: softmax must subtract the max", "§6.1", router_scale=1000.0)
    add("topk/large-activations/swiglu_oai", _layer(8, _R(k=2, scoring="softmax_topk"),
                                                     act="swiglu_oai", bias=True), 8,
        "inputs scaled by 20 so swiglu_oai's clamps at +-limit are active", "§5.13",
        x_scale=20.0)
    return out


# ----------------------------------------------------------------------- quantized experts
def _quantize_fp8(w: np.ndarray, block: tuple[int, int]):
    R, C = w.shape
    br, bc = block
    gr, gc = -(-R // br), -(-C // bc)
    scale = np.zeros((gr, gc), np.float32)
    for i in range(gr):
        for j in range(gc):
            m = np.abs(w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]).max()
            scale[i, j] = max(m, 1e-8) / 448.0
    full = np.repeat(np.repeat(scale, br, 0), bc, 1)[:R, :C]
    q = (w / full).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def _quantize_mxfp4(rng, R: int, C: int):
    blocks = rng.integers(0, 256, size=(R, C // 32, 16), dtype=np.uint8)
    scales = rng.integers(122, 126, size=(R, C // 32), dtype=np.uint8)
    return blocks, scales


def _quantize_int(rng, w: np.ndarray, bits: int, group: int, asym: bool):
    R, C = w.shape
    G = -(-C // group)
    scale = np.zeros((R, G), np.float32)
    zero = np.zeros((R, G), np.uint8)
    q = np.zeros((R, C), np.int16)
    qmax = 2 ** (bits - 1) - 1
    for g in range(G):
        blk = w[:, g * group:(g + 1) * group]
        if asym:
            lo, hi = blk.min(axis=1), blk.max(axis=1)
            scale[:, g] = np.maximum(hi - lo, 1e-8) / (2 ** bits - 1)
            zero[:, g] = np.clip(np.round(-lo / scale[:, g]), 0, 2 ** bits - 1)
            q[:, g * group:(g + 1) * group] = np.clip(
                np.round(blk / scale[:, g:g + 1]) + zero[:, g:g + 1], 0, 2 ** bits - 1)
        else:
            scale[:, g] = np.maximum(np.abs(blk).max(axis=1), 1e-8) / qmax
            q[:, g * group:(g + 1) * group] = np.clip(np.round(blk / scale[:, g:g + 1]),
                                                      -qmax - 1, qmax)
    if bits == 8:
        stored = q.astype(np.uint8 if asym else np.int8)
    else:
        nib = (q & 0x0F).astype(np.uint8)
        if C % 2:
            nib = np.concatenate([nib, np.zeros((R, 1), np.uint8)], axis=1)
        stored = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
    return stored, scale.astype(np.float16), (zero if asym else None)


def _quant_fn(layer: LayerSpec, scheme: str, T: int = 8, **opts):
    """Experts quantized with `scheme`; router, biases, shared experts and x in bf16."""
    def fn(rng):
        from ..manifest import Quantization
        from ..moe import MoEParams
        from ..quant import dequantize
        bf = ml_dtypes.bfloat16
        params = random_layer_params(layer, rng, np.float32)
        tensors = {k: v.astype(bf) for k, v in params.to_tensors(layer).items()}
        quant = {}
        for e in range(layer.num_experts):
            for proj in layer.experts.projections:
                name = layer.expert_name(e, proj)
                w = tensors[name].astype(np.float32)
                R, C = w.shape
                desc = {"logical_shape": [R, C], "scale": name + "_scale"}
                if scheme == "fp8-block":
                    q, s = _quantize_fp8(w, opts["block"])
                    desc.update(scheme="fp8-block", block=list(opts["block"]))
                    tensors[name], tensors[name + "_scale"] = q, s
                elif scheme == "mxfp4":
                    q, s = _quantize_mxfp4(rng, R, C)
                    desc.update(scheme="mxfp4")
                    tensors[name], tensors[name + "_scale"] = q, s
                else:
                    q, s, z = _quantize_int(rng, w, opts["bits"], opts["group"], opts["asym"])
                    desc.update(scheme="int-group", bits=opts["bits"], group_size=opts["group"])
                    tensors[name], tensors[name + "_scale"] = q, s
                    if z is not None:
                        desc["zero_point"] = name + "_zero"
                        tensors[name + "_zero"] = z
                quant[name] = desc

        def real(n):
            if n in quant:
                return dequantize(tensors[n], Quantization.from_dict(quant[n], n),
                                  tensors.__getitem__, n).astype(np.float32)
            return tensors[n].astype(np.float32)
        x = rng.standard_normal((T, layer.hidden_size)).astype(bf)
        return layer, x, tensors, quant, MoEParams.from_tensors(layer, real)
    return fn


def _moe_quantized(seed: int) -> list[Case]:
    out = []
    v3 = MOE_KINDS["group_topk"][0]
    specs = [
        ("topk/fp8-block-partial/swiglu", _layer(8, _R(k=2, normalize="sum")), "fp8-block",
         dict(block=(8, 8)), "fp8", "FP8 E4M3 experts, 8x8 blocks with partial blocks (I=12)"),
        ("group_topk/fp8-block/swiglu", _layer(8, v3(), shared=SharedExpertsSpec(
            1, FFNSpec(12, "swiglu"))), "fp8-block", dict(block=(4, 16)), "fp8",
         "DeepSeek-V3-shaped layer with FP8 block-quantized experts"),
        ("topk/mxfp4/swiglu_oai", _layer(8, _R(k=2, scoring="softmax_topk", router_bias=True),
                                         H=32, I=32, act="swiglu_oai", bias=True), "mxfp4", {},
         "mxfp4", "gpt-oss-shaped layer with MXFP4 experts"),
        ("topk/mxfp4/swiglu", _layer(8, _R(k=2, normalize="sum"), H=32, I=32), "mxfp4", {},
         "mxfp4", "MXFP4 experts with SwiGLU"),
        ("topk/int4-sym/swiglu", _layer(8, _R(k=2, normalize="sum")), "int-group",
         dict(bits=4, group=8, asym=False), "int4", "int4 symmetric groups of 8 (odd groups "
         "at I=12)"),
        ("topk/int8-asym/gelu", _layer(8, _R(k=2), act="gelu"), "int-group",
         dict(bits=8, group=16, asym=True), "int8", "int8 asymmetric groups with zero points"),
    ]
    for name, layer, scheme, opts, dt, desc in specs:
        out.append(_moe_case(seed, f"moe/{name}/{dt}", _quant_fn(layer, scheme, **opts), desc,
                             "§3.3, §5.13", dt, ["quantized"]))
    return out


def _biased(layer: LayerSpec) -> LayerSpec:
    layer.output_bias = True
    return layer


def _moe_output_bias(seed: int) -> list[Case]:
    """SEIF 1.1 `output_bias` (§5.16): added to every token's output, routed, dropped or
    unchosen alike, after the shared experts. Appended last so no 1.0 case id or digest moves."""
    out = []

    def add(name, layer, T, desc, ref, dt="fp32"):
        out.append(_moe_case(seed, f"moe/{name}/{dt}", _plain(_biased(layer), T, dt), desc,
                             f"{ref}, §5.16", dt, ["output-bias"]))

    jet = lambda: _R(k=2, scoring="softmax_topk")  # noqa: E731  (JetMoE's router)
    for dt in DTYPES:
        add("topk/output-bias/swiglu", _layer(8, jet()), 8, "JetMoE-shaped layer: top-2 "
            "softmax over the k logits, SwiGLU experts, a layer output bias", "§5.3", dt)
    add("topk/output-bias-shared-gated/gelu", _layer(8, _R(k=2, normalize="sum"), act="gelu",
                                                     bias=True, shared=SharedExpertsSpec(
                                                         1, FFNSpec(8, "gelu", bias=True),
                                                         gate=True)),
        8, "output bias added after a gated shared expert and biased experts", "§5.14")
    add("topk/output-bias-capacity/relu", _layer(4, _R(k=2, normalize="sum",
                                                       capacity=Capacity(tokens=3)),
                                                 act="relu"), 16,
        "capacity 3: a token whose assignments are all dropped still gets the bias", "§5.6")
    add("expert_choice/output-bias/swiglu", _layer(4, MOE_KINDS["expert_choice"][0]()), 8,
        "expert choice: tokens no expert picked get the bias alone", "§5.10")
    add("soft_moe/output-bias/swiglu", _layer(4, MOE_KINDS["soft_moe"][0]()), 8,
        "Soft MoE plus a layer output bias", "§5.12")
    add("sparse_mixer/output-bias/swiglu", _layer(4, MOE_KINDS["sparse_mixer"][0]()), 8,
        "sparse mixer plus a layer output bias", "§5.11")
    add("topk/output-bias-T0/swiglu", _layer(8, jet()), 0, "T = 0 with an output bias: output "
        "[0, H]", "§5.1")
    return out


# ================================================================================ catalogue
def build_catalogue(seed: int = DEFAULT_SEED) -> list[Case]:
    """Compute every case afresh, in catalogue order (router, moe, format)."""
    from .formats import format_cases
    out = router_cases(seed) + moe_cases(seed) + format_cases(seed)
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise RuntimeError(f"duplicate case ids: {dup[:5]}")
    return out


@functools.lru_cache(maxsize=4)
def _cached(seed: int) -> tuple[Case, ...]:
    return tuple(build_catalogue(seed))


def catalogue(seed: int = DEFAULT_SEED, k: str | None = None) -> list[Case]:
    """All cases (computed once per process and seed), optionally filtered by `-k`. Cases are
    shared between calls: treat them as read-only."""
    return [c for c in _cached(seed) if matches(k, c.id, c.tags)]


def _file_digest(path: Path) -> str:
    if path.is_symlink():
        return "symlink:" + os.readlink(path)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def generate(out: Path, seed: int = DEFAULT_SEED, k: str | None = None,
             cases: list[Case] | None = None) -> dict:
    """Write the catalogue under `out`; return the index (also written as catalogue.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = catalogue(seed, k=k) if cases is None else cases
    entries = []
    for case in cases:
        files = save_case(case, out)
        digests = {str(p.relative_to(out)): _file_digest(p) for p in files}
        entries.append({"id": case.id, "kind": case.kind, "files": digests,
                        "digest": case_digest(digests)})
    index = {"suite_version": SUITE_VERSION, "spec_version": SPEC_VERSION, "seed": seed,
             "filter": k, "cases": entries,
             "digest": hashlib.sha256("".join(e["digest"] + e["id"] + "\n"
                                              for e in entries).encode()).hexdigest()}
    (out / "catalogue.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def case_digest(files: dict[str, str]) -> str:
    """One digest per case over its files' names and digests."""
    text = "".join(f"{name} {d}\n" for name, d in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def hash_list(index: dict) -> str:
    """The checked-in form: ``<case digest>  <case id>`` per line."""
    return "".join(f"{e['digest']}  {e['id']}\n" for e in index["cases"])


def counts(cases: Iterable[Case]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in cases:
        out[c.family] = out.get(c.family, 0) + 1
    return dict(sorted(out.items()))


del math
