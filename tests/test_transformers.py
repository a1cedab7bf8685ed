"""transformers <-> SEIF, verified against transformers' own MoE blocks (no downloads).

For each supported family: build a tiny random model from its config class, save_pretrained,
convert through the registry, and check, for every MoE layer, that the SEIF reference forward
equals transformers' MoE block forward (fp32, max abs error <= 1e-5) with the same experts
selected; then HF -> SEIF -> HF must give byte-identical tensors, an equal config and bitwise
equal logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

import seif  # noqa: E402
import seif.convert  # noqa: E402
from seif.errors import ConversionError  # noqa: E402
from seif.moe import moe_forward  # noqa: E402
from seif.routing import route, router_logits  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)

# model_type -> (config kwargs, attribute of the MoE block inside a decoder layer[, options])
# options: "layers" (model -> decoder layers), "route" ((block, x) -> (weights, indices) from
# transformers' own router), "shared" (decoder-layer attribute of a shared MLP that lives outside
# the MoE block and is added to its output).
_ROUTER = {"route": lambda b, x: b.router(x)[1:]}
FAMILY_CONFIGS = {
    "mixtral": (dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
                "mlp"),  # on disk: block_sparse_moe
    "qwen2_moe": (dict(intermediate_size=48, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]), "mlp"),
    "qwen3_moe": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                       num_experts_per_tok=3, norm_topk_prob=False, head_dim=8,
                       decoder_sparse_step=1, mlp_only_layers=[]), "mlp"),
    "olmoe": (dict(intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                   norm_topk_prob=False), "mlp"),
    "deepseek_v3": (dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                         first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                         q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                         num_key_value_heads=4), "mlp"),
    "glm4_moe": (dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                      first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=False,
                      head_dim=8), "mlp"),
    "deepseek_v2": (dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                         topk_method="group_limited_greedy", first_k_dense_replace=1,
                         routed_scaling_factor=2.0, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                         num_key_value_heads=4), "mlp"),
}
FAMILY_CONFIGS.update({
    "granitemoe": (dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
                   "block_sparse_moe", _ROUTER),
    "granitemoeshared": (dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=3,
                              shared_intermediate_size=24), "block_sparse_moe",
                         {**_ROUTER, "shared": "shared_mlp"}),
    # A low swiglu_limit (and a non-default alpha) so the clamps really bite on random data.
    "gpt_oss": (dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                     head_dim=8, swiglu_limit=1.5, swiglu_alpha=1.3), "mlp", _ROUTER),
    "phimoe": (dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
                    router_jitter_noise=0.2), "mlp", _ROUTER),
    "jamba": (dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                   num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                   expert_layer_period=2, expert_layer_offset=0, mamba_d_state=4,
                   mamba_dt_rank=4), "feed_forward", _ROUTER),
    "dbrx": (dict(d_model=32, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                  ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 6, "moe_top_k": 3,
                              "moe_normalize_expert_weights": 2.0}), "ffn",
             {"layers": lambda m: m.transformer.blocks,
              "route": lambda b, x: b.route_tokens_to_experts(b.router(x))}),
    "ernie4_5_moe": (dict(intermediate_size=48, moe_intermediate_size=16, moe_num_experts=6,
                          moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1), "mlp"),
    "llama4_text": (dict(intermediate_size=16, intermediate_size_mlp=48, num_local_experts=6,
                         num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=2),
                    "feed_forward", {"route": lambda b, x: _llama4_route(b, x)}),
    # Encoder-decoder; 4 experts with capacity 8 for 48 tokens: tokens really are dropped.
    "switch_transformers": (dict(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                                 num_decoder_layers=3, num_sparse_encoder_layers=2,
                                 num_sparse_decoder_layers=1, num_experts=4, expert_capacity=8,
                                 router_bias=True), "mlp",
                            {"auto": "AutoModelForSeq2SeqLM",
                             "layers": lambda m: [b.layer[1] for b in m.encoder.block]
                             + [b.layer[2] for b in m.decoder.block],
                             "route": lambda b, x: _switch_route(b, x)}),
})
FAMILY_CONFIGS["deepseek_v2-greedy"] = (
    {**FAMILY_CONFIGS["deepseek_v2"][0], "topk_method": "greedy", "n_group": None,
     "topk_group": None}, "mlp")
FAMILIES = sorted(FAMILY_CONFIGS)
T = 48


def _llama4_route(block, x):
    scores, logits = block.router(x)          # scores [T, E]: sigmoid of the k, 0 elsewhere
    idx = torch.topk(logits, block.top_k, dim=-1).indices
    return torch.gather(scores, -1, idx), idx


def _switch_route(block, x):
    """Top-1 from the router's logits and probability; dropped tokens (capacity) get index -1,
    which the test maps to SEIF's `kept` mask."""
    dispatch, probs, logits = block.router(x[None])
    idx = torch.argmax(logits[0], dim=-1, keepdim=True)
    kept = dispatch[0].sum(-1, keepdim=True) > 0
    return probs[0], torch.where(kept, idx, -1)


