"""seif.converters.torch.SparseMoE against the NumPy reference (seif.moe.moe_forward), and
replace_moe_blocks on tiny transformers models (built from config classes, no downloads)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import build_tiny_hf  # noqa: E402
from seif.converters import torch as st  # noqa: E402

import seif  # noqa: E402
import seif.routing  # noqa: E402
from seif.manifest import (  # noqa: E402
    Capacity,
    FFNSpec,
    LayerSpec,
    RoutingSpec,
    SharedExpertsSpec,
)
from seif.moe import moe_forward, random_layer_params  # noqa: E402

H, I, E = 32, 16, 8


def layer(routing: RoutingSpec, activation: str = "swiglu", *, bias: bool = False,
          shared: SharedExpertsSpec | None = None, h: int = H, i: int = I, e: int = E,
          index: int = 3) -> LayerSpec:
    return LayerSpec(index, e, h, routing, FFNSpec(i, activation, bias), shared)


CASES = {
    "mixtral": layer(RoutingSpec("topk", 2, "softmax", normalize="sum")),
    "olmoe-geglu": layer(RoutingSpec("topk", 3, "softmax"), "geglu"),
    "deepseek_v3": layer(RoutingSpec("group_topk", 3, "sigmoid", selection_bias=True,
                                     normalize="sum", epsilon=1e-20, scale=2.5, n_group=4,
                                     topk_group=2, group_score="top2_sum",
                                     group_mask="neg_inf"),
                         shared=SharedExpertsSpec(1, FFNSpec(32, "swiglu"))),
    "deepseek_v2": layer(RoutingSpec("group_topk", 3, "softmax", scale=2.0, n_group=4,
                                     topk_group=2, group_score="max", group_mask="zero")),
    "gpt_oss": layer(RoutingSpec("topk", 2, "softmax_topk", router_bias=True), "swiglu_oai",
                     bias=True),
    "llama4": layer(RoutingSpec("topk", 1, "sigmoid_topk", weight_on="input"),
                    shared=SharedExpertsSpec(1, FFNSpec(24, "swiglu"))),
    "phimoe": layer(RoutingSpec("sparse_mixer", 2, jitter_eps=0.01)),
    "dbrx-lp": layer(RoutingSpec("topk", 2, "softmax", normalize="lp", norm_p=2.0),
                     "geglu_tanh"),
    "ernie-clamp": layer(RoutingSpec("topk", 2, "softmax", selection_bias=True,
                                     normalize="sum", epsilon=1e-12, epsilon_rule="clamp"),
                         shared=SharedExpertsSpec(2, FFNSpec(16, "swiglu"), gate=True)),
    "switch-capacity": layer(RoutingSpec("topk", 1, "softmax",
                                         capacity=Capacity(tokens=3)), "relu", bias=True),
    "capacity-passthrough": layer(RoutingSpec("topk", 2, "softmax", normalize="sum",
                                              capacity=Capacity(factor=0.75,
                                                                drop_policy="passthrough_scaled")),
                                  "gelu"),
    "expert_choice": layer(RoutingSpec("expert_choice", 1, "softmax", scale=1.5,
                                       capacity=Capacity(factor=2.0)), "silu"),
    "expert_choice-input": layer(RoutingSpec("expert_choice", 1, "sigmoid", weight_on="input",
                                             capacity=Capacity(tokens=5)), "gelu_tanh"),
    "soft_moe": layer(RoutingSpec("soft_moe", 1, slots_per_expert=2), "relu2"),
    "qwen2-shared-gate": layer(RoutingSpec("topk", 4, "softmax", normalize="sum"),
                               shared=SharedExpertsSpec(1, FFNSpec(24, "swiglu"), gate=True)),
    "odd-sizes": layer(RoutingSpec("topk", 2, "softmax"), "swiglu", bias=True, h=18, i=10,
                       e=5),
    # SEIF 1.1 output bias (JetMoE), after a gated shared expert
    "jetmoe-output-bias": dataclasses.replace(
        layer(RoutingSpec("topk", 2, "softmax_topk"),
              shared=SharedExpertsSpec(1, FFNSpec(16, "swiglu"), gate=True)), output_bias=True),
}


def build(spec: LayerSpec, seed: int = 0, dtype=np.float32):
    params = random_layer_params(spec, np.random.default_rng(seed), dtype)
    return params


def run(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("grouped", [None, True, False], ids=["auto", "grouped", "loop"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, grouped):
    spec = CASES[case]
    params = build(spec)
    module = st.SparseMoE.from_params(spec, params, grouped_mm=grouped)
    x = np.random.default_rng(1).standard_normal((37, spec.hidden_size)).astype(np.float32)
    got = run(module, x)
    want = moe_forward(x, spec, params)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if grouped is None and st.native_supported():   # auto: libseif_ort.so's kernels, if built
        assert module.last_dispatch == "native"
    elif grouped is False or case == "odd-sizes" \
            or not st.grouped_mm_supported("cpu", torch.float32):
        assert module.last_dispatch in ("per_expert", "per_expert+onednn")
    else:                                  # these experts are tiny: one grouped call wins
        assert module.last_dispatch == "grouped_mm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3, 200])
def test_auto_dispatch_on_larger_experts(dtype, tokens):
    """Experts over GROUPED_MAX_EXPERT_ELEMENTS: auto takes the per-expert loop for float32
    experts with ONEDNN_MIN_ROWS+ rows on average (oneDNN), bf16 with LOOP_MIN_ROWS+, else
    torch._grouped_mm; all dispatches agree with each other and (fp32) with the reference.
    native=False: the choice between the torch dispatches (test_torch_native covers native)."""
    spec = layer(RoutingSpec("topk", 2, "softmax", normalize="sum"), h=256, i=512, e=4)
    assert spec.experts.intermediate_size * spec.hidden_size > st.GROUPED_MAX_EXPERT_ELEMENTS
    params = build(spec, seed=7)
    x = torch.from_numpy(
        np.random.default_rng(8).standard_normal((tokens, 256)).astype(np.float32)).to(dtype)
    outs = {}
    for grouped in (None, True, False):
        module = st.SparseMoE.from_params(spec, params, dtype, grouped_mm=grouped, native=False)
        outs[grouped] = module(x).float().numpy()
        if grouped is None:
            auto = module.last_dispatch
        if grouped is False:       # 2 tokens per expert on average at T=200 (k=2, E=4): 100
            onednn = dtype == torch.float32 and tokens == 200 \
                and st.onednn_linear_supported("cpu", dtype)
            assert module.last_dispatch == ("per_expert+onednn" if onednn else "per_expert")
    if not st.grouped_mm_supported("cpu", dtype):
        assert auto.startswith("per_expert")
    elif tokens == 200:             # 100 rows per expert: the loop, oneDNN in fp32
        onednn = dtype == torch.float32 and st.onednn_linear_supported("cpu", dtype)
        assert auto == ("per_expert+onednn" if onednn else "per_expert")
    else:
        assert auto == "grouped_mm"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for out in outs.values():
        np.testing.assert_allclose(out, outs[False], rtol=0, atol=tol)
    if dtype == torch.float32:
        np.testing.assert_allclose(outs[None], moe_forward(x.numpy(), spec, params), rtol=0,
                                   atol=1e-5)


def test_onednn_linear_matches_f_linear():
    if not st.onednn_linear_supported("cpu", torch.float32):
        pytest.skip("oneDNN linear not available in this torch")
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((5, 64), (48, 64), (48,)))
    for bias in (None, b):
        torch.testing.assert_close(st._linear(x, w, bias, True), torch.nn.functional.linear(
            x, w, bias), rtol=1e-5, atol=1e-5)


def test_token_choice_routing_matches_reference():
    for case in ("mixtral", "deepseek_v3", "deepseek_v2", "gpt_oss", "phimoe", "dbrx-lp",
                 "ernie-clamp", "switch-capacity", "capacity-passthrough"):
        spec = CASES[case]
        params = build(spec, seed=4)
        module = st.SparseMoE.from_params(spec, params)
        x = np.random.default_rng(5).standard_normal((50, H)).astype(np.float32)
        idx, w, kept = module.route(torch.from_numpy(x))
        res = seif.routing.route(seif.routing.router_logits(x, params.router_weight,
                                                            params.router_bias),
                                 spec.routing, params.selection_bias)
        np.testing.assert_array_equal(idx.numpy(), res.indices, err_msg=case)
        np.testing.assert_array_equal(kept.numpy(), res.kept, err_msg=case)
        np.testing.assert_allclose(w.numpy(), res.weights, rtol=0, atol=1e-6, err_msg=case)


@pytest.mark.parametrize("case", ["mixtral", "switch-capacity", "expert_choice", "soft_moe"])
def test_batched_input(case):
    """[B, S, H]: token routing is per token; coupled kinds route each sequence alone."""
    spec = CASES[case]
    params = build(spec)
    module = st.SparseMoE.from_params(spec, params)
    x = np.random.default_rng(2).standard_normal((3, 11, H)).astype(np.float32)
    got = run(module, x)
    assert got.shape == x.shape
    want = np.stack([moe_forward(x[b], spec, params) for b in range(3)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_empty_batch(case):
    spec = CASES[case]
    module = st.SparseMoE.from_params(spec, build(spec))
    for shape in ((0, spec.hidden_size), (2, 0, spec.hidden_size)):
        out = run(module, np.zeros(shape, np.float32))
        assert out.shape == shape


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3", "gpt_oss", "expert_choice"])
def test_bf16_weights(case):
    """bf16 experts run in bf16, the router in float32 on the same bf16 values: the routing is
    the reference's exactly, the output close to the reference on the upcast weights."""
    import ml_dtypes

    spec = CASES[case]
    params = build(spec, dtype=ml_dtypes.bfloat16)
    module = st.SparseMoE.from_params(spec, params)
    assert module.up_proj.dtype == torch.bfloat16 and module.router_weight.dtype == torch.bfloat16
    x = np.random.default_rng(3).standard_normal((40, H)).astype(np.float32)
    got = run(module, x)
    want = moe_forward(x, spec, params)                  # reference upcasts bf16 to float32
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) <= 3e-2 * scale
    if spec.routing.kind != "expert_choice":
        idx, _, _ = module.route(torch.from_numpy(x))
        res = seif.routing.route(seif.routing.router_logits(x, params.router_weight,
                                                            params.router_bias),
                                 spec.routing, params.selection_bias)
        np.testing.assert_array_equal(idx.numpy(), res.indices)
    # bf16 hidden states in, bf16 out
    with torch.no_grad():
        out = module(torch.from_numpy(x).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3", "deepseek_v2", "gpt_oss",
                                  "ernie-clamp"])
