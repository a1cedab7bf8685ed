"""Expected outputs of router and MoE cases, from the reference in float64 (spec §5, §6.4).

Besides the reference's own answer, this enumerates every *other* selection §6.4 accepts for a
token (a near-tie within the tie tolerance), with the weights and, for MoE cases, the token's
layer output recomputed on that selection. The runner then only looks things up.
"""

from __future__ import annotations

import math

import numpy as np

from ..manifest import LayerSpec, RoutingSpec
from ..moe import MoEParams, ffn_forward, moe_forward
from ..routing import (
    _group_limit,
    _normalize,
    _sigmoid,
    _softmax,
    expert_choice,
    route,
    router_logits,
    soft_moe_weights,
    topk_lowest_index,
)
from .tolerance import _rank_key, admissible, tie_tau

F64 = np.float64
EPS32 = 2.0 ** -24
TOKEN_CHOICE = ("topk", "group_topk", "sparse_mixer")


class Ambiguous(Exception):
    """Raised where a case would need alternatives the suite does not enumerate (capacity and
    expert choice couple tokens); generators then draw other data."""


def _slope(spec: RoutingSpec, value: float) -> float:
    """d(choice value)/d(logit), bounded: how logit errors move the choice values."""
    if spec.kind == "sparse_mixer" or spec.scoring.endswith("_topk"):
        return 1.0
    if spec.scoring == "sigmoid":
        return 0.25
    return 2.0 * abs(value) if math.isfinite(value) else 0.0


def _exact_tie(values: np.ndarray, selected) -> bool:
    """Some selected entry has an exactly equal partner (a real tie that §6.2 decides)."""
    key = _rank_key(values)
    sel = set(int(i) for i in selected)
    for i in sel:
        if np.count_nonzero(key == key[i]) > 1:
            return True
    return False


def _forced_weights(spec: RoutingSpec, z: np.ndarray, s: np.ndarray, sel) -> np.ndarray:
    """Weights of token-choice routing with the selection forced to `sel` (ordered)."""
    sel = list(sel)
    if spec.kind == "sparse_mixer":
        w = []
        eligible = z.copy()
        two_eps = 2 * spec.jitter_eps
        for i in sel:
            m = eligible[i]
            with np.errstate(divide="ignore", invalid="ignore"):
                masked = (m - z) / np.maximum(np.abs(z), m) > two_eps
            gates = np.where(masked, -np.inf, eligible)
            w.append(_softmax(gates[None], -1)[0, i])
            eligible[i] = -np.inf
        w = np.array(w, dtype=F64)
    elif spec.scoring == "softmax_topk":
        w = _softmax(z[sel][None], -1)[0]
    elif spec.scoring == "sigmoid_topk":
        w = _sigmoid(z[sel])
    else:
        w = s[sel]
    return _normalize(w[None].astype(F64), spec)[0] * spec.scale


