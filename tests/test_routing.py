"""Tests of the reference routing math (seif.routing).

Expected values are literal numbers worked out by hand or a few independent lines of arithmetic
(math.exp, plain sorting) in the test itself, never the code under test.
"""

from __future__ import annotations

import dataclasses
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seif.errors import RoutingError
from seif.manifest import Capacity, RoutingSpec
from seif.routing import (
    expert_choice,
    route,
    router_logits,
    soft_moe_weights,
    topk_lowest_index,
)

LN = np.log  # logits ln(p) give softmax(ln p) = p / sum(p): easy hand arithmetic


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def f32(rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# =========================================================================== hand-computed cases
def test_mixtral_softmax_top2_renormalized():
    r = route(f32([[1, 3, 2, 0]]), RoutingSpec(top_k=2, normalize="sum"))
    assert r.indices.tolist() == [[1, 2]]
    # e^3 / (e^3 + e^2) = sigmoid(1): the softmax denominator cancels in the renormalization.
    np.testing.assert_allclose(r.weights, [[sig(1), sig(-1)]], rtol=1e-6)
    assert r.weights.dtype == np.float32 and r.kept.all()
    np.testing.assert_allclose(r.scores.sum(), 1.0, rtol=1e-6)


def test_qwen2_softmax_no_renormalization():
    r = route(f32(LN([[1, 2, 3, 4]])), RoutingSpec(top_k=2, normalize="none"))
    assert r.indices.tolist() == [[3, 2]]
    np.testing.assert_allclose(r.weights, [[0.4, 0.3]], rtol=1e-6)


def test_deepseek_v3_sigmoid_bias_group_top2_sum_eps_scale():
    p = [0.9, 0.2, 0.6, 0.7]
    spec = RoutingSpec(kind="group_topk", top_k=2, scoring="sigmoid", selection_bias=True,
                       normalize="sum", epsilon=1e-20, epsilon_rule="add", scale=2.5,
                       n_group=2, topk_group=1, group_score="top2_sum", group_mask="neg_inf")
    logits = f32([[logit(v) for v in p]])
    # choice = p + bias = [1.4, 0.2, 0.6, 0.7]: group {0,1} sums to 1.6 > 1.3 for {2,3}, so the
    # bias flips the group (unbiased: 1.1 < 1.3); expert 3 (0.7) is masked to -inf and loses
    # to expert 1 (0.2). Weights use the unbiased scores.
    r = route(logits, spec, selection_bias=f32([0.5, 0, 0, 0]))
    assert r.indices.tolist() == [[0, 1]]
    np.testing.assert_allclose(r.weights, [[0.9 / 1.1 * 2.5, 0.2 / 1.1 * 2.5]], rtol=1e-6)
    np.testing.assert_allclose(r.scores, [p], rtol=1e-6)
    # Without the bias, group {2,3} wins.
    r0 = route(logits, spec, selection_bias=f32([0, 0, 0, 0]))
    assert r0.indices.tolist() == [[3, 2]]
    np.testing.assert_allclose(r0.weights, [[0.7 / 1.3 * 2.5, 0.6 / 1.3 * 2.5]], rtol=1e-6)


def test_deepseek_v2_softmax_group_max_zero_mask_scale():
    spec = RoutingSpec(kind="group_topk", top_k=2, scoring="softmax", scale=16.0,
                       n_group=2, topk_group=1, group_score="max", group_mask="zero")
    # scores [.4, .1, .3, .2]: group max .4 vs .3 keeps {0, 1}; plain top-2 would be [0, 2].
    r = route(f32(LN([[4, 1, 3, 2]])), spec)
    assert r.indices.tolist() == [[0, 1]]
    np.testing.assert_allclose(r.weights, [[6.4, 1.6]], rtol=1e-6)


def test_group_zero_mask_is_a_literal_zero():
    # With choice values below 0 (here raw logits), V2's masked_fill(0.0) makes the masked
    # experts *win*; the reference reproduces that literally. Masked 2 and 3 tie at 0.0.
    spec = RoutingSpec(kind="group_topk", top_k=2, scoring="softmax_topk",
                       n_group=2, topk_group=1, group_score="max", group_mask="zero")
    r = route(f32([[-1, -2, -3, -4]]), spec)
    assert r.indices.tolist() == [[2, 3]]
    np.testing.assert_allclose(r.weights, [[sig(1), sig(-1)]], rtol=1e-6)  # softmax of [-3, -4]
    neg = route(f32([[-1, -2, -3, -4]]), dataclasses.replace(spec, group_mask="neg_inf"))
    assert neg.indices.tolist() == [[0, 1]]


def test_gpt_oss_softmax_topk_with_router_bias():
    x = f32([[1, 2]])
    w = f32([[1, 0], [0, 1], [1, 1], [-1, 0]])
    logits = router_logits(x, w, f32([0, 0, -1, 5]))
    np.testing.assert_array_equal(logits, [[1, 2, 2, 4]])
    r = route(logits, RoutingSpec(top_k=2, scoring="softmax_topk", router_bias=True))
    assert r.indices.tolist() == [[3, 1]]                     # 1 and 2 tie at 2: lower index
    np.testing.assert_allclose(r.weights, [[sig(2), sig(-2)]], rtol=1e-6)
    np.testing.assert_array_equal(r.scores, logits)           # *_topk: scores are the logits


def test_llama4_sigmoid_topk():
    r = route(f32([[0.5, -1, 2, 1]]), RoutingSpec(top_k=1, scoring="sigmoid_topk",
                                                   weight_on="input"))
    assert r.indices.tolist() == [[2]]
    np.testing.assert_allclose(r.weights, [[sig(2)]], rtol=1e-6)


def test_dbrx_lp_norm():
    r = route(f32(LN([[1, 2, 3, 4]])), RoutingSpec(top_k=2, normalize="lp", norm_p=2.0))
    np.testing.assert_allclose(r.weights, [[0.8, 0.6]], rtol=1e-6)  # [.4, .3] / 0.5
    r1 = route(f32(LN([[1, 2, 3, 4]])), RoutingSpec(top_k=2, normalize="lp", norm_p=1.0))
    np.testing.assert_allclose(r1.weights, [[4 / 7, 3 / 7]], rtol=1e-6)


def test_ernie_selection_bias_and_clamp_epsilon():
    spec = RoutingSpec(top_k=2, selection_bias=True, normalize="sum", epsilon=1e-12,
                       epsilon_rule="clamp")
    # scores [.1, .2, .3, .4] + bias [.25, 0, 0, 0] -> choice [.35, .2, .3, .4] -> [3, 0].
    r = route(f32(LN([[1, 2, 3, 4]])), spec, selection_bias=f32([0.25, 0, 0, 0]))
    assert r.indices.tolist() == [[3, 0]]
    np.testing.assert_allclose(r.weights, [[0.8, 0.2]], rtol=1e-6)


@pytest.mark.parametrize("rule,eps,expected", [
    ("clamp", 0.5, [0.4 / 0.7, 0.3 / 0.7]),   # sum 0.7 > 0.5: the clamp does nothing
    ("clamp", 1.0, [0.4, 0.3]),               # sum 0.7 < 1.0: divide by 1.0
    ("add", 0.5, [0.4 / 1.2, 0.3 / 1.2]),     # always sum + eps
])
def test_epsilon_rules(rule, eps, expected):
    r = route(f32(LN([[1, 2, 3, 4]])),
              RoutingSpec(top_k=2, normalize="sum", epsilon=eps, epsilon_rule=rule))
    np.testing.assert_allclose(r.weights, [expected], rtol=1e-6)


def test_sparse_mixer_hand_cases():
    spec = RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.01)  # threshold 0.02
    # Row 0. Round 1: m = 3, factor 3, gaps [0, .0033, .67, .33] keep {0, 1}: w = sigmoid(.01).
    #        Round 2: 0 is -inf, m = 2.99, gaps [_, 0, .66, .33] keep {1} only: w = 1.
    # Row 1. Round 1: m = 2, gaps [.5, 0, .005, .0075] keep {1, 2, 3}.
    #        Round 2: m = 1.99 (expert 2), factor 1.99, gaps [.497, _, 0, .0025] keep {2, 3}.
    # Row 2 sits near the threshold: round 1 gaps [0, .03, .05, 1] keep {0};
    #        round 2: m = 1.94, gaps [_, 0, .0206, 1] keep {1} (.0206 > .02, just).
    r = route(f32([[3.0, 2.99, 1.0, 2.0], [1.0, 2.0, 1.99, 1.985], [2.0, 1.94, 1.9, 0.0]]), spec)
    assert r.indices.tolist() == [[0, 1], [1, 2], [0, 1]]
    e = math.exp
    w1 = e(2.0) / (e(2.0) + e(1.99) + e(1.985))
    np.testing.assert_allclose(r.weights, [[sig(0.01), 1.0], [w1, sig(0.005)], [1.0, 1.0]],
                               rtol=1e-5)


