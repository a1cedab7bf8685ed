"""ONNX side: ai.seif function bodies, export, com.microsoft.MoE lowering, import, runtime."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import seif  # noqa: E402
from seif.convert import convert  # noqa: E402
from seif.errors import ConversionError, SeifError  # noqa: E402
from seif.manifest import (  # noqa: E402
    Capacity,
    FFNSpec,
    LayerSpec,
    RoutingSpec,
    SharedExpertsSpec,
)
from seif.moe import moe_forward, random_layer_params  # noqa: E402
from seif.routing import route  # noqa: E402

sx = pytest.importorskip("seif.converters.onnx")


@pytest.fixture(autouse=True, scope="module")
def _onnx_converters():
    """Register seif<->onnx for this module only, leaving the registry as it was."""
    import seif.convert as registry
    registry._load_plugins()
    saved = dict(registry._REGISTRY)
    sx.register()
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)

E, H, I = 8, 16, 12
TOL = dict(rtol=1e-5, atol=1e-5)

ROUTINGS = {
    "topk_softmax_sum": RoutingSpec("topk", 2, "softmax", normalize="sum"),
    "topk_softmax_none": RoutingSpec("topk", 2, "softmax"),
    "topk_softmax_topk_bias": RoutingSpec("topk", 3, "softmax_topk", router_bias=True),
    "topk_sigmoid_bias_scale": RoutingSpec("topk", 2, "sigmoid", selection_bias=True,
                                           normalize="sum", epsilon=1e-20, scale=2.5),
    "topk_sigmoid_topk_input": RoutingSpec("topk", 1, "sigmoid_topk", weight_on="input"),
    "topk_lp_clamp": RoutingSpec("topk", 3, "softmax", normalize="lp", norm_p=2.0,
                                 epsilon=1e-12, epsilon_rule="clamp"),
    "group_max_zero": RoutingSpec("group_topk", 2, "softmax", n_group=4, topk_group=2,
                                  group_score="max", group_mask="zero", scale=1.5),
    "group_top2_neginf": RoutingSpec("group_topk", 3, "sigmoid", selection_bias=True,
                                     normalize="sum", epsilon=1e-20, scale=2.5, n_group=4,
                                     topk_group=2, group_score="top2_sum"),
    "sparse_mixer": RoutingSpec("sparse_mixer", 2, jitter_eps=0.3),
    "capacity_tokens_zero": RoutingSpec("topk", 2, "softmax", normalize="sum",
                                        capacity=Capacity(tokens=4)),
    "capacity_factor_passthrough": RoutingSpec(
        "topk", 1, "softmax", capacity=Capacity(factor=1.25, drop_policy="passthrough_scaled")),
    "expert_choice_tokens": RoutingSpec("expert_choice", 1, "softmax",
                                        capacity=Capacity(tokens=5), scale=1.5),
    "expert_choice_factor_input": RoutingSpec("expert_choice", 1, "sigmoid", weight_on="input",
                                              capacity=Capacity(factor=2.0)),
    "soft_moe": RoutingSpec("soft_moe", 1, slots_per_expert=2),
}
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai", "relu", "gelu", "gelu_tanh",
               "silu", "relu2")


def make_layer(routing: RoutingSpec, activation="swiglu", bias=False, shared=None,
               index=0) -> LayerSpec:
    routing = RoutingSpec.from_dict(routing.to_dict())        # a fresh, validated copy
    return LayerSpec(index, E, H, routing, FFNSpec(I, activation, bias=bias), shared)


def ort_run(model, x: np.ndarray, name="hidden_states") -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})


def tokens(rng, T):
    return rng.standard_normal((T, H)).astype(np.float32)


# --------------------------------------------------------------------------- function bodies
@pytest.mark.parametrize("kind", sorted(ROUTINGS))
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "swiglu_oai"])
def test_portable_matches_reference(kind, activation):
    rng = np.random.default_rng(abs(hash((kind, activation))) % 2**32)
    layer = make_layer(ROUTINGS[kind], activation, bias=kind.startswith("topk_softmax"))
    params = random_layer_params(layer, rng)
    model = sx.moe_model([(layer, params)])
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for T in (1, 37, 0):                                # one model, dynamic T
        x = tokens(rng, T)
        got = sess.run(None, {"hidden_states": x})[0]
        np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_activation_with_shared_experts(activation, bias):
    rng = np.random.default_rng(7)
    shared = SharedExpertsSpec(2, FFNSpec(6, activation, bias=bias), gate=True)
    layer = make_layer(ROUTINGS["topk_softmax_sum"], activation, bias=bias, shared=shared)
    params = random_layer_params(layer, rng)
    x = tokens(rng, 23)
    got = ort_run(sx.moe_model([(layer, params)]), x)[0]
    np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


@pytest.mark.parametrize("kind", sorted(ROUTINGS))
def test_reference_evaluator_runs_function_body(kind):
    """onnx.reference (no ORT at all) runs the function body of every routing kind."""
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(3)
    shared = SharedExpertsSpec(1, FFNSpec(6, "geglu"), gate=True)
    layer = make_layer(ROUTINGS[kind], "geglu", shared=shared)
    params = random_layer_params(layer, rng)
    x = tokens(rng, 9)
    got = ReferenceEvaluator(sx.moe_model([(layer, params)])).run(None, {"hidden_states": x})[0]
    np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_evaluator_runs_every_activation(activation):
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(4)
    layer = make_layer(ROUTINGS["topk_softmax_sum"], activation, bias=True)
    params = random_layer_params(layer, rng)
    x = tokens(rng, 7)
    got = ReferenceEvaluator(sx.moe_model([(layer, params)])).run(None, {"hidden_states": x})[0]
    np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


def _router_cases():
    rng = np.random.default_rng(11)
    # Many exact ties, from equal values only: logits in 0..3 have no coincidences such as
    # sigmoid(-1) + sigmoid(1) == sigmoid(-2) + sigmoid(2), which tie in exact arithmetic but
    # differ by an ulp between Sigmoid implementations (a near-tie, spec §6.4, not a rule).
    ties = rng.integers(0, 4, size=(64, E)).astype(np.float32)
    ties[0] = 0.0
    ties[1, :] = -0.0
    ties[1, ::2] = 0.0                                                 # +0 == -0
    ties[2, 5] = np.nan                                                # NaN ranks first
    ties[3, [1, 6]] = np.nan
    ties[4, [2, 3]] = [np.inf, np.nan]                                 # NaN above +inf
    ties[5, :] = -np.inf
    ties[5, 7] = np.nan
    return ties


@pytest.mark.parametrize("kind", [k for k, r in ROUTINGS.items()
                                  if r.kind in ("topk", "group_topk", "sparse_mixer")])
@pytest.mark.parametrize("evaluator", ["ort", "reference"])
def test_router_ties_and_nan_follow_spec(kind, evaluator):
    """SeifRouter: indices exactly those of seif.routing.route (lower index on ties, NaN
    first, +0 == -0), weights and kept equal, on logits full of ties and special values."""
    layer = make_layer(ROUTINGS[kind])
    sb = np.full(E, 0.25, np.float32) if layer.routing.selection_bias else None
    model = sx.router_model(layer, sb)
    onnx.checker.check_model(model, full_check=True)
    logits = _router_cases()
    if evaluator == "ort":
        idx, w, kept = ort_run(model, logits, "logits")
    else:
        from onnx.reference import ReferenceEvaluator
        idx, w, kept = ReferenceEvaluator(model).run(None, {"logits": logits})
    ref = route(logits, layer.routing, sb)
    np.testing.assert_array_equal(idx, ref.indices)
    np.testing.assert_array_equal(kept, ref.kept)
    np.testing.assert_allclose(w, ref.weights, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_expert_choice_ties_lower_token_wins():
    layer = make_layer(ROUTINGS["expert_choice_tokens"])
    params = random_layer_params(layer, np.random.default_rng(1))
    params.router_weight[:] = 0.0                  # every score equal: tokens 0..C-1 win
    x = tokens(np.random.default_rng(2), 12)
    got = ort_run(sx.moe_model([(layer, params)]), x)[0]
    np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


def test_nan_token_propagates_only_to_itself():
    layer = make_layer(ROUTINGS["topk_softmax_sum"])
    params = random_layer_params(layer, np.random.default_rng(1))
    x = tokens(np.random.default_rng(2), 6)
    x[3, 2] = np.nan
    got = ort_run(sx.moe_model([(layer, params)]), x)[0]
    ref = moe_forward(x, layer, params)
    assert np.isnan(got[3]).all() and np.isnan(ref[3]).all()
    np.testing.assert_allclose(np.delete(got, 3, 0), np.delete(ref, 3, 0), **TOL)


def _kernel_session_options():
    from seif.runtime import library_path
    lib = library_path()
    if lib is None:
        pytest.skip("libseif_ort.so is not built")
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    return so


@pytest.mark.parametrize("kind", sorted(ROUTINGS))
def test_custom_kernels_match_reference(kind):
    """The same exported model, with the custom-op library registered (its kernels replace the
    function bodies), matches the reference."""
    so = _kernel_session_options()
    rng = np.random.default_rng(17)
    for act in ("swiglu", "gelu_tanh", "swiglu_oai"):
        shared = SharedExpertsSpec(1, FFNSpec(6, act, bias=True), gate=True)
        layer = make_layer(ROUTINGS[kind], act, bias=True, shared=shared)
        params = random_layer_params(layer, rng)
        sess = ort.InferenceSession(sx.moe_model([(layer, params)]).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        for T in (1, 37):
            x = tokens(rng, T)
            np.testing.assert_allclose(sess.run(None, {"hidden_states": x})[0],
                                       moe_forward(x, layer, params), **TOL)
    if ROUTINGS[kind].kind in ("topk", "group_topk", "sparse_mixer"):
        layer = make_layer(ROUTINGS[kind])
        sb = np.full(E, 0.25, np.float32) if layer.routing.selection_bias else None
        sess = ort.InferenceSession(sx.router_model(layer, sb).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        idx, w, kept = sess.run(None, {"logits": _router_cases()})
        ref = route(_router_cases(), layer.routing, sb)
        np.testing.assert_array_equal(idx, ref.indices)
        np.testing.assert_array_equal(kept, ref.kept)
        np.testing.assert_allclose(w, ref.weights, rtol=1e-6, atol=1e-7, equal_nan=True)


# --------------------------------------------------------------------------- ORT lowering
def _ort_nodes(model):
    return [(n.domain, n.op_type) for n in model.graph.node]


LOWERINGS = {
    "mixtral": (RoutingSpec("topk", 2, "softmax", normalize="sum"), "swiglu", False, None),
    "qwen_no_renorm": (RoutingSpec("topk", 4, "softmax"), "swiglu", False,
                       SharedExpertsSpec(1, FFNSpec(20, "swiglu"), gate=True)),
    "deepseek_v3": (RoutingSpec("group_topk", 2, "sigmoid", selection_bias=True,
                                normalize="sum", epsilon=1e-20, scale=2.5, n_group=4,
                                topk_group=2, group_score="top2_sum"), "swiglu", False,
                    SharedExpertsSpec(1, FFNSpec(24, "swiglu"))),
    "gpt_oss": (RoutingSpec("topk", 2, "softmax_topk", router_bias=True), "swiglu_oai", True,
                None),
    "phimoe": (RoutingSpec("sparse_mixer", 2, jitter_eps=0.3), "swiglu", False, None),
    "ernie_clamp": (RoutingSpec("topk", 2, "softmax", selection_bias=True, normalize="sum",
                                epsilon=1e-12, epsilon_rule="clamp"), "swiglu", False, None),
    "dbrx_lp": (RoutingSpec("topk", 2, "softmax", normalize="lp", norm_p=1.0), "swiglu",
                False, None),
    "deepseek_v2": (RoutingSpec("group_topk", 2, "softmax", n_group=4, topk_group=2,
                                group_mask="zero", scale=1.5), "swiglu", False, None),
    "relu": (RoutingSpec("topk", 2, "softmax", normalize="sum"), "relu", True, None),
    "silu_sigmoid": (RoutingSpec("topk", 2, "sigmoid"), "silu", False, None),
    "gelu_tanh": (RoutingSpec("topk", 1, "softmax"), "gelu_tanh", True, None),
}


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_ort_lowering_matches_reference(name):
    routing, act, bias, shared = LOWERINGS[name]
    layer = make_layer(routing, act, bias=bias, shared=shared)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    params = random_layer_params(layer, rng)
    plain = name in ("mixtral", "qwen_no_renorm", "relu", "gelu_tanh")
    for router in ("seif", "stock"):  # default: every router through SeifRouter
        model = sx.moe_model([(layer, params)], target="ort", ort_router=router)
        onnx.checker.check_model(model, full_check=True)
        assert ("com.microsoft", "MoE") in _ort_nodes(model)
        assert ("ai.seif", "SeifMoE") not in _ort_nodes(model)
        assert (("ai.seif", "SeifRouter") in _ort_nodes(model)) != (plain and router == "stock")
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        for T in (1, 37):
            x = tokens(rng, T)
            got = sess.run(None, {"hidden_states": x})[0]
            np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


@pytest.mark.parametrize("kind,why", [
    ("capacity_tokens_zero", "capacity"), ("capacity_factor_passthrough", "capacity"),
    ("expert_choice_tokens", "expert-choice"), ("soft_moe", "Soft MoE"),
    ("topk_sigmoid_topk_input", "weight_on: input")])
def test_ort_lowering_refuses(kind, why):
    layer = make_layer(ROUTINGS[kind])
    params = random_layer_params(layer, np.random.default_rng(0))
    with pytest.raises(ConversionError, match=why):
        sx.moe_model([(layer, params)], target="ort")


@pytest.mark.parametrize("act", ["geglu", "geglu_tanh", "gelu", "relu2"])
def test_ort_lowering_refuses_activations(act):
    layer = make_layer(ROUTINGS["topk_softmax_sum"], act)
    assert "activation" in sx.ort_lowering_refusal(layer)


def test_stock_moe_is_an_oracle_for_plain_softmax():
    """A com.microsoft.MoE node built here by hand (not by the converter) agrees with the
    portable function body on the same weights (tie-free fp32 inputs)."""
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(21)
    for normalize in ("sum", "none"):
        layer = make_layer(RoutingSpec("topk", 2, "softmax", normalize=normalize))
        p = random_layer_params(layer, rng)
        gate = np.stack([e["gate"] for e in p.experts])
        up = np.stack([e["up"] for e in p.experts])
        fc1 = np.stack([gate, up], axis=2).reshape(E, 2 * I, H)      # rows g0, u0, g1, u1 ...
        fc2 = np.stack([e["down"] for e in p.experts])
        graph = oh.make_graph(
            [oh.make_node("MatMul", ["x", "wr"], ["logits"]),
             oh.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                          k=2, activation_type="swiglu", swiglu_fusion=1,
                          normalize_routing_weights=int(normalize == "sum"))],
            "stock", [oh.make_tensor_value_info("x", TP.FLOAT, ["T", H])],
            [oh.make_tensor_value_info("y", TP.FLOAT, ["T", H])],
            [nh.from_array(np.ascontiguousarray(p.router_weight.T), "wr"),
             nh.from_array(fc1, "fc1"), nh.from_array(fc2, "fc2")])
        stock = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21),
                                                    oh.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
        x = tokens(rng, 50)
        want = ort_run(stock, x, "x")[0]
        got = ort_run(sx.moe_model([(layer, p)]), x)[0]
        np.testing.assert_allclose(got, want, **TOL)
        np.testing.assert_allclose(want, moe_forward(x, layer, p), **TOL)


# --------------------------------------------------------------------------- convert + import
def _save_layers(path, layers, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        tensors.update(random_layer_params(layer, rng).to_tensors(layer))
    seif.save(path, tensors, layers)
    return tensors


def _assert_same_checkpoint(a, b, layer_fields=True):
    with seif.open(a) as ca, seif.open(b) as cb:
        assert sorted(ca.tensor_names()) == sorted(cb.tensor_names())
        for name in ca.tensor_names():
            ta, tb = ca.tensor(name), cb.tensor(name)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
            assert ta.tobytes() == tb.tobytes(), name
        if layer_fields:
            assert [x.to_dict() for x in ca.layers] == [x.to_dict() for x in cb.layers]


@pytest.mark.parametrize("kind", sorted(ROUTINGS))
def test_portable_round_trip_is_byte_identical(tmp_path, kind):
    shared = SharedExpertsSpec(2, FFNSpec(6, "swiglu_oai", bias=True, alpha=1.5, limit=5.0),
                               gate=True)
    layer = make_layer(ROUTINGS[kind], "swiglu_oai", bias=True, shared=shared, index=5)
    layer.experts.alpha, layer.experts.limit = 1.5, 5.0
    layer.routing.training.aux_loss_coef = 0.01
    src = tmp_path / "a.seif"
    _save_layers(src, [layer])
    out = convert(src, tmp_path / "a.onnx")
    back = convert(out, tmp_path / "b.seif", source_format="onnx")
    _assert_same_checkpoint(src, back)


def test_import_without_metadata_uses_attributes(tmp_path):
    layer = make_layer(ROUTINGS["group_top2_neginf"], index=2)
    src = tmp_path / "a.seif"
    _save_layers(src, [layer])
    out = convert(src, tmp_path / "a.onnx")
    model = onnx.load(out)
    del model.metadata_props[:]
    onnx.save(model, out)
    back = convert(out, tmp_path / "b.seif", source_format="onnx")
    _assert_same_checkpoint(src, back)                   # 1e-20 survives float32 attributes


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v2", "phimoe", "relu"])
def test_ort_lowering_round_trip(tmp_path, name):
    routing, act, bias, _ = LOWERINGS[name]
    layer = make_layer(routing, act, bias=bias, index=1)
    src = tmp_path / "a.seif"
    _save_layers(src, [layer])
    out = convert(src, tmp_path / "a.onnx", target="ort")
    back = convert(out, tmp_path / "b.seif", source_format="onnx")
    _assert_same_checkpoint(src, back)


def test_import_refuses_shared_experts_around_stock_moe(tmp_path):
    routing, act, bias, shared = LOWERINGS["deepseek_v3"]
    src = tmp_path / "a.seif"
    _save_layers(src, [make_layer(routing, act, bias=bias, shared=shared)])
    out = convert(src, tmp_path / "a.onnx", target="ort")
    with pytest.raises(ConversionError, match="shared experts"):
        convert(out, tmp_path / "b.seif", source_format="onnx")


def test_import_refuses_unknown_router_graph(tmp_path):
    layer = make_layer(LOWERINGS["mixtral"][0])
    params = random_layer_params(layer, np.random.default_rng(0))
    model = sx.moe_model([(layer, params)], target="ort")
    moe = next(n for n in model.graph.node if n.op_type == "MoE")
    relu = onnx.helper.make_node("Relu", [moe.input[1]], ["relu_logits"])
    moe.input[1] = "relu_logits"
    model.graph.node.insert(list(model.graph.node).index(moe), relu)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ConversionError, match="cannot identify the router"):
        convert(path, tmp_path / "b.seif", source_format="onnx")


def test_import_refuses_tampered_log_weight_pattern(tmp_path):
    layer = make_layer(LOWERINGS["deepseek_v2"][0])
    params = random_layer_params(layer, np.random.default_rng(0))
    model = sx.moe_model([(layer, params)], target="ort")
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.output[0] == "output")
    mul.op_type = "Div"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ConversionError, match="not a router pattern"):
        convert(path, tmp_path / "b.seif", source_format="onnx")


def test_convert_layer_selection_and_all_layers(tmp_path):
    a = make_layer(ROUTINGS["topk_softmax_sum"], index=0)
    b = make_layer(ROUTINGS["topk_softmax_sum"], index=3)
    c = make_layer(ROUTINGS["soft_moe"], index=4)
    src = tmp_path / "m.seif"
    _save_layers(src, [a, b, c])
    with pytest.raises(ConversionError, match="--layer"):
        convert(src, tmp_path / "x.onnx")
    out = convert(src, tmp_path / "l3.onnx", layer=3)
    assert [o.name for o in onnx.load(out).graph.output] == ["output"]
    with pytest.raises(ConversionError, match="differ in configuration"):
        convert(src, tmp_path / "all.onnx", all_layers=True)
    with pytest.raises(ConversionError, match="exists"):
        convert(src, tmp_path / "l3.onnx", layer=3)
    convert(src, tmp_path / "l3.onnx", layer=3, overwrite=True, target="seif-kernels")
    with pytest.raises(ConversionError, match="target"):
        convert(src, tmp_path / "t.onnx", layer=3, target="tensorrt")
    src2 = tmp_path / "two.seif"
    _save_layers(src2, [a, b])
    out = convert(src2, tmp_path / "all.onnx", all_layers=True)
    model = onnx.load(out)
    assert [o.name for o in model.graph.output] == ["output_0", "output_3"]
    x = tokens(np.random.default_rng(0), 5)
    y0, y3 = ort_run(model, x)
    with seif.open(src2) as ck:
        np.testing.assert_allclose(y0, moe_forward(x, a, ck.moe_params(0)), **TOL)
        np.testing.assert_allclose(y3, moe_forward(x, b, ck.moe_params(3)), **TOL)
    back = convert(out, tmp_path / "back.seif", source_format="onnx")
    _assert_same_checkpoint(src2, back)


def test_external_data_beyond_the_limit(tmp_path, monkeypatch):
    from seif.runtime import Session
    monkeypatch.setattr(sx, "EXTERNAL_DATA_BYTES", 1000)
    layer = make_layer(ROUTINGS["topk_softmax_sum"])
    src = tmp_path / "a.seif"
    _save_layers(src, [layer])
    out = convert(src, tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx.data").stat().st_size > (tmp_path / "a.onnx").stat().st_size
    x = tokens(np.random.default_rng(0), 3)
    with seif.open(src) as ck:
        np.testing.assert_allclose(Session(out, library=None)(x),
                                   moe_forward(x, layer, ck.moe_params(0)), **TOL)
    _assert_same_checkpoint(src, convert(out, tmp_path / "b.seif", source_format="onnx"))


def test_half_precision_weights(tmp_path):
    layer = make_layer(ROUTINGS["topk_softmax_sum"])
    params = random_layer_params(layer, np.random.default_rng(0))
    x = tokens(np.random.default_rng(1), 7)
    for dtype in ("f16", "bf16"):
        model = sx.moe_model([(layer, params)], dtype=dtype)
        got = ort_run(model, x)[0]
        np.testing.assert_allclose(got, moe_forward(x, layer, params), rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- runtime
@pytest.fixture
def exported(tmp_path):
    layer = make_layer(ROUTINGS["topk_softmax_sum"])
    params = random_layer_params(layer, np.random.default_rng(0))
    path = tmp_path / "layer.onnx"
    onnx.save(sx.moe_model([(layer, params)]), path)
    return path, layer, params


def test_session_cpu_reports_provider_and_warns_once(exported, monkeypatch):
    import seif.runtime
    from seif.runtime import session as session_mod
    path, layer, params = exported
    monkeypatch.setenv("SEIF_ORT_LIBRARY", str(path.parent / "missing.so"))
    monkeypatch.setattr(session_mod, "library_path", lambda: None)
    monkeypatch.setattr(session_mod, "_warned_no_library", False)
    with pytest.warns(RuntimeWarning, match="libseif_ort.so not found"):
        sess = seif.runtime.Session(path, device="cpu")
    assert sess.provider == "CPUExecutionProvider" and sess.uses_seif_ops
    assert sess.library is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seif.runtime.Session(path)                               # one warning per process
    x = tokens(np.random.default_rng(3), 4)
    np.testing.assert_allclose(sess(x), moe_forward(x, layer, params), **TOL)
    assert set(sess.run({"hidden_states": x})) == {"output"}


def test_session_cuda_is_refused_or_verified(exported):
    from seif.runtime import Session
    path = exported[0]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SeifError, match="CUDAExecutionProvider"):
            Session(path, device="cuda")
    else:
        assert Session(path, device="cuda").provider == "CUDAExecutionProvider"


def test_library_path_lookup(tmp_path, monkeypatch):
    from seif.runtime import library_path
    lib = tmp_path / "libseif_ort.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("SEIF_ORT_LIBRARY", str(lib))
    assert library_path() == lib.resolve()


def test_model_domains_scan(exported, tmp_path):
    from seif.runtime.session import model_domains
    assert model_domains(exported[0]) == {"", "ai.seif"}


def test_seif_run_command(exported, tmp_path):
    from click.testing import CliRunner
    from seif.runtime.session import run_command
    path, layer, params = exported
    runner = CliRunner()
    res = runner.invoke(run_command, [str(path), "--random", "5", "--repeat", "2",
                                      "--no-library"])
    assert res.exit_code == 0, res.output
    assert "CPUExecutionProvider" in res.output and "output: float32[5, 16]" in res.output
    assert "median" in res.output
    x = tokens(np.random.default_rng(0), 3)
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(run_command, [str(path), "--input", str(tmp_path / "x.npy"),
                                      "--save", str(tmp_path / "y.npz"), "--no-library"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["output"],
                               moe_forward(x, layer, params), **TOL)
    res = runner.invoke(run_command, [str(path)])
    assert res.exit_code == 1 and "--random" in res.output


def test_metadata_records_layers(exported):
    model = onnx.load(exported[0])
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["seif.layers"])[0]["routing"]["kind"] == "topk"
    assert {o.domain: o.version for o in model.opset_import} == {"": 21, "ai.seif": 1}


# --------------------------------------------------------------------------- SEIF 1.1 output bias
def _biased(routing, act="swiglu", shared=None, index=0):
    layer = make_layer(routing, act, shared=shared, index=index)
    layer.output_bias = True
    return layer


@pytest.mark.parametrize("kind", ["topk_softmax_topk_bias", "expert_choice_tokens", "soft_moe"])
@pytest.mark.parametrize("evaluator", ["ort", "reference"])
def test_output_bias_is_an_add_after_the_moe_node(kind, evaluator):
    """JetMoE's block bias (§5.16): ORT and onnx.reference both match the NumPy reference."""
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(41)
    layer = _biased(ROUTINGS[kind], shared=SharedExpertsSpec(1, FFNSpec(6, "swiglu"), True))
    params = random_layer_params(layer, rng)
    params.output_bias = (params.output_bias * 10).astype(np.float32)   # unmistakable
    model = sx.moe_model([(layer, params)])
    onnx.checker.check_model(model, full_check=True)
    assert [(n.op_type, n.name) for n in model.graph.node][-1] == ("Add", "layers.0.output_bias")
    for T in (5, 0):
        x = tokens(rng, T)
        got = (ort_run(model, x)[0] if evaluator == "ort" else
               ReferenceEvaluator(model).run(None, {"hidden_states": x})[0])
        np.testing.assert_allclose(got, moe_forward(x, layer, params), **TOL)