def options(model_type: str) -> dict:
    entry = FAMILY_CONFIGS[model_type]
    return entry[2] if len(entry) > 2 else {}


def build(model_type: str, path: Path, *, dtype=torch.float32, seed: int = 0, **save_kwargs):
    """A tiny random model of `model_type`, saved to `path`. Weights are re-drawn with a larger
    scale than the default init so routing is decided by clear margins, and DeepSeek's
    e_score_correction_bias (zeros at init) is random so the selection bias matters."""
    torch.manual_seed(seed)
    kwargs = FAMILY_CONFIGS[model_type][0]
    config = transformers.AutoConfig.for_model(model_type.split("-")[0], **{**COMMON, **kwargs})
    auto = getattr(transformers, options(model_type).get("auto", "AutoModelForCausalLM"))
    model = auto.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return model


def decoder_layers(model, model_type: str):
    return options(model_type).get("layers", lambda m: m.model.layers)(model)


def moe_block(model, model_type: str, layer: int):
    return getattr(decoder_layers(model, model_type)[layer], FAMILY_CONFIGS[model_type][1])


def hf_moe_output(model, model_type: str, layer: int, x: np.ndarray) -> np.ndarray:
    """transformers' own MoE block (plus a shared MLP outside it) on x [T, H], as [T, H]."""
    xt = torch.from_numpy(x)[None]
    with torch.no_grad():
        y = moe_block(model, model_type, layer)(xt)
        y = (y[0] if isinstance(y, tuple) else y).reshape(x.shape[0], -1)
        shared = options(model_type).get("shared")
        if shared:
            y = y + getattr(decoder_layers(model, model_type)[layer], shared)(xt).reshape(
                x.shape[0], -1)
    return y.numpy()


def hf_route(model, model_type: str, layer: int, x: np.ndarray):
    """(weights [T, k], indices [T, k]) from transformers' own router."""
    block = moe_block(model, model_type, layer)
    route_fn = options(model_type).get("route", lambda b, x: b.gate(x)[1:])
    with torch.no_grad():
        w, idx = route_fn(block, torch.from_numpy(x))
    return w.numpy(), idx.numpy()