def test_sparse_mixer_matches_transformers_phimoe():
    """If transformers is installed, compare with its PhiMoE `sparsemixer` (inference form)."""
    torch = pytest.importorskip("torch")
    try:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer
    except ImportError:
        pytest.skip("transformers with PhiMoE not installed")
    rng = np.random.default_rng(0)
    for eps in (0.01, 0.1, 1.0):
        for scale in (0.05, 1.0, 5.0):
            logits = (rng.standard_normal((200, 8)) * scale).astype(np.float32)
            w, i = sparsemixer(torch.from_numpy(logits), jitter_eps=eps, training=False)
            r = route(logits, RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=eps))
            np.testing.assert_array_equal(r.indices, i.numpy())
            np.testing.assert_allclose(r.weights, w.numpy(), rtol=1e-6, atol=1e-7)


def test_sparse_mixer_large_eps_is_plain_softmax_then_masked_softmax():
    # With a threshold nothing reaches, round 1 is the full softmax, round 2 the softmax
    # without the first expert.
    r = route(f32(LN([[1, 2, 3, 4]])), RoutingSpec(kind="sparse_mixer", top_k=2,
                                                    jitter_eps=100.0))
    assert r.indices.tolist() == [[3, 2]]
    np.testing.assert_allclose(r.weights, [[0.4, 0.5]], rtol=1e-6)


