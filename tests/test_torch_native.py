"""SparseMoE's "native" expert dispatch (libseif_ort.so's C API, seif.runtime.native) against the
NumPy reference seif.moe.moe_forward and the module's own torch dispatches.

Experts in bf16 are checked against the float32 reference on the same bf16-exact weights: the
native kernels widen bf16 weights in registers and keep rows and sums in float32, so they must
agree with it as closely as float32 experts do. The library is built by `make native`, never
here; the tests skip when it is missing (or lacks the C API).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from seif.converters import torch as st  # noqa: E402
from seif.runtime import native  # noqa: E402

from seif.errors import SeifError  # noqa: E402
from seif.manifest import (  # noqa: E402
    Capacity,
    FFNSpec,
    LayerSpec,
    RoutingSpec,
    SharedExpertsSpec,
)
from seif.moe import moe_forward, random_layer_params  # noqa: E402

if not native.available():
    pytest.skip("libseif_ort.so with the C API is not built (run `make native`)",
                allow_module_level=True)

H, I, E = 48, 40, 16


def layer(routing: RoutingSpec, activation: str = "swiglu", *, bias: bool = False,
          shared: SharedExpertsSpec | None = None, e: int = E) -> LayerSpec:
    return LayerSpec(1, e, H, routing, FFNSpec(I, activation, bias), shared)


RENORM = RoutingSpec("topk", 2, "softmax", normalize="sum")
CASES = {
    "swiglu-renorm": layer(RENORM),
    "swiglu-bias": layer(RoutingSpec("topk", 3, "softmax"), bias=True),
    "geglu-top4": layer(RoutingSpec("topk", 4, "softmax", normalize="sum"), "geglu"),
    "swiglu_oai-bias": layer(RoutingSpec("topk", 2, "softmax_topk", router_bias=True),
                             "swiglu_oai", bias=True),
    "relu-ungated-bias": layer(RoutingSpec("topk", 2, "sigmoid", normalize="sum"), "relu",
                               bias=True),
    "gelu_tanh": layer(RENORM, "gelu_tanh"),
    "relu2": layer(RENORM, "relu2"),
    "weight-on-input": layer(RoutingSpec("topk", 1, "sigmoid_topk", weight_on="input"),
                             shared=SharedExpertsSpec(1, FFNSpec(24, "swiglu"))),
    "group_topk-shared": layer(RoutingSpec("group_topk", 3, "sigmoid", selection_bias=True,
                                           normalize="sum", epsilon=1e-20, scale=2.5,
                                           n_group=4, topk_group=2),
                               shared=SharedExpertsSpec(1, FFNSpec(32, "swiglu"), gate=True)),
    "capacity-passthrough": layer(RoutingSpec("topk", 2, "softmax", normalize="sum",
                                              capacity=Capacity(
                                                  factor=0.75, drop_policy="passthrough_scaled")),
                                  "silu"),
    "expert_choice": layer(RoutingSpec("expert_choice", 1, "softmax", scale=1.5,
                                       capacity=Capacity(factor=2.0)), "gelu"),
    "soft_moe": layer(RoutingSpec("soft_moe", 1, slots_per_expert=2), "swiglu"),
}


def bf16_exact(params):
    """The same parameters with every array rounded to bf16 and kept as float32."""
    def r(a):
        return None if a is None else a.astype(ml_dtypes.bfloat16).astype(np.float32)
    return dataclasses.replace(
        params, router_weight=r(params.router_weight), router_bias=r(params.router_bias),
        selection_bias=r(params.selection_bias), shared_gate=r(params.shared_gate),
        output_bias=r(params.output_bias),
        experts=[{k: r(v) for k, v in ex.items()} for ex in params.experts],
        shared=[{k: r(v) for k, v in ex.items()} for ex in params.shared])


def run(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).float().numpy()


def tokens(T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, H)).astype(np.float32)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "experts"])
@pytest.mark.parametrize("T", [3, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_native_matches_reference(case, dtype, T, whole):
    """T = 3: most of the 16 experts get no rows; T = 300: tens of rows per expert. "whole":
    the layer in one native call (seif_moe_forward, shared experts included); "experts":
    asking for the router logits keeps routing and shared experts in torch, the routed
    experts native (seif_moe_experts). Shared experts on the torch path round their rows to
    bf16 in bf16 layers: those cases are held to bf16 accuracy, all others to float32's."""
    spec = CASES[case]
    params = bf16_exact(random_layer_params(spec, np.random.default_rng(0)))
    module = st.SparseMoE.from_params(spec, params, dtype, native=True,
                                      return_router_logits=not whole)
    assert module.up_proj.dtype == dtype
    x = tokens(T)
    assert (module._whole_layer_inputs(torch.from_numpy(x)) is not None) == whole
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    got = (got if whole else got[0]).float().numpy()
    assert module.last_dispatch == "native"
    # the torch loop on float32 experts (bf16 experts there round rows to bf16: not exact)
    loop = st.SparseMoE.from_params(spec, params, torch.float32, grouped_mm=False)
    by_loop = run(loop, x)
    assert loop.last_dispatch.startswith("per_expert")
    want = moe_forward(x, spec, params)
    for other in (want, by_loop):
        if whole or dtype == torch.float32 or spec.shared_experts is None:
            np.testing.assert_allclose(got, other, rtol=1e-5,
                                       atol=1e-5 * float(np.abs(want).max()))
        else:
            assert np.linalg.norm(got - other) / np.linalg.norm(other) < 1e-2


