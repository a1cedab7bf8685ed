"""The native ai.seif kernels (runtime/build/libseif_ort.so) against the NumPy reference.

Each test builds a one-node ONNX model by hand (SeifRouter or SeifMoE, domain ai.seif, weights as
initializers, no function body: the registered library supplies the kernel), runs it in ONNX
Runtime and compares with seif.routing.route / seif.moe.moe_forward. fp32 tolerance: 1e-5.

The library is built by `make native` (runtime/build_library.sh), never by these tests; they skip
when it is missing. CUDA tests need onnxruntime-gpu with a visible CUDA device and a library
built with SEIF_WITH_CUDA=ON; they skip otherwise.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from seif.manifest import Capacity, FFNSpec, LayerSpec, RoutingSpec, SharedExpertsSpec
from seif.moe import MoEParams, moe_forward, random_layer_params
from seif.routing import route

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _find_library() -> Path | None:
    env = os.environ.get("SEIF_ORT_LIBRARY")
    candidates = [Path(env)] if env else []
    candidates += [ROOT / "runtime" / "libseif_ort.so",     # runtime/library.py's order
                   ROOT / "runtime" / "build" / "libseif_ort.so"]
    return next((p for p in candidates if p.is_file()), None)


LIB = _find_library()
if LIB is None:
    pytest.skip("libseif_ort.so is not built (run `make native`)", allow_module_level=True)


def build_info() -> dict[str, str]:
    dll = ctypes.CDLL(str(LIB))
    dll.SeifOrtBuildInfo.restype = ctypes.c_char_p
    return dict(kv.split("=", 1) for kv in dll.SeifOrtBuildInfo().decode().split(";"))


INFO = build_info()
HAS_CUDA = ("CUDAExecutionProvider" in INFO["providers"]
            and "CUDAExecutionProvider" in ort.get_available_providers())
F32 = TensorProto.FLOAT
ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
             "bfloat16": TensorProto.BFLOAT16}
NP_TYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# =========================================================================== model building
def routing_attrs(r: RoutingSpec) -> dict:
    a = dict(kind=r.kind, top_k=r.top_k, scoring=r.scoring, normalize=r.normalize,
             norm_p=float(r.norm_p), epsilon=float(r.epsilon), epsilon_rule=r.epsilon_rule,
             scale=float(r.scale), group_score=r.group_score, group_mask=r.group_mask,
             jitter_eps=float(r.jitter_eps))
    if r.n_group is not None:
        a.update(n_group=r.n_group, topk_group=r.topk_group)
    if r.capacity is not None:
        if r.capacity.tokens is not None:
            a["capacity_tokens"] = r.capacity.tokens
        else:
            a["capacity_factor"] = float(r.capacity.factor)
    return a


def moe_attrs(layer: LayerSpec) -> dict:
    a = routing_attrs(layer.routing)
    ffn = layer.experts
    a.update(activation=ffn.activation, alpha=float(ffn.alpha), limit=float(ffn.limit),
             weight_on=layer.routing.weight_on,
             drop_policy=layer.routing.capacity.drop_policy if layer.routing.capacity else "zero")
    if layer.routing.slots_per_expert is not None:
        a["slots_per_expert"] = layer.routing.slots_per_expert
    return a


def make_model(node, inputs, outputs, initializers=(), functions=()):
    graph = helper.make_graph([node] if not isinstance(node, list) else node, "g", inputs,
                              outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("ai.seif", 1)],
                              functions=list(functions))
    model.ir_version = 10
    return model


def session(model, provider="CPUExecutionProvider", library=True, threads=0):
    so = ort.SessionOptions()
    if library:
        so.register_custom_ops_library(str(LIB))
    if threads:
        so.intra_op_num_threads = threads
    if provider != "CPUExecutionProvider":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider"
                              else [])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    assert sess.get_providers()[0] == provider
    return sess


def router_model(spec: RoutingSpec, E: int, dtype="float32", bias=False):
    """logits (float32) -> [Cast to dtype] -> SeifRouter -> indices, weights, kept."""
    nodes, src = [], "logits"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", ["logits"], ["z"], to=ONNX_TYPE[dtype]))
        src = "z"
    ins = [src, "selection_bias"] if bias else [src]
    nodes.append(helper.make_node("SeifRouter", ins, ["indices", "weights", "kept"],
                                  domain="ai.seif", **routing_attrs(spec)))
    inputs = [helper.make_tensor_value_info("logits", F32, ["T", E])]
    if bias:
        inputs.append(helper.make_tensor_value_info("selection_bias", F32, [E]))
    outputs = [helper.make_tensor_value_info("indices", TensorProto.INT64, ["T", spec.top_k]),
               helper.make_tensor_value_info("weights", F32, ["T", spec.top_k]),
               helper.make_tensor_value_info("kept", TensorProto.BOOL, ["T", spec.top_k])]
    return make_model(nodes, inputs, outputs)


def run_router(spec, logits, bias=None, dtype="float32", provider="CPUExecutionProvider"):
    E = logits.shape[1]
    sess = session(router_model(spec, E, dtype, bias is not None), provider)
    feeds = {"logits": np.ascontiguousarray(logits, dtype=np.float32)}
    if bias is not None:
        feeds["selection_bias"] = bias.astype(np.float32)
    return sess.run(None, feeds)


MOE_INPUTS = ["hidden_states", "router_weight", "router_bias", "selection_bias", "gate_proj",
              "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias", "shared_gate_proj",
              "shared_up_proj", "shared_down_proj", "shared_gate_bias", "shared_up_bias",
              "shared_down_bias", "shared_expert_gate"]


def moe_tensors(layer: LayerSpec, p: MoEParams) -> dict[str, np.ndarray]:
    """MoEParams as the SeifMoE inputs (experts stacked [E, out, in])."""
    t = {"router_weight": p.router_weight, "router_bias": p.router_bias,
         "selection_bias": p.selection_bias, "shared_expert_gate": p.shared_gate}

    def stack(dicts, key):
        return np.stack([d[key] for d in dicts]) if dicts and key in dicts[0] else None

    for proj in ("gate", "up", "down"):
        t[f"{proj}_proj"] = stack(p.experts, proj)
        t[f"{proj}_bias"] = stack(p.experts, f"{proj}_bias")
        t[f"shared_{proj}_proj"] = stack(p.shared, proj)
        t[f"shared_{proj}_bias"] = stack(p.shared, f"{proj}_bias")
    return {k: v for k, v in t.items() if v is not None}


def moe_model(layer: LayerSpec, p: MoEParams, dtype="float32", wdtype="float32"):
    """hidden_states float32 [T, H] -> [Cast] -> SeifMoE (weights in wdtype) -> [Cast] -> output."""
    tensors = moe_tensors(layer, p)
    inits = [numpy_helper.from_array(np.asarray(v).astype(NP_TYPE[wdtype]), k)
             for k, v in tensors.items()]
    nodes, src, dst = [], "hidden_states", "output"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", ["hidden_states"], ["x"], to=ONNX_TYPE[dtype]))
        src, dst = "x", "y"
    names = [src] + [n if n in tensors else "" for n in MOE_INPUTS[1:]]
    while names[-1] == "":
        names.pop()
    nodes.append(helper.make_node("SeifMoE", names, [dst], domain="ai.seif",
                                  **moe_attrs(layer)))
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", ["y"], ["output"], to=F32))
    H = layer.hidden_size
    return make_model(nodes, [helper.make_tensor_value_info("hidden_states", F32, ["T", H])],
                      [helper.make_tensor_value_info("output", F32, ["T", H])], inits)


def run_moe(layer, p, x, dtype="float32", wdtype="float32", provider="CPUExecutionProvider",
            threads=0):
    sess = session(moe_model(layer, p, dtype, wdtype), provider, threads=threads)
    return sess.run(None, {"hidden_states": np.ascontiguousarray(x, dtype=np.float32)})[0]


def layer_of(routing: RoutingSpec, E=8, H=16, I=24, act="swiglu", bias=False, shared=None):
    return LayerSpec(index=0, num_experts=E, hidden_size=H, routing=routing,
                     experts=FFNSpec(I, act, bias=bias), shared_experts=shared)


def check_route(spec, logits, bias=None, dtype="float32", provider="CPUExecutionProvider"):
    idx, w, kept = run_router(spec, logits, bias, dtype, provider)
    ref_in = logits.astype(NP_TYPE[dtype]).astype(np.float32)
    ref = route(ref_in, spec, bias)
    np.testing.assert_array_equal(idx, ref.indices)
    np.testing.assert_allclose(w, ref.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kept, ref.kept)
    return idx, w, kept


def check_moe(layer, p, x, dtype="float32", provider="CPUExecutionProvider", tol=1e-5):
    y = run_moe(layer, p, x, dtype, provider=provider)
    ref = moe_forward(x.astype(NP_TYPE[dtype]).astype(np.float32), layer, p)
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
    return y


def rng(seed=0):
    return np.random.default_rng(seed)


# =========================================================================== build / registration
def test_library_registers_cpu_provider_and_ops():
    assert INFO["domain"] == "ai.seif"
    assert set(INFO["ops"].split(",")) == {"SeifRouter", "SeifMoE"}
    providers = INFO["providers"].split(",")
    assert "CPUExecutionProvider" in providers
    if os.environ.get("SEIF_EXPECT_CUDA") == "1":
        assert "CUDAExecutionProvider" in providers, INFO
        assert set(INFO["cuda_archs"].split(",")) >= {"sm_80", "sm_90"}


# =========================================================================== SeifRouter
ROUTER_SPECS = {
    "topk_softmax": RoutingSpec(top_k=2),
    "topk_softmax_sum": RoutingSpec(top_k=2, normalize="sum"),
    "topk_sigmoid_bias": RoutingSpec(top_k=3, scoring="sigmoid", selection_bias=True,
                                     normalize="sum", epsilon=1e-20, scale=2.5),
    "softmax_topk": RoutingSpec(top_k=4, scoring="softmax_topk"),
    "sigmoid_topk": RoutingSpec(top_k=1, scoring="sigmoid_topk"),
    "lp": RoutingSpec(top_k=3, normalize="lp", norm_p=2.0),
    "clamp": RoutingSpec(top_k=2, scoring="sigmoid", normalize="sum", epsilon=0.5,
                         epsilon_rule="clamp"),
    "group_max_neginf": RoutingSpec(kind="group_topk", top_k=2, n_group=4, topk_group=2),
    "group_top2_zero_bias": RoutingSpec(kind="group_topk", top_k=4, scoring="sigmoid",
                                        selection_bias=True, normalize="sum", epsilon=1e-20,
                                        scale=2.5, n_group=4, topk_group=2,
                                        group_score="top2_sum", group_mask="zero"),
    "sparse_mixer": RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.01),
    "sparse_mixer_wide": RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.5),
    "capacity_tokens": RoutingSpec(top_k=2, normalize="sum", capacity=Capacity(tokens=3)),
    "capacity_factor": RoutingSpec(top_k=2, capacity=Capacity(factor=1.25)),
}


@pytest.mark.parametrize("name", sorted(ROUTER_SPECS))
def test_router_matches_reference(name):
    spec = ROUTER_SPECS[name]
    E = 16
    logits = rng(1).standard_normal((37, E)).astype(np.float32)
    bias = (0.1 * rng(2).standard_normal(E)).astype(np.float32) if spec.selection_bias else None
    _, _, kept = check_route(spec, logits, bias)
    if spec.capacity is not None:
        assert not kept.all()  # the case really drops something


@pytest.mark.parametrize("T", [0, 1, 4096])
def test_router_token_counts(T):
    spec = RoutingSpec(kind="group_topk", top_k=8, scoring="sigmoid", selection_bias=True,
                       normalize="sum", epsilon=1e-20, scale=2.5, n_group=8, topk_group=4,
                       group_score="top2_sum")
    logits = rng(3).standard_normal((T, 64)).astype(np.float32)
    idx, w, kept = check_route(spec, logits, (0.1 * rng(4).standard_normal(64)).astype(np.float32))
    assert idx.shape == w.shape == kept.shape == (T, 8)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax_topk"])
def test_router_ties_go_to_lower_index(scoring):
    spec = RoutingSpec(top_k=3, scoring=scoring)
    logits = np.zeros((4, 8), np.float32)
    logits[1] = 1.5
    logits[2] = [1, 2, 2, 1, 2, 0, 0, 2]       # ties at the k-th place
    logits[3] = [-0.0, 0.0, -0.0, 0.0, -1, -1, -1, -1]   # -0.0 == +0.0
    idx, _, _ = check_route(spec, logits)
    np.testing.assert_array_equal(idx[0], [0, 1, 2])
    np.testing.assert_array_equal(idx[1], [0, 1, 2])
    np.testing.assert_array_equal(idx[2], [1, 2, 4])
    np.testing.assert_array_equal(idx[3], [0, 1, 2])


def test_router_group_ties_go_to_lower_group():
    spec = RoutingSpec(kind="group_topk", top_k=2, n_group=4, topk_group=2)
    idx, _, _ = check_route(spec, np.zeros((3, 16), np.float32))
    np.testing.assert_array_equal(idx, [[0, 1]] * 3)


@pytest.mark.parametrize("name", ["topk_softmax_sum", "topk_sigmoid_bias", "group_max_neginf",
                                  "sparse_mixer", "softmax_topk", "capacity_tokens"])
def test_router_nan_and_inf_rows(name):
    spec = ROUTER_SPECS[name]
    E = 16
    logits = rng(5).standard_normal((8, E)).astype(np.float32)
    logits[0, 5] = np.nan                # one NaN ranks first
    logits[1] = np.nan                   # all NaN: experts 0..k-1
    logits[2, 3] = np.inf
    logits[3, :] = -np.inf
    logits[4, 7] = -np.inf
    logits[5, [2, 9]] = np.nan
    bias = (0.1 * rng(6).standard_normal(E)).astype(np.float32) if spec.selection_bias else None
    idx, _, _ = check_route(spec, logits, bias)
    if spec.kind != "group_topk" and spec.scoring != "softmax":   # softmax spreads the NaN
        assert idx[0, 0] == 5
    np.testing.assert_array_equal(idx[1], np.arange(spec.top_k))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["topk_softmax_sum", "group_top2_zero_bias", "sparse_mixer"])
def test_router_half_inputs(dtype, name):
    spec = ROUTER_SPECS[name]
    logits = rng(7).standard_normal((64, 16)).astype(np.float32)
    bias = (0.1 * rng(8).standard_normal(16)).astype(np.float32) if spec.selection_bias else None
    check_route(spec, logits, bias, dtype)


def test_router_all_equal_bf16_logits():
    # bf16 logits tie often; the kernel must pick the lower index like the reference.
    logits = np.round(rng(9).standard_normal((256, 32)) * 2).astype(np.float32)
    check_route(RoutingSpec(top_k=4, normalize="sum"), logits, dtype="bfloat16")


def test_router_bad_attribute_fails_at_session_creation():
    model = router_model(RoutingSpec(top_k=2), 8)
    model.graph.node[0].attribute.append(helper.make_attribute("normalize", "l2"))
    del model.graph.node[0].attribute[[a.name for a in model.graph.node[0].attribute]
                                      .index("normalize")]
    with pytest.raises(Exception, match="normalize 'l2'"):
        session(model)


def test_router_top_k_larger_than_experts_fails():
    sess = session(router_model(RoutingSpec(top_k=4), 3))
    with pytest.raises(Exception, match="top_k"):
        sess.run(None, {"logits": np.zeros((2, 3), np.float32)})


# =========================================================================== SeifMoE
ACTIVATIONS = ["swiglu", "geglu", "geglu_tanh", "swiglu_oai", "relu", "gelu", "gelu_tanh",
               "silu", "relu2"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_moe_every_activation(act, bias):
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), act=act, bias=bias)
    p = random_layer_params(layer, rng(10))
    x = 2 * rng(11).standard_normal((29, 16)).astype(np.float32)
    check_moe(layer, p, x)


MOE_ROUTINGS = {
    "topk": RoutingSpec(top_k=2, normalize="sum", router_bias=True),
    "topk_sigmoid_input": RoutingSpec(top_k=1, scoring="sigmoid_topk", weight_on="input"),
    "softmax_topk": RoutingSpec(top_k=4, scoring="softmax_topk"),
    "group_topk": RoutingSpec(kind="group_topk", top_k=2, scoring="sigmoid",
                              selection_bias=True, normalize="sum", epsilon=1e-20, scale=2.5,
                              n_group=4, topk_group=2, group_score="top2_sum"),
    "group_topk_v2": RoutingSpec(kind="group_topk", top_k=3, n_group=4, topk_group=2,
                                 group_mask="zero", scale=16.0),
    "sparse_mixer": RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=0.01),
    "lp": RoutingSpec(top_k=3, normalize="lp", norm_p=3.0, epsilon=1e-6, epsilon_rule="clamp"),
    "capacity_zero": RoutingSpec(top_k=2, capacity=Capacity(factor=1.0)),
    "capacity_passthrough": RoutingSpec(top_k=1, capacity=Capacity(
        tokens=4, drop_policy="passthrough_scaled")),
    "expert_choice": RoutingSpec(kind="expert_choice", top_k=1, capacity=Capacity(factor=2.0)),
    "expert_choice_sigmoid_input": RoutingSpec(kind="expert_choice", top_k=1, scoring="sigmoid",
                                               weight_on="input", scale=0.5,
                                               capacity=Capacity(tokens=5)),
    "soft_moe": RoutingSpec(kind="soft_moe", top_k=1, slots_per_expert=3),
}


@pytest.mark.parametrize("name", sorted(MOE_ROUTINGS))
def test_moe_every_routing_kind(name):
    layer = layer_of(MOE_ROUTINGS[name], act="swiglu_oai", bias=True)
    p = random_layer_params(layer, rng(12))
    x = rng(13).standard_normal((33, 16)).astype(np.float32)
    check_moe(layer, p, x)


@pytest.mark.parametrize("gate", [False, True])
def test_moe_shared_experts(gate):
    shared = SharedExpertsSpec(2, FFNSpec(20, "swiglu", bias=True), gate=gate)
    layer = layer_of(MOE_ROUTINGS["group_topk"], act="swiglu", bias=True, shared=shared)
    p = random_layer_params(layer, rng(14))
    check_moe(layer, p, rng(15).standard_normal((21, 16)).astype(np.float32))


@pytest.mark.parametrize("kind", ["topk", "expert_choice", "soft_moe"])
@pytest.mark.parametrize("T", [0, 1])
def test_moe_tiny_token_counts(kind, T):
    routing = MOE_ROUTINGS[kind]
    shared = SharedExpertsSpec(1, FFNSpec(8, "swiglu"), gate=True)
    layer = layer_of(routing, shared=shared)
    p = random_layer_params(layer, rng(16))
    y = check_moe(layer, p, rng(17).standard_normal((T, 16)).astype(np.float32))
    assert y.shape == (T, 16)


def test_moe_large_token_count_and_odd_sizes():
    # H, I not multiples of the 8-lane vectors or the 64-wide tiles.
    layer = layer_of(RoutingSpec(top_k=4, normalize="sum"), E=16, H=75, I=131)
    p = random_layer_params(layer, rng(18))
    check_moe(layer, p, rng(19).standard_normal((2048, 75)).astype(np.float32))


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [3, 28, 60, 74, 300, 1100])
def test_moe_gemm_blocks_and_tails(wdtype, T):
    # The CPU GEMM's paths, by tokens per expert (E=4, k=2): ~1-2 (dot-product form, weights
    # streamed, K not blocked); ~14 (float32: the phase form, K blocks of 256; bfloat16: the
    # dot-product form, K blocks of 512 with 16-lane partial sums carried); ~30 (the phase form,
    # up to 6 vectors of 4 tokens in one or two token tiles, the last vector partial; K blocks
    # of 256, bfloat16 of 512); ~37 (the phase form with two token tiles); ~150 (outer-product
    # form: token blocks of 64 = 64 + 64 + 22, K blocks of 128 with partial sums carried, 6-row
    # weight tiles); ~550 (the FFN's token blocks of 256, each with its own prepared-tokens
    # key, the last of ~38 tokens). H and I leave tails of every K step and block (1100 =
    # 2*512 + 76 = 4*256 + 76 = 8*128 + 76, 531 = 512 + 19 = 2*256 + 19 = 4*128 + 19 =
    # 132*4 + 3) and of the weight-row tiles (531 = 88*6 + 3 = 44*12 + 3, 1100 = 183*6 + 2 =
    # 91*12 + 8).
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), E=4, H=1100, I=531, bias=True)
    p = random_layer_params(layer, rng(40))
    if wdtype != "float32":
        p.router_weight = p.router_weight.astype(NP_TYPE[wdtype]).astype(np.float32)
        assert p.router_bias is None and p.selection_bias is None
        for d in p.experts:
            for k in d:
                d[k] = d[k].astype(NP_TYPE[wdtype]).astype(np.float32)
    x = rng(41).standard_normal((T, 1100)).astype(np.float32)
    y = run_moe(layer, p, x, "float32", wdtype)
    np.testing.assert_allclose(y, moe_forward(x, layer, p), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [65, 87, 150])
def test_moe_repeated_calls_see_new_tokens(wdtype, T):
    # The GEMM keeps each thread's packed tokens between calls (gemm_nt_keyed): a second call
    # of the same shape, whose buffers may sit at the same addresses, must not reuse them.
    # Every token goes to experts 0 and 1, T rows each: 65 = 64 + 1, 87 = 80 + 7, 150 = 144 + 6,
    # so the outer form takes the multiple of 16 and the dot form the last 1-7 rows.
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), E=4, H=96, I=80)
    p = random_layer_params(layer, rng(42))
    for d in p.experts:
        for k in d:
            d[k] = d[k].astype(NP_TYPE[wdtype]).astype(np.float32)
    p.router_weight[:] = 0.0
    sess = session(moe_model(layer, p, "float32", wdtype))
    for seed in (43, 44, 45):
        x = rng(seed).standard_normal((T, 96)).astype(np.float32)
        y = sess.run(None, {"hidden_states": x})[0]
        np.testing.assert_allclose(y, moe_forward(x, layer, p), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("wdtype,T,more", [
    ("float32", 8, 40), ("float32", 21, 36), ("bfloat16", 16, 47), ("bfloat16", 27, 41),
    ("float32", 41, 64), ("bfloat16", 61, 64), ("float32", 72, 96), ("bfloat16", 72, 96),
    ("float32", 144, 160)])
def test_moe_token_result_does_not_depend_on_expert_load(wdtype, T, more):
    # Within one GEMM form's range (the phase form: float32 8-40 tokens, bfloat16 16-47; the
    # outer form from 41 and 48, 41 = 32 + 9 and 61 = 48 + 13 leaving a partial vector; 72
    # and 144 tokens in token blocks of 48 + 24 and 64 + 48 + 32, against 64 + 32 and
    # 64 + 64 + 32) a token's result is the same bits whether its expert gets T tokens or
    # `more`: the sums' order depends on neither the tiles nor the blocks. Every token goes
    # to experts 0 and 1 (zero router weights); I = 150 and H = 600 (float32: 2 x 256 + 88,
    # bfloat16: 512 + 88) leave partial weight-row tiles, token vectors and K blocks.
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), E=4, H=600, I=150, bias=True)
    p = random_layer_params(layer, rng(46))
    for d in p.experts:
        for k in d:
            d[k] = d[k].astype(NP_TYPE[wdtype]).astype(np.float32)
    p.router_weight[:] = 0.0
    if p.router_bias is not None:
        p.router_bias[:] = 0.0
    sess = session(moe_model(layer, p, "float32", wdtype))
    x = rng(47).standard_normal((more, 600)).astype(np.float32)
    full = sess.run(None, {"hidden_states": x})[0]
    part = sess.run(None, {"hidden_states": x[:T]})[0]
    np.testing.assert_allclose(part, moe_forward(x[:T], layer, p), rtol=2e-5, atol=2e-5)
    assert part.tobytes() == full[:T].tobytes()


def test_moe_reused_scratch_buffers_hold_no_stale_rows():
    # Scratch buffers of 256 KiB and more (gathered rows, hidden activations, expert outputs,
    # the shared experts', the bf16 input and output copies) are kept after a call and handed
    # to the next (SEIF_SCRATCH_MB): every element must be written before it is read. Calls of
    # falling and rising size get the first one's buffers, full of its rows.
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), E=4, H=256, I=320,
                     shared=SharedExpertsSpec(1, FFNSpec(192, "swiglu"), gate=True))
    p = random_layer_params(layer, rng(48))
    for d in p.experts + p.shared:
        for k in d:
            d[k] = d[k].astype(ml_dtypes.bfloat16).astype(np.float32)
    for f in ("router_weight", "shared_gate"):
        setattr(p, f, getattr(p, f).astype(ml_dtypes.bfloat16).astype(np.float32))
    sess = session(moe_model(layer, p, "bfloat16", "bfloat16"))
    for seed, T in ((49, 600), (50, 450), (51, 600), (52, 520)):
        x = rng(seed).standard_normal((T, 256)).astype(np.float32)
        y = sess.run(None, {"hidden_states": x})[0]
        ref = moe_forward(x.astype(ml_dtypes.bfloat16).astype(np.float32), layer, p)
        np.testing.assert_allclose(y, ref.astype(ml_dtypes.bfloat16).astype(np.float32),
                                   rtol=1.6e-2, atol=1.6e-2)


def test_moe_nan_rows_and_ties():
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), act="relu")
    p = random_layer_params(layer, rng(20))
    p.router_weight[:] = 0.0                       # all logits equal: experts 0 and 1
    x = rng(21).standard_normal((6, 16)).astype(np.float32)
    x[2, 4] = np.nan                               # NaN token stays NaN, others untouched
    y = check_moe(layer, p, x)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()


@pytest.mark.parametrize("dtype,wdtype", [("float16", "float32"), ("float16", "float16"),
                                          ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_moe_half_precision(dtype, wdtype):
    layer = layer_of(MOE_ROUTINGS["group_topk"], shared=SharedExpertsSpec(
        1, FFNSpec(8, "swiglu"), gate=True))
    p = random_layer_params(layer, rng(22))
    # The reference runs on the same rounded weights and inputs, in float32.
    for f in ("router_weight", "selection_bias", "shared_gate"):
        setattr(p, f, getattr(p, f).astype(NP_TYPE[wdtype]).astype(np.float32))
    for d in p.experts + p.shared:
        for k in d:
            d[k] = d[k].astype(NP_TYPE[wdtype]).astype(np.float32)
    x = rng(23).standard_normal((40, 16)).astype(np.float32)
    y = run_moe(layer, p, x, dtype, wdtype)
    ref = moe_forward(x.astype(NP_TYPE[dtype]).astype(np.float32), layer, p)
    tol = 1e-5 if dtype == "float32" else (2e-3 if dtype == "float16" else 1.6e-2)
    np.testing.assert_allclose(y, ref.astype(NP_TYPE[dtype]).astype(np.float32),
                               rtol=tol, atol=tol)


def test_moe_is_deterministic_across_thread_counts():
    layer = layer_of(RoutingSpec(top_k=2, normalize="sum"), E=8, H=64, I=96)
    p = random_layer_params(layer, rng(24))
    x = rng(25).standard_normal((300, 64)).astype(np.float32)
    a = run_moe(layer, p, x, threads=1)
    b = run_moe(layer, p, x, threads=4)
    c = run_moe(layer, p, x, threads=4)
    assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_moe_forced_fallback_kernels(isa):
    """SEIF_GEMM_ISA caps the kernel choice (read once per process), so the AVX2 and baseline
    GEMM builds, which this AVX-512 machine would never pick, are checked here too: a child
    process reports the chosen kernel, and a child pytest runs the GEMM path tests under it."""
    env = dict(os.environ, SEIF_GEMM_ISA=isa)
    probe = ("import ctypes, sys; d = ctypes.CDLL(sys.argv[1]); "
             "d.SeifOrtBuildInfo.restype = ctypes.c_char_p; print(d.SeifOrtBuildInfo().decode())")
    info = subprocess.run([sys.executable, "-c", probe, str(LIB)], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert f"cpu_gemm={isa};" in info + ";"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          __file__, "-k", "gemm_blocks_and_tails or every_activation or "
                          "deterministic_across_thread_counts or half_precision"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:]


def test_moe_rejects_wrong_shapes():
    layer = layer_of(RoutingSpec(top_k=2))
    p = random_layer_params(layer, rng(26))
    model = moe_model(layer, p)
    for init in model.graph.initializer:       # down_proj [E, H, I] -> [E, I, H]
        if init.name == "down_proj":
            arr = numpy_helper.to_array(init).transpose(0, 2, 1).copy()
            init.CopyFrom(numpy_helper.from_array(arr, "down_proj"))
    with pytest.raises(Exception, match="down_proj"):
        session(model).run(None, {"hidden_states": np.zeros((2, 16), np.float32)})


# =========================================================================== kernel vs function
def test_kernel_wins_over_model_local_function():
    """A model carrying an (intentionally wrong) function body for ai.seif.SeifRouter runs the
    body without the library and the kernel with it."""
    body = [
        helper.make_node("Constant", [], ["K"], value=numpy_helper.from_array(
            np.array([2], np.int64))),
        helper.make_node("TopK", ["logits", "K"], ["vals", "indices"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
            np.array(0.0, np.float32))),
        helper.make_node("Mul", ["vals", "zero"], ["weights"]),
        helper.make_node("Cast", ["indices"], ["kept"], to=TensorProto.BOOL),
    ]
    fn = helper.make_function("ai.seif", "SeifRouter", ["logits"], ["indices", "weights", "kept"],
                              body, [helper.make_opsetid("", 21)],
                              attributes=list(routing_attrs(RoutingSpec(top_k=2))))
    model = router_model(RoutingSpec(top_k=2), 8)
    model.functions.append(fn)
    logits = rng(27).standard_normal((5, 8)).astype(np.float32)
    ref = route(logits, RoutingSpec(top_k=2))
    with_lib = session(model).run(None, {"logits": logits})
    np.testing.assert_allclose(with_lib[1], ref.weights, rtol=1e-5)
    without = session(model, library=False).run(None, {"logits": logits})
    np.testing.assert_array_equal(without[1], 0.0)


# =========================================================================== CUDA
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA device and a "
                          "library built with SEIF_WITH_CUDA=ON")
CUDA = "CUDAExecutionProvider"


@cuda
@pytest.mark.parametrize("name", sorted(ROUTER_SPECS))
def test_cuda_router_matches_reference(name):
    spec = ROUTER_SPECS[name]
    E = 16
    logits = rng(30).standard_normal((515, E)).astype(np.float32)
    logits[3] = np.nan
    logits[4] = 0.0
    bias = (0.1 * rng(31).standard_normal(E)).astype(np.float32) if spec.selection_bias else None
    check_route(spec, logits, bias, provider=CUDA)


@cuda
@pytest.mark.parametrize("T", [0, 1, 5000])
def test_cuda_router_token_counts(T):
    spec = RoutingSpec(kind="group_topk", top_k=8, scoring="sigmoid", selection_bias=True,
                       normalize="sum", epsilon=1e-20, scale=2.5, n_group=8, topk_group=4,
                       group_score="top2_sum", capacity=Capacity(factor=1.0))
    logits = rng(32).standard_normal((T, 256)).astype(np.float32)
    check_route(spec, logits, (0.1 * rng(33).standard_normal(256)).astype(np.float32),
                provider=CUDA)


@cuda
@pytest.mark.skipif("SeifMoE" not in INFO.get("cuda_ops", ""),
                    reason="this build has no CUDA SeifMoE kernel (the CPU kernel runs it)")
@pytest.mark.parametrize("name", ["topk", "topk_sigmoid_input", "group_topk", "sparse_mixer",
                                  "capacity_zero", "capacity_passthrough"])
@pytest.mark.parametrize("act", ["swiglu", "swiglu_oai", "gelu", "relu2"])
def test_cuda_moe_matches_reference(name, act):
    shared = SharedExpertsSpec(1, FFNSpec(12, act, bias=True), gate=True)
    layer = layer_of(MOE_ROUTINGS[name], act=act, bias=True, shared=shared)
    p = random_layer_params(layer, rng(34))
    for T in (0, 1, 200):
        check_moe(layer, p, rng(35).standard_normal((T, 16)).astype(np.float32), provider=CUDA)