def test_output_bias_with_custom_kernels_and_ort_lowering():
    rng = np.random.default_rng(43)
    layer = _biased(RoutingSpec("topk", 2, "softmax_topk"))
    params = random_layer_params(layer, rng)
    x = tokens(rng, 19)
    want = moe_forward(x, layer, params)
    lowered = sx.moe_model([(layer, params)], target="ort")
    assert ("com.microsoft", "MoE") in _ort_nodes(lowered)
    np.testing.assert_allclose(ort_run(lowered, x)[0], want, **TOL)
    so = _kernel_session_options()
    sess = ort.InferenceSession(sx.moe_model([(layer, params)]).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"hidden_states": x})[0], want, **TOL)


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_output_bias_round_trip_is_byte_identical(tmp_path, target):
    layers = [_biased(RoutingSpec("topk", 2, "softmax_topk"), index=1),
              make_layer(RoutingSpec("topk", 2, "softmax_topk"), index=2)]
    src = tmp_path / "a.seif"
    _save_layers(src, layers)
    out = convert(src, tmp_path / "a.onnx", target=target, all_layers=True) \
        if target == "portable" else convert(src, tmp_path / "a.onnx", target=target, layer=1)
    back = convert(out, tmp_path / "b.seif", source_format="onnx")
    if target == "portable":
        _assert_same_checkpoint(src, back)
    else:
        with seif.open(src) as a, seif.open(back) as b:
            assert b.layers[0].output_bias
            assert b.tensor("layers.1.output_bias").tobytes() == \
                a.tensor("layers.1.output_bias").tobytes()


