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

# model_type -> (config kwargs, attribute path of the MoE block inside a decoder layer)
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
FAMILY_CONFIGS["deepseek_v2-greedy"] = (
    {**FAMILY_CONFIGS["deepseek_v2"][0], "topk_method": "greedy", "n_group": None,
     "topk_group": None}, "mlp")
FAMILIES = sorted(FAMILY_CONFIGS)
T = 48


def build(model_type: str, path: Path, *, dtype=torch.float32, seed: int = 0, **save_kwargs):
    """A tiny random model of `model_type`, saved to `path`. Weights are re-drawn with a larger
    scale than the default init so routing is decided by clear margins, and DeepSeek's
    e_score_correction_bias (zeros at init) is random so the selection bias matters."""
    torch.manual_seed(seed)
    kwargs, _ = FAMILY_CONFIGS[model_type]
    config = transformers.AutoConfig.for_model(model_type.split("-")[0], **{**COMMON, **kwargs})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return model


def moe_block(model, model_type: str, layer: int):
    return getattr(model.model.layers[layer], FAMILY_CONFIGS[model_type][1])


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
    expected = [i for i, layer in enumerate(model.model.layers)
                if hasattr(moe_block(model, model_type, i), "experts")]
    assert [layer.index for layer in m.layers] == expected and expected
    rng = np.random.default_rng(1)
    for layer in m.layers:
        block = moe_block(model, model_type, layer.index)
        x = rng.standard_normal((T, layer.hidden_size)).astype(np.float32)
        with torch.no_grad():
            want = block(torch.from_numpy(x)[None]).reshape(T, -1).numpy()
            _, hf_weights, hf_idx = block.gate(torch.from_numpy(x))
        params = ckpt.moe_params(layer.index)
        got = moe_forward(x, layer, params)
        err = float(np.max(np.abs(got - want)))
        assert err <= 1e-5, f"{model_type} layer {layer.index}: max abs err {err}"
        res = route(router_logits(x, params.router_weight, params.router_bias), layer.routing,
                    params.selection_bias)
        order_hf = np.argsort(hf_idx.numpy(), axis=-1)
        order_seif = np.argsort(res.indices, axis=-1)
        np.testing.assert_array_equal(np.take_along_axis(hf_idx.numpy(), order_hf, -1),
                                      np.take_along_axis(res.indices, order_seif, -1))
        np.testing.assert_allclose(np.take_along_axis(hf_weights.numpy(), order_hf, -1),
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
    with torch.no_grad():
        m1 = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
        m2 = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
        l0, l1, l2 = model(ids).logits, m1(ids).logits, m2(ids).logits
    assert torch.equal(l1, l2)
    assert torch.equal(l0, l2)


def test_bf16_sharded_round_trip(tmp_path):
    """bf16 bytes pass through bit-exactly, from a sharded checkpoint with an index."""
    build("deepseek_v3", tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="40KB")
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