def test_ties_go_to_the_lowest_index(case):
    """All-equal logits (zero router): the k lowest experts, in order, for every token."""
    spec = CASES[case]
    params = build(spec)
    params.router_weight = np.zeros_like(params.router_weight)
    if params.router_bias is not None:
        params.router_bias = np.zeros_like(params.router_bias)
    if params.selection_bias is not None:
        params.selection_bias = np.zeros_like(params.selection_bias)
    module = st.SparseMoE.from_params(spec, params)
    x = np.random.default_rng(0).standard_normal((300, H)).astype(np.float32)
    idx, _, _ = module.route(torch.from_numpy(x))
    k = spec.routing.top_k
    assert (idx.numpy() == np.arange(k)).all()
    np.testing.assert_allclose(run(module, x), moe_forward(x, spec, params), rtol=0, atol=1e-5)


def test_expert_choice_ties_go_to_the_lowest_token():
    spec = CASES["expert_choice-input"]
    params = build(spec)
    params.router_weight = np.zeros_like(params.router_weight)
    module = st.SparseMoE.from_params(spec, params)
    x = np.random.default_rng(0).standard_normal((20, H)).astype(np.float32)
    np.testing.assert_allclose(run(module, x), moe_forward(x, spec, params), rtol=0, atol=1e-5)
    # capacity 5, every expert picks tokens 0..4, the rest get nothing routed
    assert np.all(run(module, x)[5:] == 0)


