"""Reference routing math for SEIF, in NumPy (spec §5).

This module is *the* definition every other backend (torch, JAX, ONNX) is compared against, so
it favours being obviously right over being fast. Two numeric rules are normative:

* Router logits and scores are computed in **float32** (or float64 when asked) whatever dtype the
  weights are stored in. bf16 logits tie far too often at the k-th place for large E.
* Ties at the k-th place go to the **lower expert index**; NaN ranks above every number; -0.0
  and +0.0 are equal. `torch.topk` gives no tie order and ORT's com.microsoft.MoE prefers the
  higher index, so a reference must fix one.

Token-choice routing (`topk`, `group_topk`, `sparse_mixer`, and any of these with a capacity)
goes through :func:`route`; expert choice through :func:`expert_choice`; Soft MoE through
:func:`soft_moe_weights`. The pipeline order in :func:`route` is normative: a different order
(e.g. renormalizing after the capacity drop) gives different numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RoutingError
from .manifest import RoutingSpec

__all__ = [
    "RoutingResult",
    "expert_choice",
    "route",
    "router_logits",
    "soft_moe_weights",
    "topk_lowest_index",
]

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- helpers
def _compute_dtype(dtype) -> np.dtype:
    """Routing runs in float32 (normative) or float64 (for high-precision cross-checks) only."""
    dt = np.dtype(dtype)
    if dt not in _COMPUTE_DTYPES:
        raise RoutingError(f"routing computes in float32 or float64, not {dt}")
    return dt


def _as_matrix(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise RoutingError(f"{name} must be 2-D, got shape {list(a.shape)}")
    return a


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Numerically stable softmax: subtracting the max changes nothing mathematically but keeps
    exp() from overflowing; -inf entries (masked) get exactly 0."""
    if x.shape[axis] == 0 or x.size == 0:
        return x.copy()
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)). For very negative x, exp overflows to inf and the result is exactly 0,
    which is the correctly rounded answer, so the overflow warning is silenced."""
    with np.errstate(over="ignore"):
        return (1 / (1 + np.exp(-x))).astype(x.dtype, copy=False)


def _score(x: np.ndarray, fn: str, axis: int = -1) -> np.ndarray:
    if fn in ("softmax", "softmax_topk"):
        return _softmax(x, axis)
    if fn in ("sigmoid", "sigmoid_topk"):
        return _sigmoid(x)
    raise RoutingError(f"unknown scoring {fn!r}")


# --------------------------------------------------------------------------- top-k
def topk_lowest_index(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis, best first, as int64.

    The order is total and platform independent, so every backend can reproduce it:

    1. NaN ranks above every number (torch.topk, jax.lax.top_k and ONNX Runtime all treat NaN as
       the largest value; following them keeps a NaN-poisoned router visible instead of hiding it).
    2. Larger values first; -inf is below every finite number.
    3. Equal values (including -0.0 == +0.0, and NaN == NaN) go to the lower index.

    A stable lexicographic sort on (is-not-NaN, -value, index) states exactly that; an
    argpartition would be faster but has no defined tie order.
    """
    v = np.asarray(values)
    if v.ndim < 1:
        raise RoutingError("topk_lowest_index needs at least a 1-D array")
    n = v.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 or k > n:
        raise RoutingError(f"k = {k!r} is not in [0, {n}]")
    # float64 holds every float16/bfloat16/float32 value exactly, so nothing ties by rounding.
    v = v.astype(np.float64)
    is_nan = np.isnan(v)
    # NaN keys are replaced by 0 in the value key (their rank comes from the NaN key). Sort
    # comparisons already treat -0.0 == +0.0; adding +0.0 also makes the keys identical bits,
    # so no backend translating this line can get the zeros wrong.
    neg = -np.where(is_nan, 0.0, v) + 0.0
    index = np.broadcast_to(np.arange(n, dtype=np.int64), v.shape)
    # np.lexsort: the LAST key is the primary one.
    order = np.lexsort((index, neg, ~is_nan), axis=-1)
    return np.ascontiguousarray(order[..., :k]).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- logits