def test_output_bias_missing_from_graph_is_refused(tmp_path):
    """Metadata says the layer has a bias, the graph lost its Add: refuse, never drop it."""
    src = tmp_path / "a.seif"
    _save_layers(src, [_biased(ROUTINGS["topk_softmax_sum"])])
    model = onnx.load(convert(src, tmp_path / "a.onnx"))
    add = model.graph.node[-1]
    model.graph.node.remove(add)
    model.graph.node[-1].output[0] = "output"
    onnx.save(model, tmp_path / "b.onnx")
    with pytest.raises(ConversionError, match="output bias"):
        convert(tmp_path / "b.onnx", tmp_path / "b.seif", source_format="onnx")
    model = onnx.load(tmp_path / "a.onnx")                 # an Add of a bias of another shape
    bad = next(t for t in model.graph.initializer if t.name == "layers.0.output_bias")
    bad.CopyFrom(onnx.numpy_helper.from_array(np.zeros(H + 1, np.float32), bad.name))
    onnx.save(model, tmp_path / "c.onnx")
    with pytest.raises(ConversionError, match="output_bias"):
        convert(tmp_path / "c.onnx", tmp_path / "c.seif", source_format="onnx")


def test_whole_model_export_refuses_a_graph_that_lost_the_bias():
    """If the traced graph does not add the bias right after SeifMoE, the export refuses."""
    pytest.importorskip("torch")
    from seif.converters.onnx_torch import _name_output_bias
    layer = _biased(ROUTINGS["topk_softmax_sum"])
    node = onnx.helper.make_node("SeifMoE", ["x"], ["y"], domain="ai.seif", name="layers.0.moe")
    relu = onnx.helper.make_node("Relu", ["y"], ["z"])
    graph = onnx.helper.make_graph([node, relu], "g", [], [])
    with pytest.raises(ConversionError, match="output bias"):
        _name_output_bias(graph, node, layer)
    bias = onnx.numpy_helper.from_array(np.zeros(H, np.float32), "b")
    add = onnx.helper.make_node("Add", ["b", "y"], ["z"])
    graph = onnx.helper.make_graph([node, add], "g", [], [], [bias])
    _name_output_bias(graph, node, layer)
    add = graph.node[1]                     # make_graph holds copies of the nodes
    assert add.name == "layers.0.output_bias" and list(add.input) == ["y", "b"]