def test_topk_lowest_index_order():
    nan, inf = float("nan"), float("inf")
    v = torch.tensor([[0.0, -0.0, nan, 1.0, nan, inf, -inf, 1.0],
                      [-0.0, 0.0, 0.0, -0.0, 2.0, 2.0, -1.0, -inf]])
    got = st.topk_lowest_index(v, 8).tolist()
    assert got[0] == [2, 4, 5, 3, 7, 0, 1, 6]
    assert got[1] == [4, 5, 0, 1, 2, 3, 6, 7]
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4, (200, 64)).astype(np.float32)      # heavy ties
    many[rng.random(many.shape) < 0.05] = np.nan
    many[rng.random(many.shape) < 0.1] *= -1.0                   # -0.0 among the zeros
    np.testing.assert_array_equal(st.topk_lowest_index(torch.from_numpy(many), 9).numpy(),
                                  seif.routing.topk_lowest_index(many, 9))


def test_nan_token_is_not_hidden():
    spec = CASES["mixtral"]
    params = build(spec)
    module = st.SparseMoE.from_params(spec, params)
    x = np.random.default_rng(0).standard_normal((4, H)).astype(np.float32)
    x[1, 0] = np.nan
    got, want = run(module, x), moe_forward(x, spec, params)
    assert np.isnan(got[1]).all() and np.isnan(want[1]).all()
    np.testing.assert_allclose(got[[0, 2, 3]], want[[0, 2, 3]], rtol=0, atol=1e-5)