def router_logits(x, weight, bias=None, dtype=np.float32) -> np.ndarray:
    """Router logits `x @ weight.T + bias`, [T, E], computed in `dtype` (float32 normative).

    x is [T, H] and weight [E, H] (torch's [out, in]); both are cast to `dtype` *before* the
    product, whatever they are stored as, because the spec fixes the router's precision, not the
    checkpoint's.
    """
    dt = _compute_dtype(dtype)
    x = _as_matrix(x, "x")
    weight = _as_matrix(weight, "router weight")
    if weight.shape[1] != x.shape[1]:
        raise RoutingError(f"router weight is {list(weight.shape)} but x has hidden size "
                           f"{x.shape[1]} (weight must be [E, H])")
    logits = x.astype(dt) @ weight.astype(dt).T
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise RoutingError(f"router bias is {list(bias.shape)}, expected [{weight.shape[0]}]")
        logits = logits + bias.astype(dt)
    return logits.astype(dt, copy=False)


# --------------------------------------------------------------------------- token choice
@dataclass
class RoutingResult:
    """What token-choice routing decided for T tokens.

    indices: [T, k] int64, best first (by the *choice* values, i.e. after bias and group masking).
    weights: [T, k], the combine weights (unbiased scores, normalized, scaled).
    scores:  [T, E], post-scoring and pre-bias (the raw logits for *_topk scoring and sparse mixer).
    kept:    [T, k] bool; False where capacity dropped the assignment (its weight is left in
             `weights`; the forward decides what a drop means, see `Capacity.drop_policy`).
    """

    indices: np.ndarray
    weights: np.ndarray
    scores: np.ndarray
    kept: np.ndarray


def _group_limit(choice: np.ndarray, spec: RoutingSpec) -> np.ndarray:
    """Group-limited selection (DeepSeek-V2/V3): keep only experts in the `topk_group` best of
    `n_group` contiguous groups. Groups are ranked with the same tie rule as experts."""
    T, E = choice.shape
    G = spec.n_group
    if G is None or spec.topk_group is None:
        raise RoutingError("group_topk needs n_group and topk_group")
    if E % G:
        raise RoutingError(f"{E} experts do not split into {G} groups")
    per = E // G
    if spec.topk_group > G:
        raise RoutingError(f"topk_group {spec.topk_group} > n_group {G}")
    if spec.top_k > spec.topk_group * per:
        # The source models would then pick masked experts; nothing real does this, so refuse.
        raise RoutingError(f"top_k {spec.top_k} exceeds the {spec.topk_group * per} experts "
                           f"in {spec.topk_group} groups of {per}")
    grouped = choice.reshape(T, G, per)
    if spec.group_score == "max":        # DeepSeek-V2 group_limited_greedy
        group_score = grouped.max(axis=-1)
    elif spec.group_score == "top2_sum":  # DeepSeek-V3 noaux_tc: sum of the two best
        if per < 2:
            raise RoutingError("top2_sum needs at least 2 experts per group")
        top2 = np.take_along_axis(grouped, topk_lowest_index(grouped, 2), axis=-1)
        group_score = top2[..., 0] + top2[..., 1]
    else:
        raise RoutingError(f"unknown group_score {spec.group_score!r}")
    best_groups = topk_lowest_index(group_score, spec.topk_group)          # [T, topk_group]
    group_keep = np.zeros((T, G), dtype=bool)
    np.put_along_axis(group_keep, best_groups, True, axis=-1)
    expert_keep = np.repeat(group_keep, per, axis=-1)                      # [T, E]
    if spec.group_mask == "neg_inf":      # V3: masked experts can never be chosen
        fill = -np.inf
    elif spec.group_mask == "zero":       # V2: masked_fill(..., 0.0) on softmax scores
        fill = 0.0
    else:
        raise RoutingError(f"unknown group_mask {spec.group_mask!r}")
    return np.where(expert_keep, choice, choice.dtype.type(fill))