def test_capacity_gshard_priority_top2():
    spec = RoutingSpec(top_k=2, normalize="sum", capacity=Capacity(tokens=1))
    r = route(f32([[1, 2, 3, 0], [0, 3, 2, 1], [5, 0, 0, 0]]), spec)
    # 1st choices 2, 1, 0 take every slot; every 2nd choice (1, 2, 1) then finds its expert full.
    assert r.indices.tolist() == [[2, 1], [1, 2], [0, 1]]
    assert r.kept.tolist() == [[True, False]] * 3
    np.testing.assert_allclose(r.weights[0], [sig(1), sig(-1)], rtol=1e-6)  # left in place


def test_capacity_switch_top1_factor():
    # T = 4, E = 2, factor 1.0: C = ceil(1 * 4 * 1 / 2) = 2; the first two tokens of expert 0 fit.
    spec = RoutingSpec(top_k=1, capacity=Capacity(factor=1.0))
    r = route(f32([[1, 0], [2, 0], [3, 0], [0, 1]]), spec)
    assert r.indices[:, 0].tolist() == [0, 0, 0, 1]
    assert r.kept[:, 0].tolist() == [True, True, False, True]


def test_expert_choice_hand():
    spec = RoutingSpec(kind="expert_choice", top_k=1, capacity=Capacity(factor=1.0))
    # scores rows [.25, .75], [.5, .5], [.75, .25]; C = min(3, ceil(3 / 2)) = 2.
    tok, w = expert_choice(f32([[0, LN(3)], [0, 0], [LN(3), 0]]), spec)
    assert tok.tolist() == [[2, 1], [0, 1]]
    np.testing.assert_allclose(w, [[0.75, 0.5], [0.75, 0.5]], rtol=1e-6)
    # All scores equal: each expert takes the lowest token indices.
    tok, w = expert_choice(np.zeros((3, 2), np.float32), spec)
    assert tok.tolist() == [[0, 1], [0, 1]]
    np.testing.assert_allclose(w, 0.5)
    # capacity.tokens is clipped to T.
    tok, _ = expert_choice(np.zeros((3, 2), np.float32),
                           RoutingSpec(kind="expert_choice", top_k=1,
                                       capacity=Capacity(tokens=10)))
    assert tok.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_soft_moe_weights_hand():
    d, c = soft_moe_weights(f32([[0, LN(3)], [LN(3), 0]]))
    np.testing.assert_allclose(d, [[0.25, 0.75], [0.75, 0.25]], rtol=1e-6)  # over tokens
    np.testing.assert_allclose(c, [[0.25, 0.75], [0.75, 0.25]], rtol=1e-6)  # over slots
    d, c = soft_moe_weights(f32([[0, 0], [LN(3), LN(3)]]))
    np.testing.assert_allclose(d, [[0.25, 0.25], [0.75, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(c, [[0.5, 0.5], [0.5, 0.5]], rtol=1e-6)


def test_router_logits_fp32_whatever_input_dtype():
    import ml_dtypes
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16)
    got = router_logits(x, w)
    assert got.dtype == np.float32
    want = x.astype(np.float64) @ w.astype(np.float64).T  # bf16 products are exact in fp32 too
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert router_logits(x, w, dtype=np.float64).dtype == np.float64


def test_float64_compute():
    r = route(np.log([[1.0, 2.0, 3.0, 4.0]]), RoutingSpec(top_k=2), dtype=np.float64)
    assert r.weights.dtype == np.float64
    np.testing.assert_allclose(r.weights, [[0.4, 0.3]], rtol=1e-14)


# =========================================================================== top-k rule
def test_topk_nan_first_then_values_then_lower_index():
    v = np.array([1.0, np.nan, 3.0, 3.0, -0.0, 0.0, -np.inf, np.nan])
    assert topk_lowest_index(v, 8).tolist() == [1, 7, 2, 3, 0, 4, 5, 6]


def test_topk_signed_zero_tie():
    assert topk_lowest_index(np.array([[0.0, -0.0]]), 1).tolist() == [[0]]
    assert topk_lowest_index(np.array([[-0.0, 0.0]]), 1).tolist() == [[0]]
    assert topk_lowest_index(np.array([[-1.0, 0.0, -0.0]]), 2).tolist() == [[1, 2]]


def test_topk_bfloat16_input():
    import ml_dtypes
    v = np.array([[1, 2, 2, 0]], dtype=ml_dtypes.bfloat16)
    assert topk_lowest_index(v, 2).tolist() == [[1, 2]]


# =========================================================================== errors and shapes
def test_errors():
    with pytest.raises(RoutingError):
        route(f32([[1, 2, 3]]), RoutingSpec(top_k=4))                   # top_k > E
    with pytest.raises(RoutingError):
        route(f32([1, 2, 3]), RoutingSpec(top_k=1))                     # not [T, E]
    with pytest.raises(RoutingError):
        router_logits(f32([[1, 2]]), f32([[1, 2, 3]]))                  # weight not [E, H]
    with pytest.raises(RoutingError):
        router_logits(f32([[1, 2]]), f32([[1, 2]]), bias=f32([1, 2]))   # bias not [E]
    with pytest.raises(RoutingError):
        route(f32([[1, 2]]), RoutingSpec(top_k=1, selection_bias=True))  # bias missing
    with pytest.raises(RoutingError):
        route(f32([[1, 2]]), RoutingSpec(top_k=1, selection_bias=True),
              selection_bias=f32([1, 2, 3]))
    with pytest.raises(RoutingError):
        route(f32([[1, 2, 3]]), RoutingSpec(kind="group_topk", top_k=1, n_group=2,
                                             topk_group=1))              # 3 % 2
    with pytest.raises(RoutingError):
        route(f32([[1, 2, 3, 4]]), RoutingSpec(kind="group_topk", top_k=3, n_group=2,
                                                topk_group=1))           # 3 > 1 group of 2
    with pytest.raises(RoutingError):
        route(f32([[1, 2]]), RoutingSpec(top_k=1), dtype=np.float16)
    with pytest.raises(RoutingError):
        route(f32([[1, 2]]), RoutingSpec(kind="expert_choice", top_k=1,
                                          capacity=Capacity(tokens=1)))
    with pytest.raises(RoutingError):
        topk_lowest_index(np.zeros(3), 4)


@pytest.mark.parametrize("spec", [
    RoutingSpec(top_k=2, normalize="sum"),
    RoutingSpec(kind="group_topk", top_k=2, scoring="sigmoid", n_group=2, topk_group=1,
                group_score="top2_sum"),
    RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.01),
    RoutingSpec(top_k=2, capacity=Capacity(factor=1.0)),
])
def test_zero_tokens(spec):
    r = route(np.zeros((0, 4), np.float32), spec)
    assert r.indices.shape == (0, 2) and r.weights.shape == (0, 2) and r.kept.shape == (0, 2)
    assert r.scores.shape == (0, 4)


def test_zero_tokens_expert_choice_and_soft():
    tok, w = expert_choice(np.zeros((0, 4), np.float32),
                           RoutingSpec(kind="expert_choice", top_k=1,
                                       capacity=Capacity(factor=2.0)))
    assert tok.shape == (4, 0) and w.shape == (4, 0)
    d, c = soft_moe_weights(np.zeros((0, 4), np.float32))
    assert d.shape == c.shape == (0, 4)


# =========================================================================== properties
SETTINGS = settings(max_examples=200, deadline=None)


@st.composite
def logits_and_k(draw, max_t=6, max_e=12, elements=None):
    t = draw(st.integers(1, max_t))
    e = draw(st.integers(1, max_e))
    k = draw(st.integers(1, e))
    elements = st.floats(-8, 8, width=32) if elements is None else elements
    arr = draw(hnp.arrays(np.float32, (t, e), elements=elements))
    return arr, k


def brute_topk(row, k):
    """Independent oracle: Python's sorted() with the rule spelled out as a key."""
    key = [(0 if math.isnan(v) else 1, 0.0 if math.isnan(v) else -float(v), i)
           for i, v in enumerate(row)]
    return [i for *_, i in sorted(key)[:k]]


@SETTINGS
@given(logits_and_k(elements=st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, np.nan, np.inf,
                                                          -np.inf]),
                                       st.floats(-4, 4, width=32))))