def test_native_agrees_with_torch_bf16_dispatches():
    """bf16 experts: the torch dispatches round rows and hidden activations to bf16 before
    each matmul, the native one does not; they differ by bf16 rounding only."""
    spec = CASES["swiglu-renorm"]
    params = random_layer_params(spec, np.random.default_rng(3))
    x = tokens(64, seed=4)
    nat = run(st.SparseMoE.from_params(spec, params, torch.bfloat16), x)
    for grouped in (True, False):
        module = st.SparseMoE.from_params(spec, params, torch.bfloat16, grouped_mm=grouped)
        got = run(module, x)
        assert module.last_dispatch != "native"
        assert np.linalg.norm(got - nat) / np.linalg.norm(nat) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_is_independent_of_thread_count(dtype):
    """Two experts, 600 tokens, k = 1: about 300 rows each, more than one 256-row tile."""
    spec = layer(RoutingSpec("topk", 1, "softmax"), bias=True, e=2)
    params = bf16_exact(random_layer_params(spec, np.random.default_rng(5)))
    module = st.SparseMoE.from_params(spec, params, dtype)
    x = tokens(600, seed=6)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(run(module, x))
            assert module.last_dispatch == "native"
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    want = moe_forward(x, spec, params)
    np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_float16_experts():
    spec = CASES["swiglu-renorm"]
    params = random_layer_params(spec, np.random.default_rng(7), np.float16)
    module = st.SparseMoE.from_params(spec, params)
    assert module.up_proj.dtype == torch.float16
    x = tokens(37)
    got = run(module, x)
    assert module.last_dispatch == "native"
    want = moe_forward(x, spec, params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_gradients_use_the_torch_path():
    """Native has no backward: whenever autograd needs the experts, a torch dispatch runs and
    gradients flow; under no_grad the same module runs native again."""
    spec = CASES["swiglu-renorm"]
    module = st.SparseMoE.from_params(spec, random_layer_params(spec, np.random.default_rng(8)))
    x = torch.from_numpy(tokens(37))
    module.requires_grad_(True)
    y = module(x)
    assert module.last_dispatch != "native"
    y.sum().backward()
    assert module.up_proj.grad is not None and bool(module.up_proj.grad.abs().sum() > 0)
    module.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    module(xg).sum().backward()
    assert module.last_dispatch != "native" and xg.grad is not None
    with torch.no_grad():
        module(xg)
    assert module.last_dispatch == "native"
    module.native = True
    with pytest.raises(SeifError, match="gradient"):
        module(xg)


def test_missing_library_falls_back(monkeypatch):
    spec = CASES["swiglu-renorm"]
    params = random_layer_params(spec, np.random.default_rng(9))
    x = tokens(37)
    want = run(st.SparseMoE.from_params(spec, params), x)
    monkeypatch.setattr(native, "_library", lambda: None)
    assert not st.native_supported()
    module = st.SparseMoE.from_params(spec, params)
    got = run(module, x)
    assert module.last_dispatch in ("grouped_mm", "per_expert", "per_expert+onednn")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    forced = st.SparseMoE.from_params(spec, params, native=True)
    with pytest.raises(native.NativeError, match="make native"):
        run(forced, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_runs_a_single_token_natively(dtype):
    """Auto: one token (one row per chosen expert, a decode step) runs native too, in both
    dtypes (with the OpenMP build, measured faster than torch's GEMV there), and matches the
    reference."""
    spec = CASES["swiglu-renorm"]
    params = random_layer_params(spec, np.random.default_rng(14))
    module = st.SparseMoE.from_params(spec, params, dtype)
    x = tokens(1)
    got = run(module, x)
    assert module.last_dispatch == "native"
    torch_path = st.SparseMoE.from_params(spec, params, dtype, native=False)
    np.testing.assert_allclose(got, run(torch_path, x), rtol=2e-2 if dtype == torch.bfloat16
                               else 1e-5, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_settings_choose_the_dispatch(monkeypatch):
    spec = CASES["swiglu-renorm"]
    params = random_layer_params(spec, np.random.default_rng(10))
    x = tokens(37)

    def dispatch(**kwargs) -> str:
        module = st.SparseMoE.from_params(spec, params, **kwargs)
        run(module, x)
        return module.last_dispatch

    assert dispatch() == "native"
    assert dispatch(native=False) != "native"
    assert dispatch(grouped_mm=False).startswith("per_expert")   # an explicit torch dispatch
    assert dispatch(grouped_mm=True, native=True) == "native"
    assert dispatch(compute_dtype=torch.bfloat16) != "native"   # weights stay float32
    monkeypatch.setenv("SEIF_TORCH_NATIVE", "0")
    assert dispatch() != "native"
    assert dispatch(native=True) == "native"


def test_non_contiguous_weights():
    """Auto falls back to torch (same result); native=True refuses with a SeifError."""
    spec = CASES["swiglu-bias"]
    params = random_layer_params(spec, np.random.default_rng(11))
    x = tokens(37)
    want = moe_forward(x, spec, params)
    module = st.SparseMoE.from_params(spec, params)
    down = module.down_proj.data
    module.down_proj.data = down.transpose(1, 2).contiguous().transpose(1, 2)
    assert not module.down_proj.is_contiguous()
    got = run(module, x)
    assert module.last_dispatch != "native"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    module.native = True
    with pytest.raises(SeifError, match="contiguous"):
        run(module, x)


# --------------------------------------------------------------------------- the C API itself
def _arrays(dtype=np.float32, counts=(3, 0, 5, 2)):
    rng = np.random.default_rng(12)
    e, n = len(counts), sum(counts)
    return dict(
        x=rng.standard_normal((n, H)).astype(np.float32),
        counts=np.asarray(counts, np.int64),
        gate=(rng.standard_normal((e, I, H)) * 0.2).astype(dtype),
        up=(rng.standard_normal((e, I, H)) * 0.2).astype(dtype),
        down=(rng.standard_normal((e, H, I)) * 0.2).astype(dtype),
        out=np.zeros((n, H), np.float32))


def _call(a, **kwargs):
    v = native.View.of_numpy
    native.experts_forward(v(a["x"]), v(a["counts"]), v(a["up"]), v(a["down"]), v(a["out"]),
                           gate=None if a["gate"] is None else v(a["gate"]), **kwargs)


def test_c_api_matches_numpy():
    from seif.moe import activation
    a = _arrays()
    _call(a, threads=2)
    want, r = [], 0
    for e, c in enumerate(a["counts"]):
        xe = a["x"][r:r + c].astype(np.float64)
        r += c
        h = activation("swiglu", xe @ a["gate"][e].T.astype(np.float64),
                       xe @ a["up"][e].T.astype(np.float64))
        want.append(h @ a["down"][e].T.astype(np.float64))
    np.testing.assert_allclose(a["out"], np.concatenate(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.update(x=np.asfortranarray(a["x"])), "x is not contiguous"),
    (lambda a: a.update(x=a["x"].astype(np.float64)), "x is float64"),
    (lambda a: a.update(counts=a["counts"].astype(np.int32)), "counts is int32"),
    (lambda a: a.update(counts=a["counts"] + 1), "sum to N"),
    (lambda a: a.update(counts=np.array([3, -1, 6, 2], np.int64)), "sum to N"),
    (lambda a: a.update(down=a["down"].astype(ml_dtypes.bfloat16)), "down is bfloat16"),
    (lambda a: a.update(up=a["up"].astype(np.float64)), "float64"),
    (lambda a: a.update(out=a["out"][:-1]), r"out is \[9, 48\]"),
    (lambda a: a.update(gate=None), "gated activation needs gate"),
])
def test_c_api_refuses_bad_input(bad, match):
    a = _arrays()
    bad(a)
    with pytest.raises(native.NativeError, match=match):
        _call(a)


def test_c_api_refuses_bad_attributes():
    a = _arrays()
    with pytest.raises(native.NativeError, match="unknown activation"):
        _call(a, activation="swish")
    with pytest.raises(native.NativeError, match="ungated activation takes no gate"):
        _call(a, activation="relu")
    with pytest.raises(native.NativeError, match="limit must be > 0"):
        _call(a, activation="swiglu_oai", limit=0.0)
    _call(a)                                        # the error state does not stick
    assert native.available()


@pytest.mark.parametrize("mode", ["output", "input", "none"])
def test_c_api_gather_and_combine(mode):
    """seif_moe_experts == gather, seif_experts_forward, weight, index_add_ (in NumPy)."""
    a = _arrays()
    rng = np.random.default_rng(13)
    T = 4
    tokens = rng.integers(0, T, size=len(a["x"])).astype(np.int64)
    w = rng.random(len(tokens)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    gathered = x[tokens] * (w[:, None] if mode == "input" else 1)
    a["x"] = np.ascontiguousarray(gathered, np.float32)
    _call(a)
    want = np.zeros((T, H), np.float32)
    np.add.at(want, tokens, a["out"] * (w[:, None] if mode == "output" else 1))
    out = np.zeros((T, H), np.float32)
    v = native.View.of_numpy
    native.moe_experts(v(x), v(tokens), None if mode == "none" else v(w), v(a["counts"]),
                       v(a["up"]), v(a["down"]), v(out), weight_on_input=mode == "input",
                       gate=v(a["gate"]), threads=2)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    bad = np.array(tokens)
    bad[3] = T
    with pytest.raises(native.NativeError, match=r"token index 4 is not in \[0, 4\)"):
        native.moe_experts(v(x), v(bad), v(w), v(a["counts"]), v(a["up"]), v(a["down"]),
                           v(out), gate=v(a["gate"]))


# --------------------------------------------------------------------------- the whole layer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["swiglu-bias", "swiglu_oai-bias", "weight-on-input",
                                  "group_topk-shared", "capacity-passthrough", "expert_choice",
                                  "soft_moe"])
def test_whole_layer_is_the_onnx_operator(case, dtype):
    """Where forward runs the whole layer in one native call (seif_moe_forward), its output is
    the ai.seif.SeifMoE kernel's in ONNX Runtime bit for bit, routing and shared experts
    included: the model comes from the ONNX exporter (seif.converters.onnx.moe_model), its
    attributes from the node, not from the string the C API parses."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from seif.converters import onnx as sx
    from seif.runtime import library_path
    spec = CASES[case]
    params = bf16_exact(random_layer_params(spec, np.random.default_rng(20)))
    module = st.SparseMoE.from_params(spec, params, dtype)
    for name in ("router_weight", "router_bias", "shared_expert_gate"):  # the export's dtype
        t = getattr(module, name)
        if t is not None:
            t.data = t.data.to(dtype)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library_path()))
    model = sx.moe_model([(spec, params)], target="seif-kernels",
                         dtype="bf16" if dtype == torch.bfloat16 else None)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for T in (1, 37, 300):
        x = tokens(T, seed=21)
        got = run(module, x)
        assert module.last_dispatch == "native"
        assert got.tobytes() == sess.run(None, {"hidden_states": x})[0].tobytes()


@pytest.mark.parametrize("case", ["swiglu-renorm", "group_topk-shared", "expert_choice"])
def test_router_logits_keep_the_expert_call(case):
    """Asking for the router logits keeps the torch routing (the logits it returns are the ones
    it routed on) with the native experts (seif_moe_experts); both paths match the reference."""
    spec = CASES[case]
    params = bf16_exact(random_layer_params(spec, np.random.default_rng(22)))
    x = tokens(37, seed=23)
    want = moe_forward(x, spec, params)
    module = st.SparseMoE.from_params(spec, params, torch.float32, return_router_logits=True)
    with torch.no_grad():
        out, logits = module(torch.from_numpy(x))
    assert module.last_dispatch == "native" and tuple(logits.shape) == (37, spec.num_experts)
    whole = st.SparseMoE.from_params(spec, params, torch.float32)
    for got in (out.numpy(), run(whole, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_whole_layer_falls_back_where_the_operator_cannot_run():
    """An output bias (not part of SeifMoE) or a batch of sequences routed with capacity keep
    the per-call routing in torch; results still match the reference."""
    spec = dataclasses.replace(CASES["capacity-passthrough"], output_bias=True)
    params = random_layer_params(spec, np.random.default_rng(24))
    module = st.SparseMoE.from_params(spec, params, torch.float32)
    x = tokens(2 * 19, seed=25)
    assert module._whole_layer_inputs(torch.from_numpy(x)) is None
    got = run(module, x)
    assert module.last_dispatch == "native"      # the experts' call
    want = moe_forward(x, spec, params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    plain = dataclasses.replace(spec, output_bias=False)
    module = st.SparseMoE.from_params(plain, dataclasses.replace(params, output_bias=None))
    assert module._whole_layer_inputs(torch.from_numpy(x)) is not None
    assert module._whole_layer_inputs(torch.from_numpy(x).reshape(2, 19, H)) is None


def _operator_views(spec, params):
    module = st.SparseMoE.from_params(spec, params, torch.float32)
    tensors = module._operator_inputs(st._OPERATOR_INPUTS)
    return module, tensors, {k: st._view(t) for k, t in tensors.items() if t is not None}


@pytest.mark.parametrize("attrs, match", [
    ({"kind": "topk", "top_kk": 2}, "unknown name 'top_kk'"),
    ({"kind": "topk", "top_k": "two"}, "top_k=two is not an integer"),
    ({"kind": "topk", "top_k": 2, "scale": "x1"}, "scale=x1 is not a number"),
    ({"kind": "best"}, "best"),
    ({"kind": "topk", "top_k": 0}, "top_k must be >= 1"),
    ({"kind": "topk", "top_k": 2, "activation": "swish"}, "swish"),
])
def test_c_api_moe_forward_refuses_bad_attributes(attrs, match):
    spec = CASES["swiglu-renorm"]
    params = random_layer_params(spec, np.random.default_rng(26))
    module, tensors, views = _operator_views(spec, params)
    x = torch.from_numpy(tokens(5))
    out = torch.empty_like(x)
    views["hidden_states"] = st._view(x)
    with pytest.raises(native.NativeError, match=match):
        native.moe_forward(attrs, views, st._view(out))
    native.moe_forward(module._native_attributes(), views, st._view(out))  # still works
    np.testing.assert_allclose(out.numpy(), moe_forward(x.numpy(), spec, params),
                               rtol=1e-5, atol=1e-5)


def test_c_api_moe_forward_refuses_bad_inputs():
    spec = CASES["swiglu-renorm"]
    module, tensors, views = _operator_views(spec, random_layer_params(
        spec, np.random.default_rng(27)))
    attrs = module._native_attributes()
    x = torch.from_numpy(tokens(5))
    out = torch.empty_like(x)
    with pytest.raises(native.NativeError, match="hidden_states"):
        native.moe_forward(attrs, views, st._view(out))
    views["hidden_states"] = st._view(x)
    short = dict(views, down_proj=st._view(tensors["down_proj"][:, :-1].contiguous()))
    with pytest.raises(native.NativeError, match="down_proj is"):
        native.moe_forward(attrs, short, st._view(out))
    with pytest.raises(native.NativeError, match="unknown SeifMoE inputs"):
        native.moe_forward(attrs, dict(views, gate=views["gate_proj"]), st._view(out))
    with pytest.raises(native.NativeError, match="out is"):
        native.moe_forward(attrs, views, st._view(out[:-1]))
    mixed = dict(views, up_proj=st._view(tensors["up_proj"].to(torch.bfloat16)))
    with pytest.raises(native.NativeError, match="up_proj is bfloat16"):
        native.moe_forward(attrs, mixed, st._view(out))