def _sparse_mixer(logits: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's `sparsemixer`, inference form (no Gumbel sampling, no Heun gradient), top-2.

    Read off transformers' modeling_phimoe.py. For each of the two rounds:
      m = max over the still-eligible logits, i = its index (lower index on ties);
      factor = max(|logits|, m)    (note: clamp(min=m) with the *signed* m, on the full logits);
      masked where (m - logits) / factor > 2 * jitter_eps;
      weight = softmax over the unmasked logits, taken at i.
    In round 2 the round-1 expert is set to -inf before the max and stays masked.
    The threshold compares a *relative* gap, so jitter_eps (0.01 in Phi-3.5-MoE) keeps only
    experts whose logit is within ~2% of the best.
    """
    T, E = logits.shape
    two_eps = logits.dtype.type(2 * jitter_eps)
    abs_logits = np.abs(logits)
    eligible = logits.copy()
    indices = np.empty((T, 2), dtype=np.int64)
    weights = np.empty((T, 2), dtype=logits.dtype)
    for r in range(2):
        i = topk_lowest_index(eligible, 1)                       # [T, 1]
        m = np.take_along_axis(eligible, i, axis=-1)             # [T, 1]
        factor = np.maximum(abs_logits, m)
        with np.errstate(divide="ignore", invalid="ignore"):
            # 0/0 -> NaN compares False (not masked), exactly like torch.
            masked = (m - logits) / factor > two_eps
        gates = np.where(masked, logits.dtype.type(-np.inf), eligible)
        probs = _softmax(gates, axis=-1)
        indices[:, r] = i[:, 0]
        weights[:, r] = np.take_along_axis(probs, i, axis=-1)[:, 0]
        np.put_along_axis(eligible, i, -np.inf, axis=-1)
    return indices, weights


def _normalize(w: np.ndarray, spec: RoutingSpec) -> np.ndarray:
    if spec.normalize == "none":
        return w
    if spec.normalize == "sum":          # Mixtral, Qwen norm_topk_prob, DeepSeek-V3, ERNIE
        size = np.sum(w, axis=-1, keepdims=True)
    elif spec.normalize == "lp":         # DBRX: w / ||w||_p
        p = spec.norm_p
        if p <= 0:
            raise RoutingError("norm_p must be > 0")
        size = np.sum(np.abs(w) ** w.dtype.type(p), axis=-1, keepdims=True) \
            ** w.dtype.type(1.0 / p)
    else:
        raise RoutingError(f"unknown normalize {spec.normalize!r}")
    eps = w.dtype.type(spec.epsilon)
    if spec.epsilon_rule == "add":       # DeepSeek-V3: sum + 1e-20
        denom = size + eps
    elif spec.epsilon_rule == "clamp":   # ERNIE-4.5: clamp(sum, min=1e-12)
        denom = np.maximum(size, eps)
    else:
        raise RoutingError(f"unknown epsilon_rule {spec.epsilon_rule!r}")
    return w / denom


def capacity_mask(indices: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
    """[T, k] bool: which assignments fit in each expert's `capacity`.

    Priority is every token's 1st choice in token order, then every 2nd choice, and so on
    (GShard; for k = 1 this is Switch's cumsum over positions). An assignment is kept iff fewer
    than `capacity` assignments to the same expert come before it in that order.
    """
    T, k = indices.shape
    flat = indices.T.reshape(-1)                       # priority order: choice-major, token-minor
    order = np.argsort(flat, kind="stable")            # grouped by expert, priority kept inside
    sorted_experts = flat[order]
    starts = np.searchsorted(sorted_experts, np.arange(num_experts), side="left")
    position = np.empty_like(flat)
    position[order] = np.arange(flat.size) - starts[sorted_experts]
    return (position < capacity).reshape(k, T).T.copy()


def route(logits: np.ndarray, spec: RoutingSpec, selection_bias: np.ndarray | None = None,
          dtype=np.float32) -> RoutingResult:
    """Token-choice routing (`topk`, `group_topk`, `sparse_mixer`; any with a capacity).

    The steps, in this order (normative):
      1. cast logits [T, E] to `dtype`;
      2. scores = softmax | sigmoid of the logits; for softmax_topk / sigmoid_topk the scores are
         the logits themselves and the function is applied after selection, to the k chosen;
      3. choice = scores + selection_bias (DeepSeek-V3 e_score_correction_bias: choosing only);
      4. group_topk: mask experts outside the topk_group best groups (-inf or 0.0);
      5. indices = top-k of choice, lower index on ties, NaN first;
      6. weights = unbiased scores at indices (or softmax/sigmoid of the k selected logits);
      7. normalize (sum or Lp, epsilon added or clamped);
      8. multiply by `scale` (routed_scaling_factor);
      9. capacity: mark assignments beyond each expert's capacity as not kept.
    sparse_mixer replaces steps 2-6 by PhiMoE's two masked softmaxes (see `_sparse_mixer`).
    """
    dt = _compute_dtype(dtype)
    logits = _as_matrix(logits, "logits").astype(dt)
    T, E = logits.shape
    k = spec.top_k
    if spec.kind not in ("topk", "group_topk", "sparse_mixer"):
        raise RoutingError(f"route() handles token-choice kinds, not {spec.kind!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > E:
        raise RoutingError(f"top_k {k!r} is not in [1, {E}] experts")
    if spec.selection_bias != (selection_bias is not None):
        raise RoutingError("selection_bias must be given exactly when spec.selection_bias is set")
    if selection_bias is not None:
        selection_bias = np.asarray(selection_bias)
        if selection_bias.shape != (E,):
            raise RoutingError(f"selection bias is {list(selection_bias.shape)}, expected [{E}]")
        selection_bias = selection_bias.astype(dt)

    if spec.kind == "sparse_mixer":
        if k != 2:
            raise RoutingError("sparse_mixer is defined for top_k = 2")
        if selection_bias is not None:
            raise RoutingError("sparse_mixer has no selection bias")
        scores = logits
        indices, weights = _sparse_mixer(logits, spec.jitter_eps)
    else:
        after_selection = spec.scoring in ("softmax_topk", "sigmoid_topk")
        scores = logits if after_selection else _score(logits, spec.scoring)
        choice = scores if selection_bias is None else scores + selection_bias
        if spec.kind == "group_topk":
            choice = _group_limit(choice, spec)
        indices = topk_lowest_index(choice, k)
        weights = np.take_along_axis(scores, indices, axis=-1)
        if after_selection:
            weights = _score(weights, spec.scoring, axis=-1)

    weights = _normalize(weights, spec)
    weights = (weights * dt.type(spec.scale)).astype(dt, copy=False)
    if spec.capacity is not None:
        kept = capacity_mask(indices, E, spec.capacity.per_expert(T, E, k))
    else:
        kept = np.ones((T, k), dtype=bool)
    return RoutingResult(indices=indices, weights=weights, scores=scores, kept=kept)


# --------------------------------------------------------------------------- expert choice
def expert_choice(logits: np.ndarray, spec: RoutingSpec,
                  dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

    scores [T, E] = softmax over experts per token (or sigmoid, per spec.scoring);
    C = capacity.tokens, or ceil(factor * T / E), clipped to T;
    expert e takes the C tokens with the highest score in column e, lower token index on ties.
    Returns token_idx [E, C] int64 (best first) and weights [E, C] = the scores there, times
    spec.scale. A token may be picked by several experts or by none.
    """
    dt = _compute_dtype(dtype)
    logits = _as_matrix(logits, "logits").astype(dt)
    T, E = logits.shape
    if spec.capacity is None:
        raise RoutingError("expert_choice needs a capacity")
    if spec.scoring not in ("softmax", "sigmoid"):
        raise RoutingError(f"expert_choice scores with softmax or sigmoid, not {spec.scoring!r}")
    if spec.selection_bias or spec.normalize != "none":
        raise RoutingError("expert_choice defines no selection bias or normalization")
    scores = _score(logits, spec.scoring, axis=-1)
    C = spec.capacity.per_expert(T, E, 1, clip=True)
    by_expert = np.ascontiguousarray(scores.T)                      # [E, T]
    token_idx = topk_lowest_index(by_expert, C)                     # [E, C]
    weights = np.take_along_axis(by_expert, token_idx, axis=-1) * dt.type(spec.scale)
    return token_idx, weights.astype(dt, copy=False)


# --------------------------------------------------------------------------- soft MoE
def soft_moe_weights(logits: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Soft MoE (Puigcerver et al. 2023) dispatch and combine weights from logits [T, E*S].

    dispatch: softmax over tokens (axis 0), so each slot's input is a convex mix of tokens;
    combine:  softmax over slots (axis 1), so each token's output is a convex mix of slots.
    Slot e*S + s belongs to expert e.
    """
    dt = _compute_dtype(dtype)
    logits = _as_matrix(logits, "logits").astype(dt)
    return _softmax(logits, axis=0), _softmax(logits, axis=1)
