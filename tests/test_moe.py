"""Tests of the reference MoE forward (seif.moe): activations, expert FFN, whole layers.

Hand cases use experts whose output is obvious: expert e has up = (e + 1) * I and down = I with
an ungated relu, so FFN_e(x) = (e + 1) * relu(x) (relu2: ((e + 1) * relu(x))**2). Expected
values are written out from the routing weights worked by hand, never by the code under test.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

from seif.errors import RoutingError
from seif.manifest import Capacity, FFNSpec, LayerSpec, RoutingSpec, SharedExpertsSpec
from seif.moe import MoEParams, activation, ffn_forward, moe_forward, random_layer_params


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def f32(rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def scaled_experts(n: int, h: int) -> list[dict[str, np.ndarray]]:
    eye = np.eye(h, dtype=np.float32)
    return [{"up": (e + 1) * eye, "down": eye.copy()} for e in range(n)]


def layer_of(routing: RoutingSpec, e: int = 4, h: int = 2, act: str = "relu",
             shared: SharedExpertsSpec | None = None) -> LayerSpec:
    return LayerSpec(index=0, num_experts=e, hidden_size=h, routing=routing,
                     experts=FFNSpec(h, act), shared_experts=shared)


# Router for H = 2, E = 4: x = [1, 2] gives logits [1, 2, 3, -1].
ROUTER = f32([[1, 0], [0, 1], [1, 1], [-1, 0]])
X = f32([[1, 2]])


# =========================================================================== activations
def gelu(v):
    return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))


def gelu_tanh(v):
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


def silu(v):
    return v * sig(v)


UNGATED = {
    "relu": lambda u: max(u, 0.0),
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
    "relu2": lambda u: max(u, 0.0) ** 2,
}
GATED = {
    "swiglu": lambda g, u: silu(g) * u,
    "geglu": lambda g, u: gelu(g) * u,
    "geglu_tanh": lambda g, u: gelu_tanh(g) * u,
    "swiglu_oai": lambda g, u: (min(max(u, -7), 7) + 1) * min(g, 7) * sig(1.702 * min(g, 7)),
}
POINTS = [-9.0, -3.0, -2.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0, 8.0, 10.0]


@pytest.mark.parametrize("name", sorted(UNGATED))
def test_ungated_activations(name):
    got = activation(name, None, f32(POINTS))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [UNGATED[name](v) for v in POINTS], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(GATED))
def test_gated_activations(name):
    g = f32([[a] * len(POINTS) for a in POINTS])
    u = f32([POINTS] * len(POINTS))
    want = [[GATED[name](a, b) for b in POINTS] for a in POINTS]
    np.testing.assert_allclose(activation(name, g, u), want, rtol=1e-6, atol=1e-6)


def test_activation_literals():
    one = f32([1.0])
    np.testing.assert_allclose(activation("silu", None, one), [0.7310585786], rtol=1e-7)
    np.testing.assert_allclose(activation("gelu", None, one), [0.8413447461], rtol=1e-7)
    np.testing.assert_allclose(activation("gelu_tanh", None, one), [0.8411919906], rtol=1e-7)
    np.testing.assert_allclose(activation("relu2", None, f32([-1, 3])), [0, 9])
    # gpt-oss clamps: gate 10 -> 7, up 8 -> 7: (7 + 1) * 7 * sigmoid(11.914).
    np.testing.assert_allclose(activation("swiglu_oai", f32([10]), f32([8])),
                               [56 * sig(11.914)], rtol=1e-6)
    # No lower clamp on the gate; up clamps to -7: (-6) * (-3) * sigmoid(-5.106).
    np.testing.assert_allclose(activation("swiglu_oai", f32([-3]), f32([-9])),
                               [18 * sig(-5.106)], rtol=1e-6)
    np.testing.assert_allclose(activation("swiglu_oai", f32([3]), f32([3]), alpha=1.0, limit=2.0),
                               [3 * 2 * sig(2)], rtol=1e-6)


def test_activation_errors():
    with pytest.raises(RoutingError):
        activation("swiglu", None, f32([1]))
    with pytest.raises(RoutingError):
        activation("relu", f32([1]), f32([1]))
    with pytest.raises(RoutingError):
        activation("mish", None, f32([1]))


# =========================================================================== one expert
def test_ffn_forward_swiglu_with_biases():
    w = {"gate": f32([[1, 0], [0, 1]]), "gate_bias": f32([0, 1]),
         "up": f32([[1, 1], [0, 2]]), "up_bias": f32([1, 0]),
         "down": f32([[1, 0], [1, 1]]), "down_bias": f32([0.5, 0])}
    # gate = [1, 0], up = [1, -2], h = [silu(1) * 1, silu(0) * -2 = 0].
    y = ffn_forward(f32([[1, -1]]), FFNSpec(2, "swiglu", bias=True), w)
    np.testing.assert_allclose(y, [[silu(1) + 0.5, silu(1)]], rtol=1e-6)


def test_ffn_forward_rectangular_ungated():
    w = {"up": f32([[1, 0], [0, 1], [1, 1]]), "down": f32([[1, 1, 1]])}
    y = ffn_forward(f32([[2, -3]]), FFNSpec(3, "relu"), w)   # relu([2, -3, -1]) summed
    np.testing.assert_allclose(y, [[2.0]])


# =========================================================================== token choice
def test_mixtral_top2_forward():
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"))
    p = MoEParams(router_weight=ROUTER, experts=scaled_experts(4, 2))
    # top-2 of [1, 2, 3, -1] is [2, 1], weights sigmoid(1), sigmoid(-1); FFN_e(x) = (e+1) x.
    want = (3 * sig(1) + 2 * sig(-1)) * X
    np.testing.assert_allclose(moe_forward(X, layer, p), want, rtol=1e-6)


def test_llama4_weight_on_input_with_shared_expert():
    shared = SharedExpertsSpec(1, FFNSpec(2, "relu"))
    spec = RoutingSpec(top_k=1, scoring="sigmoid_topk", weight_on="input")
    layer = layer_of(spec, act="relu2", shared=shared)
    p = MoEParams(router_weight=ROUTER, experts=scaled_experts(4, 2),
                  shared=scaled_experts(1, 2))
    w = sig(3)  # expert 2, logit 3
    # relu2 expert: FFN_2(w x) = (3 w x)^2, which differs from w * FFN_2(x) = w (3 x)^2.
    want = 9 * w**2 * X**2 + X
    np.testing.assert_allclose(moe_forward(X, layer, p), want, rtol=1e-6)
    on_output = moe_forward(X, dataclasses.replace(
        layer, routing=dataclasses.replace(spec, weight_on="output")), p)
    np.testing.assert_allclose(on_output, 9 * w * X**2 + X, rtol=1e-6)


@pytest.mark.parametrize("policy", ["zero", "passthrough_scaled"])
def test_capacity_drops(policy):
    spec = RoutingSpec(top_k=1, capacity=Capacity(tokens=2, drop_policy=policy))
    layer = layer_of(spec, e=2)
    p = MoEParams(router_weight=f32([[1, 0], [0, 0]]), experts=scaled_experts(2, 2))
    x = f32([[1, 1], [2, 1], [3, 1], [-1, 1]])
    # logits [x0, 0]: experts 0, 0, 0, 1; expert 0 holds 2 tokens, so token 2 is dropped.
    dropped = [0, 0] if policy == "zero" else [sig(3) * 3, sig(3) * 1]
    want = [[sig(1) * 1, sig(1) * 1],
            [sig(2) * 2, sig(2) * 1],
            dropped,
            [0, sig(1) * 2 * 1]]                       # expert 1 doubles, relu(-1) = 0
    np.testing.assert_allclose(moe_forward(x, layer, p), want, rtol=1e-6)


def test_sparse_mixer_forward():
    layer = layer_of(RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.01), h=4)
    p = MoEParams(router_weight=np.eye(4, dtype=np.float32), experts=scaled_experts(4, 4))
    x = f32([[3.0, 2.99, 1.0, 2.0]])
    # experts [0, 1] with weights [sigmoid(0.01), 1] (see test_routing's hand case).
    np.testing.assert_allclose(moe_forward(x, layer, p), (sig(0.01) * 1 + 1.0 * 2) * x,
                               rtol=1e-6)


def test_shared_experts_with_gate_qwen2():
    shared = SharedExpertsSpec(2, FFNSpec(2, "relu"), gate=True)
    layer = layer_of(RoutingSpec(top_k=1), shared=shared)
    p = MoEParams(router_weight=ROUTER, experts=scaled_experts(4, 2),
                  shared=scaled_experts(2, 2), shared_gate=f32([[1, -1]]))
    e = math.exp
    w = e(3) / (e(1) + e(2) + e(3) + e(-1))   # softmax prob of expert 2, not renormalized
    # shared sum = 1 x + 2 x, gated by sigmoid(1 - 2).
    want = w * 3 * X + sig(-1) * 3 * X
    np.testing.assert_allclose(moe_forward(X, layer, p), want, rtol=1e-6)


def test_deepseek_v3_forward():
    spec = RoutingSpec(kind="group_topk", top_k=2, scoring="sigmoid", selection_bias=True,
                       normalize="sum", epsilon=1e-20, scale=2.5, n_group=2, topk_group=1,
                       group_score="top2_sum")
    layer = layer_of(spec, h=4, shared=SharedExpertsSpec(1, FFNSpec(4, "relu")))
    pr = [0.9, 0.2, 0.6, 0.7]
    x = f32([[math.log(v / (1 - v)) for v in pr]])   # router = I: logits = x, scores = pr
    p = MoEParams(router_weight=np.eye(4, dtype=np.float32), experts=scaled_experts(4, 4),
                  selection_bias=f32([0.5, 0, 0, 0]), shared=scaled_experts(1, 4))
    # As in test_routing: experts [0, 1], weights 2.5 * [0.9, 0.2] / 1.1.
    relu_x = np.maximum(x, 0)
    want = 2.5 * (0.9 * 1 + 0.2 * 2) / 1.1 * relu_x + relu_x
    np.testing.assert_allclose(moe_forward(x, layer, p), want, rtol=1e-6)


# =========================================================================== other kinds
def test_expert_choice_forward():
    spec = RoutingSpec(kind="expert_choice", top_k=1, capacity=Capacity(factor=1.0))
    layer = layer_of(spec, e=2, h=3)
    ln3 = math.log(3)
    x = f32([[0, ln3, 1], [0, 0, 1], [ln3, 0, 1]])
    p = MoEParams(router_weight=f32([[1, 0, 0], [0, 1, 0]]), experts=scaled_experts(2, 3))
    # scores [.25,.75], [.5,.5], [.75,.25]; C = 2: expert 0 takes tokens 2 (.75), 1 (.5);
    # expert 1 takes tokens 0 (.75), 1 (.5).
    want = [[0.75 * 2 * v for v in (0, ln3, 1)],
            [0, 0, 0.5 * 1 + 0.5 * 2],
            [0.75 * v for v in (ln3, 0, 1)]]
    np.testing.assert_allclose(moe_forward(x, layer, p), want, rtol=1e-6)


def test_soft_moe_forward():
    layer = layer_of(RoutingSpec(kind="soft_moe", top_k=1, slots_per_expert=1), e=2)
    ln3 = math.log(3)
    x = f32([[0, ln3], [ln3, 0]])
    p = MoEParams(router_weight=np.eye(2, dtype=np.float32), experts=scaled_experts(2, 2))
    # dispatch = combine = [[.25, .75], [.75, .25]] (test_routing); slot 1 goes to expert 1 (x2).
    slot0 = [0.25 * 0 + 0.75 * ln3, 0.25 * ln3 + 0.75 * 0]
    slot1 = [0.75 * 0 + 0.25 * ln3, 0.75 * ln3 + 0.25 * 0]
    out0, out1 = slot0, [2 * v for v in slot1]
    want = [[0.25 * a + 0.75 * b for a, b in zip(out0, out1)],
            [0.75 * a + 0.25 * b for a, b in zip(out0, out1)]]
    np.testing.assert_allclose(moe_forward(x, layer, p), want, rtol=1e-6)


# =========================================================================== construction
def full_layer(kind: str = "topk") -> LayerSpec:
    routing = {
        "topk": RoutingSpec(top_k=2, normalize="sum", router_bias=True, selection_bias=True),
        "group_topk": RoutingSpec(kind="group_topk", top_k=2, scoring="sigmoid", n_group=2,
                                  topk_group=1, group_score="top2_sum"),
        "sparse_mixer": RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.01),
        "capacity": RoutingSpec(top_k=2, capacity=Capacity(factor=1.0)),
        "expert_choice": RoutingSpec(kind="expert_choice", top_k=1,
                                     capacity=Capacity(factor=2.0)),
        "soft_moe": RoutingSpec(kind="soft_moe", top_k=1, slots_per_expert=2),
    }[kind]
    return LayerSpec(index=3, num_experts=4, hidden_size=8, routing=routing,
                     experts=FFNSpec(6, "swiglu_oai", bias=True),
                     shared_experts=SharedExpertsSpec(2, FFNSpec(5, "geglu"), gate=True))


def test_from_tensors_uses_canonical_names():
    layer = full_layer()
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in layer.expected_tensors().items()}
    fetched = []

    def get(name):
        fetched.append(name)
        return tensors[name]

    p = MoEParams.from_tensors(layer, get)
    assert sorted(fetched) == sorted(tensors)
    assert p.router_weight is tensors["layers.3.router.weight"]
    assert p.router_bias is tensors["layers.3.router.bias"]
    assert p.selection_bias is tensors["layers.3.router.selection_bias"]
    assert p.experts[2]["up_bias"] is tensors["layers.3.experts.2.up.bias"]
    assert p.experts[1]["gate"] is tensors["layers.3.experts.1.gate.weight"]
    assert p.shared[1]["down"] is tensors["layers.3.shared_experts.1.down.weight"]
    assert p.shared_gate is tensors["layers.3.shared_experts.gate.weight"]
    assert moe_forward(rng.standard_normal((5, 8)), layer, p).shape == (5, 8)


@pytest.mark.parametrize("kind", ["topk", "group_topk", "sparse_mixer", "capacity",
                                  "expert_choice", "soft_moe"])
def test_every_kind_runs_and_zero_tokens(kind):
    layer = full_layer(kind)
    p = random_layer_params(layer, np.random.default_rng(1))
    assert set(p.experts[0]) == {"gate", "up", "down", "gate_bias", "up_bias", "down_bias"}
    y = moe_forward(np.random.default_rng(2).standard_normal((7, 8)), layer, p)
    assert y.shape == (7, 8) and y.dtype == np.float32 and np.isfinite(y).all()
    empty = moe_forward(np.zeros((0, 8), np.float32), layer, p)
    assert empty.shape == (0, 8) and empty.dtype == np.float32


def test_bfloat16_weights_compute_in_fp32():
    layer = full_layer()
    p16 = random_layer_params(layer, np.random.default_rng(3), dtype=ml_dtypes.bfloat16)
    assert p16.router_weight.dtype == ml_dtypes.bfloat16
    up = {f.name: getattr(p16, f.name) for f in dataclasses.fields(p16)}
    p32 = MoEParams(
        router_weight=up["router_weight"].astype(np.float32),
        router_bias=up["router_bias"].astype(np.float32),
        selection_bias=up["selection_bias"].astype(np.float32),
        experts=[{k: v.astype(np.float32) for k, v in d.items()} for d in p16.experts],
        shared=[{k: v.astype(np.float32) for k, v in d.items()} for d in p16.shared],
        shared_gate=up["shared_gate"].astype(np.float32))
    x = np.random.default_rng(4).standard_normal((6, 8)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(moe_forward(x, layer, p16),
                                  moe_forward(x.astype(np.float32), layer, p32))


def test_output_bias_jetmoe_hand_case():
    """§5.16: softmax over the top-2 logits (JetMoE), a gated shared expert, then the bias on
    every token, a dropped one included."""
    shared = SharedExpertsSpec(1, FFNSpec(2, "relu"), gate=True)
    spec = RoutingSpec(top_k=2, scoring="softmax_topk", capacity=Capacity(tokens=1))
    layer = dataclasses.replace(layer_of(spec, shared=shared), output_bias=True)
    bias = f32([0.5, -2.0])
    p = MoEParams(router_weight=ROUTER, experts=scaled_experts(4, 2),
                  shared=scaled_experts(1, 2), shared_gate=f32([[1, -1]]), output_bias=bias)
    x = f32([[1, 2], [1, 2]])
    # token 0: experts 2, 1 (logits 3, 2) with weights softmax([3, 2]); token 1 picks the same
    # experts and is dropped from both (capacity 1); shared = sigmoid(1 - 2) * x for both.
    w2, w1 = sig(1), sig(-1)
    routed0 = (w2 * 3 + w1 * 2) * X[0]
    shared = sig(-1) * X[0]
    want = [routed0 + shared + bias, shared + bias]
    np.testing.assert_allclose(moe_forward(x, layer, p), want, rtol=1e-6)
    assert moe_forward(x[:0], layer, p).shape == (0, 2)


def test_output_bias_errors():
    layer = dataclasses.replace(layer_of(RoutingSpec(top_k=2)), output_bias=True)
    good = MoEParams(router_weight=ROUTER, experts=scaled_experts(4, 2),
                     output_bias=f32([1, 2]))
    with pytest.raises(RoutingError):   # bias [H + 1]
        moe_forward(X, layer, dataclasses.replace(good, output_bias=f32([1, 2, 3])))
    with pytest.raises(RoutingError):   # declared, not given
        moe_forward(X, layer, dataclasses.replace(good, output_bias=None))
    with pytest.raises(RoutingError):   # given, not declared
        moe_forward(X, dataclasses.replace(layer, output_bias=False), good)


def test_output_bias_round_trips_canonical_names():
    layer = dataclasses.replace(layer_of(RoutingSpec(top_k=2), act="swiglu"), output_bias=True)
    p = random_layer_params(layer, np.random.default_rng(3))
    tensors = p.to_tensors(layer)
    assert tensors["layers.0.output_bias"].shape == (2,)
    assert set(tensors) == set(layer.expected_tensors())
    back = MoEParams.from_tensors(layer, tensors.__getitem__)
    np.testing.assert_array_equal(back.output_bias, p.output_bias)


def test_shape_errors():
    layer = layer_of(RoutingSpec(top_k=2))
    good = MoEParams(router_weight=ROUTER, experts=scaled_experts(4, 2))
    with pytest.raises(RoutingError):   # router [E, H] transposed
        moe_forward(X, layer, dataclasses.replace(good, router_weight=ROUTER.T.copy()))
    with pytest.raises(RoutingError):   # x of the wrong hidden size
        moe_forward(f32([[1, 2, 3]]), layer, good)
    with pytest.raises(RoutingError):   # one expert missing
        moe_forward(X, layer, dataclasses.replace(good, experts=scaled_experts(3, 2)))
    with pytest.raises(RoutingError):   # top_k > E
        moe_forward(X, layer_of(RoutingSpec(top_k=5)), good)
    with pytest.raises(RoutingError):   # router bias not declared
        moe_forward(X, layer, dataclasses.replace(good, router_bias=f32([0, 0, 0, 0])))
    with pytest.raises(RoutingError):   # expert lacks a projection
        moe_forward(X, layer, dataclasses.replace(good, experts=[{"up": np.eye(2)}] * 4))


# =========================================================================== torch cross-check
def test_mixtral_like_matches_independent_torch():
    torch = pytest.importorskip("torch")
    layer = LayerSpec(index=0, num_experts=8, hidden_size=16,
                      routing=RoutingSpec(top_k=2, normalize="sum"),
                      experts=FFNSpec(32, "swiglu"))
    rng = np.random.default_rng(5)
    p = random_layer_params(layer, rng)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    got = moe_forward(x, layer, p)

    t = torch.from_numpy
    xt = t(x)
    probs = torch.softmax(xt @ t(p.router_weight).T, dim=-1)
    top_w, top_i = torch.topk(probs, 2, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    want = torch.zeros_like(xt)
    for tok in range(xt.shape[0]):
        for j in range(2):
            w = p.experts[int(top_i[tok, j])]
            h = torch.nn.functional.silu(xt[tok] @ t(w["gate"]).T) * (xt[tok] @ t(w["up"]).T)
            want[tok] += top_w[tok, j] * (h @ t(w["down"]).T)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
