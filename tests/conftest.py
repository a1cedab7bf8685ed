"""Shared fixtures: tiny checkpoints built from a seed (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

import seif
from seif.manifest import FFNSpec, LayerSpec, RoutingSpec, SharedExpertsSpec


def make_layers(num_experts: int = 8, hidden: int = 16, inter: int = 32) -> list[LayerSpec]:
    return [
        LayerSpec(0, num_experts, hidden, RoutingSpec("topk", 2, "softmax", normalize="sum"),
                  FFNSpec(inter, "swiglu")),
        LayerSpec(3, num_experts, hidden,
                  RoutingSpec("group_topk", 2, "sigmoid", selection_bias=True, normalize="sum",
                              epsilon=1e-20, scale=2.0, n_group=2, topk_group=1,
                              group_score="top2_sum"),
                  FFNSpec(inter, "swiglu"), SharedExpertsSpec(1, FFNSpec(inter, "swiglu"), True)),
    ]


def make_tensors(layers: list[LayerSpec], seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    out = {"model.embed_tokens.weight": rng.standard_normal((10, layers[0].hidden_size))
           .astype(dtype)}
    for layer in layers:
        for name, shape in layer.expected_tensors().items():
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)
    return out


@pytest.fixture
def tiny(tmp_path):
    """(path, layers, tensors) of a small valid two-layer checkpoint with several shards."""
    layers = make_layers()
    tensors = make_tensors(layers)
    path = seif.save(tmp_path / "tiny.seif", tensors, layers, max_shard_bytes=16 * 1024)
    return path, layers, tensors


def build_tiny_hf(model_type: str, path, config_kwargs: dict, *, seed: int = 0, dtype=None,
                  auto: str = "AutoModelForCausalLM", **save_kwargs):
    """A tiny random transformers model of `model_type`, saved to `path` (no download);
    `auto` names the Auto class that builds it, or the model class itself.

    Weights are re-drawn at a larger scale than the default init so routing is decided by clear
    margins, and selection biases (DeepSeek's e_score_correction_bias, LFM2's expert_bias, zeros
    at init) are random so they matter. torch and transformers are imported here, not by the
    conftest, so torch-free test runs are unaffected.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **config_kwargs)
    cls = getattr(transformers, auto)     # an Auto class, or a model class no Auto class maps
    model = (cls.from_config if auto.startswith("Auto") else cls._from_config)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.normal_(0.0, 0.1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return model


# gpt-oss's published quantization_config: attention, router, embeddings and head stay dense
MXFP4_QUANTIZATION_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def pack_gpt_oss_mxfp4(model, tensors: dict, seed: int = 5) -> None:
    """Turn a tiny gpt-oss's saved expert weights into MXFP4 as OpenAI publishes them
    (`*_blocks` U8 [E, out, in/32, 16], `*_scales` U8 [E, out, in/32]; random, in place in
    `tensors`), and set `model`'s experts to transformers' own dequantization of those blocks,
    so that the model is the reference for the packed checkpoint."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(seed)
    for li, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{li}.mlp.experts.{proj}"
            E, inner, outer = tensors.pop(name).shape       # stored [E, in, out]
            blocks = torch.randint(0, 256, (E, outer, inner // 32, 16), dtype=torch.uint8,
                                   generator=gen)
            scales = torch.randint(118, 126, (E, outer, inner // 32), dtype=torch.uint8,
                                   generator=gen)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            with torch.no_grad():
                getattr(layer.mlp.experts, proj).copy_(
                    convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