def read_all(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor of a transformers directory as (dtype, shape, raw bytes)."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
        if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(path / f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                out[k] = (str(t.dtype), list(t.shape), t.contiguous().view(torch.uint8).numpy()
                          .tobytes())
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = build(model_type, root / "hf")
    out = seif.convert.convert(root / "hf", root / "model.seif")
    return model_type, model, root, out


def test_every_moe_layer_matches_transformers(converted):
    model_type, model, root, out = converted
    ckpt = seif.open(out)
    m = ckpt.manifest
    assert m.model.source_framework == "transformers"
    assert m.model.model_type == model_type.split("-")[0]
    assert m.model.source_config == json.loads((root / "hf" / "config.json").read_text())
    expected = [i for i in range(len(decoder_layers(model, model_type)))
                if hasattr(moe_block(model, model_type, i), "experts")]
    assert [layer.index for layer in m.layers] == expected and expected
    rng = np.random.default_rng(1)
    for layer in m.layers:
        x = rng.standard_normal((T, layer.hidden_size)).astype(np.float32)
        want = hf_moe_output(model, model_type, layer.index, x)
        hf_weights, hf_idx = hf_route(model, model_type, layer.index, x)
        params = ckpt.moe_params(layer.index)
        got = moe_forward(x, layer, params)
        err = float(np.max(np.abs(got - want)))
        assert err <= 1e-5, f"{model_type} layer {layer.index}: max abs err {err}"
        res = route(router_logits(x, params.router_weight, params.router_bias), layer.routing,
                    params.selection_bias)
        if layer.routing.capacity is not None:       # dropped: -1 on the HF side
            assert (~res.kept).any(), "capacity never drops a token: not exercised"
            res.indices = np.where(res.kept, res.indices, -1)
        order_hf = np.argsort(hf_idx, axis=-1)
        order_seif = np.argsort(res.indices, axis=-1)
        np.testing.assert_array_equal(np.take_along_axis(hf_idx, order_hf, -1),
                                      np.take_along_axis(res.indices, order_seif, -1))
        np.testing.assert_allclose(np.take_along_axis(hf_weights, order_hf, -1),
                                   np.take_along_axis(res.weights, order_seif, -1),
                                   rtol=0, atol=1e-6)
        # Source names are kept for the way back.
        assert m.tensors[layer.router_name()].source_name.endswith(".weight")


def test_round_trip_is_byte_identical(converted):
    model_type, model, root, out = converted
    back = seif.convert.convert(out, root / "back", target_format="transformers")
    a, b = read_all(root / "hf"), read_all(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((root / "hf" / "config.json").read_text())
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 12), generator=gen)
    auto = getattr(transformers, options(model_type).get("auto", "AutoModelForCausalLM"))
    kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        m1 = auto.from_pretrained(root / "hf").eval()
        m2 = auto.from_pretrained(back).eval()
        l0, l1, l2 = model(ids, **kw).logits, m1(ids, **kw).logits, m2(ids, **kw).logits
    assert torch.equal(l1, l2)
    assert torch.equal(l0, l2)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss", "dbrx"])
def test_bf16_sharded_round_trip(tmp_path, model_type):
    """bf16 bytes pass through bit-exactly, from a sharded checkpoint with an index; stacked
    experts (gpt-oss: transposed and interleaved, DBRX: flat) are split and re-stacked exactly."""
    build(model_type, tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    out = seif.convert.convert(tmp_path / "hf", tmp_path / "m.seif")
    ckpt = seif.open(out)
    assert ckpt.info("layers.1.experts.0.gate.weight").dtype == "BF16"
    back = seif.convert.convert(out, tmp_path / "back", target_format="transformers")
    a, b = read_all(tmp_path / "hf"), read_all(back)
    assert a == b


def test_unsupported_family_is_refused(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "made_up_moe",
                                                 "architectures": ["MadeUpMoeForCausalLM"]}))
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConversionError, match="made_up_moe.*not supported yet.*mixtral"):
        seif.convert.convert(src, tmp_path / "out.seif")
    assert not (tmp_path / "out.seif").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("model_type,edit,match", [
    ("gpt_oss", {"quantization_config": {"quant_method": "mxfp4"}}, "MXFP4.*not implemented"),
    ("phimoe", {"num_experts_per_tok": 3}, "always picks exactly 2"),
    ("ernie4_5_moe", {"use_bias": True}, "use_bias=True is not supported"),
])
def test_unsupported_config_is_refused(tmp_path, model_type, edit, match):
    build(model_type, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ConversionError, match=match):
        seif.convert.convert(tmp_path / "hf", tmp_path / "out.seif")
    assert not (tmp_path / "out.seif").exists()


def test_stacked_shape_mismatch_is_refused(tmp_path):
    """A stacked tensor whose shape disagrees with the config is refused, not mis-split."""
    build("granitemoe", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 8
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="input_linear.*config implies"):
        seif.convert.convert(tmp_path / "hf", tmp_path / "out.seif")


def test_dense_layer_with_expert_tensors_is_refused(tmp_path):
    """A config that disagrees with the tensors is an error, never a silent mis-mapping."""
    build("qwen3_moe", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["mlp_only_layers"] = [1]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="layer 1 should be dense"):
        seif.convert.convert(tmp_path / "hf", tmp_path / "out.seif")
    assert not (tmp_path / "out.seif").exists()


def test_module_import_needs_no_torch():
    import subprocess
    import sys
    code = ("import sys, seif.converters.transformers as t; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "print(t.supported_families())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mixtral" in out.stdout