def test_from_checkpoint_and_load_layer(tmp_path):
    import ml_dtypes

    spec = CASES["deepseek_v3"]
    params = build(spec, dtype=ml_dtypes.bfloat16)
    seif.save(tmp_path / "m.seif", params.to_tensors(spec), [spec])
    module = st.load_layer(tmp_path / "m.seif", spec.index)
    assert module.up_proj.dtype == torch.bfloat16
    f32 = st.SparseMoE.from_checkpoint(tmp_path / "m.seif", spec.index, dtype="f32")
    assert f32.up_proj.dtype == torch.float32
    x = np.random.default_rng(0).standard_normal((16, H)).astype(np.float32)
    np.testing.assert_allclose(run(f32, x), moe_forward(x, spec, params), rtol=0, atol=1e-5)
    with pytest.raises(seif.SeifError):
        module(torch.zeros(4, H + 1))
    # experts cast to bf16, the float32 router kept as stored
    params32 = build(spec)
    seif.save(tmp_path / "f32.seif", params32.to_tensors(spec), [spec])
    mixed = st.load_layer(tmp_path / "f32.seif", spec.index, dtype=torch.bfloat16)
    assert mixed.up_proj.dtype == torch.bfloat16
    assert mixed.router_weight.dtype == torch.float32
    assert mixed.selection_bias.dtype == torch.float32
    idx, _, _ = mixed.route(torch.from_numpy(x))
    res = seif.routing.route(seif.routing.router_logits(x, params32.router_weight),
                             spec.routing, params32.selection_bias)
    np.testing.assert_array_equal(idx.numpy(), res.indices)


# --------------------------------------------------------------------------- transformers
transformers_cases = {
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                        first_k_dense_replace=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                        num_key_value_heads=4),
    # families whose decoder layer expects (hidden, router output) from the block, or adds a
    # shared MLP kept outside the block: run when the converter's table has them
    "gpt_oss": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                    head_dim=8),
    "llama4_text": dict(intermediate_size=16, intermediate_size_mlp=48, num_local_experts=6,
                        num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=2),
    "granitemoeshared": dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=3,
                             shared_intermediate_size=24),
    # JetMoeMoE ends with its own bias: SparseMoE's SEIF 1.1 output_bias
    "jetmoe": dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
                   kv_channels=8),
}
COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


@pytest.mark.parametrize("model_type", sorted(transformers_cases))
def test_replace_moe_blocks(model_type, tmp_path):
    pytest.importorskip("transformers")
    from seif.converters.transformers import FAMILIES

    import seif.convert

    if model_type not in FAMILIES:
        pytest.skip(f"{model_type} is not in the transformers converter's table")

    model = build_tiny_hf(model_type, tmp_path / "hf", {**COMMON, **transformers_cases[model_type]})
    out = seif.convert.convert(tmp_path / "hf", tmp_path / "m.seif")
    ids = torch.randint(0, COMMON["vocab_size"], (2, 12), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        replaced = st.replace_moe_blocks(model, out)
        after = model(ids).logits
    want = [layer.index for layer in seif.open(out).layers]
    assert len(replaced) == len(want) >= 1
    for l, name in zip(want, replaced):
        assert isinstance(model.get_submodule(name), st.SparseMoE)
        assert f".{l}." in name
        module = model.get_submodule(name)
        assert module.return_router_logits == (model_type in ("gpt_oss", "llama4_text"))
        if model_type == "granitemoeshared":     # its decoder layer adds the shared MLP itself
            assert module.spec.shared_experts is None
    err = float((after - before).abs().max())
    assert err <= 1e-5, err
    assert not torch.equal(before, torch.zeros_like(before))