def token_choice(logits: np.ndarray, spec: RoutingSpec, sel_bias: np.ndarray | None,
                 logit_err: np.ndarray) -> tuple[dict, dict]:
    """Reference token-choice routing in float64 plus the accepted alternatives.

    Returns (expected arrays, info) where info has ``alternatives`` (count) and ``ties``
    (some token has an exact tie among its selected experts)."""
    z = np.asarray(logits, F64)
    T, E = z.shape
    k = spec.top_k
    res = route(z, spec, sel_bias, dtype=F64)
    s = res.scores
    c = s if sel_bias is None else s + np.asarray(sel_bias, F64)
    if spec.kind == "group_topk":
        cm = _group_limit(c, spec) if T else c
    elif spec.kind == "sparse_mixer":
        cm = z
    else:
        cm = c
    tau = np.zeros(T)
    alt_row, alt_idx, alt_w = [], [], []
    ties = False
    for t in range(T):
        err = float(np.nan_to_num(logit_err[t], nan=0.0, posinf=0.0))
        ref = tuple(int(i) for i in res.indices[t])
        kth = ref[-1]
        tau[t] = tie_tau(cm[t, kth], err, _slope(spec, s[t, kth]))
        if spec.kind == "sparse_mixer":
            sels = []
            i1s = admissible(z[t], 1, tie_tau(np.max(z[t]), err, 1.0))
            for (i1,) in i1s:
                z2 = z[t].copy()
                z2[i1] = -np.inf
                top = z2[topk_lowest_index(z2, 1)[0]]
                for (i2,) in admissible(z2, 1, tie_tau(top, err, 1.0)):
                    sels.append((i1, i2))
            ties |= _exact_tie(z[t], ref[:1]) or _exact_tie(
                np.where(np.arange(E) == ref[0], -np.inf, z[t]), ref[1:])
            others = [p for p in sels if p != ref]
        else:
            if spec.kind == "group_topk":
                G = spec.n_group
                grouped = c[t].reshape(G, E // G)
                if spec.group_score == "max":
                    gs = np.array([g[topk_lowest_index(g, 1)[0]] for g in grouped])
                else:
                    gs = np.array([g[topk_lowest_index(g, 2)].sum() for g in grouped])
                gk = topk_lowest_index(gs, spec.topk_group)
                ties |= _exact_tie(gs, gk)
                gtau = 2 * tie_tau(gs[gk[-1]], err, _slope(spec, gs[gk[-1]]))
                sels = []
                fill = -np.inf if spec.group_mask == "neg_inf" else 0.0
                for gset in admissible(gs, spec.topk_group, gtau):
                    keep = np.repeat(np.isin(np.arange(G), gset), E // G)
                    masked = np.where(keep, c[t], fill)
                    kk = topk_lowest_index(masked, k)[-1]
                    band = tie_tau(masked[kk], err, _slope(spec, s[t, kk]))
                    sels += [x for x in admissible(masked, k, band) if x not in sels]
            else:
                sels = admissible(cm[t], k, tau[t])
            ties |= _exact_tie(cm[t], ref)
            others = [x for x in sels if x != tuple(sorted(ref))]
        for sel in others:
            alt_row.append(t)
            alt_idx.append(sel)
            alt_w.append(_forced_weights(spec, z[t], s[t], sel))
    ex = {
        "indices": res.indices.astype(np.int64),
        "weights": res.weights.astype(F64),
        "kept": res.kept.astype(bool),
        "choice": cm.astype(F64),
        "tau": tau,
        "alt_row": np.array(alt_row, dtype=np.int64),
        "alt_indices": np.array(alt_idx, dtype=np.int64).reshape(len(alt_row), k),
        "alt_weights": np.array(alt_w, dtype=F64).reshape(len(alt_row), k),
    }
    return ex, {"alternatives": len(alt_row), "ties": bool(ties)}


def expert_choice_ref(logits: np.ndarray, spec: RoutingSpec, logit_err: np.ndarray
                      ) -> tuple[dict, dict]:
    """Expert choice in float64: rows are experts, entries tokens (§5.10, §6.4)."""
    z = np.asarray(logits, F64)
    T, E = z.shape
    tok, w = expert_choice(z, spec, dtype=F64)
    s = _softmax(z, -1) if spec.scoring == "softmax" else _sigmoid(z)
    by_expert = s.T
    C = tok.shape[1]
    err = float(np.nan_to_num(np.max(logit_err, initial=0.0), nan=0.0, posinf=0.0))
    tau = np.zeros(E)
    alt_row, alt_idx, alt_w = [], [], []
    ties = False
    for e in range(E):
        if C == 0:
            continue
        ref = tuple(int(i) for i in tok[e])
        tau[e] = tie_tau(by_expert[e, ref[-1]], err, _slope(spec, by_expert[e, ref[-1]]))
        ties |= _exact_tie(by_expert[e], ref)
        for sel in admissible(by_expert[e], C, tau[e]):
            if sel != tuple(sorted(ref)):
                alt_row.append(e)
                alt_idx.append(sel)
                alt_w.append(by_expert[e, list(sel)] * spec.scale)
    ex = {"indices": tok.astype(np.int64), "weights": w.astype(F64), "choice": by_expert,
          "tau": tau, "alt_row": np.array(alt_row, dtype=np.int64),
          "alt_indices": np.array(alt_idx, dtype=np.int64).reshape(len(alt_row), C),
          "alt_weights": np.array(alt_w, dtype=F64).reshape(len(alt_row), C)}
    return ex, {"alternatives": len(alt_row), "ties": bool(ties)}


def router_expected(layer: LayerSpec, logits: np.ndarray, sel_bias=None,
                    logit_err: np.ndarray | None = None) -> tuple[dict, dict]:
    """Expected routing of a router case (logits given)."""
    r = layer.routing
    z = np.asarray(logits).astype(F64)
    err = np.zeros(z.shape[0]) if logit_err is None else logit_err
    if r.kind in TOKEN_CHOICE:
        sb = None if sel_bias is None else np.asarray(sel_bias).astype(F64)
        return token_choice(z, r, sb, err)
    if r.kind == "expert_choice":
        return expert_choice_ref(z, r, err)
    dispatch, combine = soft_moe_weights(z, dtype=F64)
    return {"dispatch": dispatch, "combine": combine}, {"alternatives": 0, "ties": False}


def _routed(x_t: np.ndarray, layer: LayerSpec, params: MoEParams, sel, w) -> np.ndarray:
    out = np.zeros(x_t.shape[-1], dtype=F64)
    for e, wj in zip(sel, w):
        if layer.routing.weight_on == "input":
            out += ffn_forward(wj * x_t[None], layer.experts, params.experts[e], F64)[0]
        else:
            out += wj * ffn_forward(x_t[None], layer.experts, params.experts[e], F64)[0]
    return out


def moe_expected(layer: LayerSpec, x: np.ndarray, params: MoEParams) -> tuple[dict, dict]:
    """Expected layer output in float64 (`params` hold real values), plus, per near-tied
    token, the output on each accepted alternative selection."""
    r = layer.routing
    x64 = np.asarray(x).astype(F64)
    p64 = MoEParams(
        router_weight=np.asarray(params.router_weight).astype(F64),
        router_bias=None if params.router_bias is None else params.router_bias.astype(F64),
        selection_bias=(None if params.selection_bias is None
                        else params.selection_bias.astype(F64)),
        experts=[{k: v.astype(F64) for k, v in d.items()} for d in params.experts],
        shared=[{k: v.astype(F64) for k, v in d.items()} for d in params.shared],
        shared_gate=None if params.shared_gate is None else params.shared_gate.astype(F64),
        output_bias=None if params.output_bias is None else params.output_bias.astype(F64))
    y = moe_forward(x64, layer, p64, dtype=F64)
    ex = {"y": y}
    info = {"alternatives": 0, "ties": False}
    if r.kind == "soft_moe" or x64.shape[0] == 0:
        return ex, info
    logits = router_logits(x64, p64.router_weight, p64.router_bias, F64)
    H = x64.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        absdot = np.abs(x64) @ np.abs(p64.router_weight).T
        if p64.router_bias is not None:
            absdot = absdot + np.abs(p64.router_bias)
        err = 2 * (H + 2) * EPS32 * np.max(absdot, axis=1, initial=0.0)
    if r.kind == "expert_choice":
        _, info = expert_choice_ref(logits, r, err)
        if info["alternatives"]:
            raise Ambiguous("expert choice near-tie")
        return ex, info
    rx, info = token_choice(logits, r, p64.selection_bias, err)
    if info["alternatives"] and r.capacity is not None:
        raise Ambiguous("near-tie under capacity")
    alt_y = []
    for t, sel, w in zip(rx["alt_row"], rx["alt_indices"], rx["alt_weights"]):
        ref_routed = _routed(x64[t], layer, p64, rx["indices"][t], rx["weights"][t])
        alt_y.append(y[t] - ref_routed + _routed(x64[t], layer, p64, sel, w))
    ex["alt_row"] = rx["alt_row"]
    ex["alt_y"] = np.array(alt_y, dtype=F64).reshape(len(alt_y), H)
    return ex, info