def test_topk_matches_sorted_oracle(case):
    arr, k = case
    got = topk_lowest_index(arr, k)
    assert got.dtype == np.int64 and got.shape == (arr.shape[0], k)
    for row, idx in zip(arr, got):
        assert idx.tolist() == brute_topk(row.tolist(), k)


@SETTINGS
@given(logits_and_k())
def test_distinct_in_range_and_normalized(case):
    arr, k = case
    r = route(arr, RoutingSpec(top_k=k, normalize="sum"))
    for idx in r.indices:
        assert len(set(idx.tolist())) == k
        assert all(0 <= i < arr.shape[1] for i in idx)
    np.testing.assert_allclose(r.weights.sum(axis=1), 1.0, rtol=0, atol=1e-6)


@SETTINGS
@given(st.integers(1, 16), st.data())
def test_all_equal_logits_pick_first_k(e, data):
    k = data.draw(st.integers(1, e))
    value = data.draw(st.floats(-10, 10, width=32))
    r = route(np.full((3, e), value, np.float32), RoutingSpec(top_k=k))
    assert r.indices.tolist() == [list(range(k))] * 3


@SETTINGS
@given(st.data())
def test_duplicates_of_kth_value_pick_lower_index(data):
    n = data.draw(st.integers(2, 10))
    values = data.draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n, unique=True))
    k = data.draw(st.integers(1, n))
    kth = sorted(values, reverse=True)[k - 1]
    row = list(values)
    for _ in range(data.draw(st.integers(1, 4))):
        row.insert(data.draw(st.integers(0, len(row))), kth)
    arr = np.array([row], np.float32)
    got = topk_lowest_index(arr, k)[0].tolist()
    larger = [i for i, v in enumerate(row) if v > kth]
    ties = [i for i, v in enumerate(row) if v == kth]
    assert sorted(got) == sorted(larger + ties[:k - len(larger)])
    assert got[len(larger):] == ties[:k - len(larger)]


@SETTINGS
@given(st.data())
def test_group_masking_property(data):
    n_group = data.draw(st.integers(1, 4))
    per = data.draw(st.integers(2, 4))
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * per))
    e = n_group * per
    arr = data.draw(hnp.arrays(np.float32, (5, e), elements=st.floats(-6, 6, width=32)))
    score = data.draw(st.sampled_from(["max", "top2_sum"]))
    mask = data.draw(st.sampled_from(["neg_inf", "zero"]))
    spec = RoutingSpec(kind="group_topk", top_k=k, scoring="softmax", n_group=n_group,
                       topk_group=topk_group, group_score=score, group_mask=mask)
    r = route(arr, spec)
    for row, idx in zip(r.scores, r.indices):
        grouped = np.sort(row.reshape(n_group, per), axis=1)[:, ::-1]  # float32, as routed
        gscore = grouped[:, 0] if score == "max" else grouped[:, 0] + grouped[:, 1]
        chosen = brute_topk(gscore.tolist(), topk_group)
        groups = {int(i) // per for i in idx}
        assert len(set(idx.tolist())) == k
        assert groups <= set(chosen) and len(groups) <= topk_group


@SETTINGS
@given(st.data())
def test_selection_bias_only_chooses(data):
    e = data.draw(st.integers(2, 10))
    k = data.draw(st.integers(1, e))
    arr = data.draw(hnp.arrays(np.float32, (4, e), elements=st.floats(-6, 6, width=32)))
    bias = data.draw(hnp.arrays(np.float32, (e,), elements=st.floats(-1, 1, width=32)))
    r = route(arr, RoutingSpec(top_k=k, scoring="sigmoid", selection_bias=True), bias)
    scores = 1 / (1 + np.exp(-arr.astype(np.float64)))
    np.testing.assert_allclose(r.scores, scores, rtol=1e-6)
    np.testing.assert_array_equal(r.weights, np.take_along_axis(r.scores, r.indices, 1))
    for row_choice, idx in zip(r.scores + bias, r.indices):
        assert idx.tolist() == brute_topk(row_choice.tolist(), k)


@SETTINGS
@given(logits_and_k(), st.data())
def test_nan_ranks_first(case, data):
    arr, k = case
    t, e = arr.shape
    pos = data.draw(st.integers(0, e - 1))
    arr = arr.copy()
    arr[:, pos] = np.nan
    assert (topk_lowest_index(arr, k)[:, 0] == pos).all()


@SETTINGS
@given(st.data())
def test_capacity_prefix_property(data):
    t = data.draw(st.integers(1, 12))
    e = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, e))
    c = data.draw(st.integers(1, 5))
    arr = data.draw(hnp.arrays(np.float32, (t, e), elements=st.floats(-4, 4, width=32)))
    r = route(arr, RoutingSpec(top_k=k, capacity=Capacity(tokens=c)))
    counts = np.zeros(e, int)
    want = np.zeros((t, k), bool)
    for j in range(k):             # 1st choices of all tokens, then 2nd choices, ...
        for i in range(t):
            ex = r.indices[i, j]
            want[i, j] = counts[ex] < c
            counts[ex] += want[i, j]
    np.testing.assert_array_equal(r.kept, want)
    for ex in range(e):
        assert (r.indices[r.kept] == ex).sum() <= c
