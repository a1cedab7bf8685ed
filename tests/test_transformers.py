"""transformers <-> SEIF, verified against transformers' own MoE blocks (no downloads).

For each supported family: build a tiny random model from its config class, save_pretrained,
convert through the registry, and check, for every MoE layer, that the SEIF reference forward
equals transformers' MoE block forward (fp32, max abs error <= 1e-5) with the same experts
selected; then HF -> SEIF -> HF must give byte-identical tensors, an equal config and bitwise
equal logits.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from conftest import build_tiny_hf  # noqa: E402
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
FAMILY_CONFIGS.update({
    "qwen3_next": (dict(intermediate_size=48, moe_intermediate_size=16,
                        shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                        head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
                        linear_key_head_dim=8, linear_value_head_dim=8,
                        layer_types=["linear_attention", "full_attention", "linear_attention"]),
                   "mlp"),
    "flex_olmo": (dict(intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=True), "mlp"),
    "minimax": (dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
                     head_dim=8, layer_types=["full_attention", "linear_attention",
                                              "full_attention"]), "mlp"),
    "hunyuan_v1_moe": (dict(intermediate_size=16, num_experts=6, moe_topk=2, head_dim=8), "mlp"),
    "lfm2_moe": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                      num_experts_per_tok=2, num_dense_layers=1, routed_scaling_factor=1.7,
                      layer_types=["conv", "full_attention", "conv"]), "feed_forward",
                 {"route": lambda b, x: b.gate(x, b.expert_bias)[1:]}),
    "dots1": (dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                   num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                   first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                   head_dim=8), "mlp"),
})
_DEEPSEEK_LIKE = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                      routed_scaling_factor=1.5, norm_topk_prob=True)
FAMILY_CONFIGS.update({
    "glm4_moe_lite": (dict(_DEEPSEEK_LIKE, mlp_layer_types=["dense", "sparse", "sparse"],
                           q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4), "mlp"),
    "solar_open": (dict(_DEEPSEEK_LIKE, head_dim=8, norm_topk_prob=False), "mlp"),
    "sarvam_mla": (dict(_DEEPSEEK_LIKE, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=4,
                         first_k_dense_replace=1), "mlp"),
    "sarvam_moe": (dict(_DEEPSEEK_LIKE, head_dim=8, first_k_dense_replace=1), "mlp"),
})
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, head_dim=8, num_key_value_heads=4)
_DSA = dict(_MLA, index_topk=4, index_head_dim=8, index_n_heads=2)
_SPARSE_FROM_1 = dict(mlp_layer_types=["dense", "sparse", "sparse"])
FAMILY_CONFIGS.update({
    # DeepSeek-V3 routers (class sources identical but for names).
    "deepseek_v32": (dict(_DEEPSEEK_LIKE, **_DSA, **_SPARSE_FROM_1), "mlp"),
    "glm_moe_dsa": (dict(_DEEPSEEK_LIKE, **_DSA, **_SPARSE_FROM_1, norm_topk_prob=False),
                    "mlp"),
    "kimi_linear": (dict(_DEEPSEEK_LIKE, **_MLA, **_SPARSE_FROM_1, num_local_experts=8,
                         layer_types=["linear_attention", "full_attention",
                                      "linear_attention"],
                         linear_attn_config={"head_dim": 8, "num_heads": 2,
                                             "short_conv_kernel_size": 4}), "mlp"),
    "bailing_hybrid": (dict(_DEEPSEEK_LIKE, **_MLA, **_SPARSE_FROM_1, num_local_experts=8,
                            num_mtp_layers=0, layer_group_size=2), "mlp"),
    "exaone_moe": (dict(_DEEPSEEK_LIKE, **_SPARSE_FROM_1, num_experts=8, num_shared_experts=2,
                        head_dim=8), "mlp"),
    "mimo_v2_flash": (dict(_DEEPSEEK_LIKE, **_SPARSE_FROM_1, head_dim=8, v_head_dim=8), "mlp"),
    # Groups masked to 0 ...
    "axk2": (dict(_DEEPSEEK_LIKE, **_DSA, **_SPARSE_FROM_1, gated_norm_rank=4), "mlp"),
    # Qwen-style routers.
    "mellum": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                    num_experts_per_tok=2, head_dim=8, **_SPARSE_FROM_1), "mlp"),
    "lara_mini": (dict(moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, head_dim=8,
                       linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=2), "mlp"),
    "flint": (dict(intermediate_size=48, moe_intermediate_size=16,
                   shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
                   head_dim=8, mlp_only_layers=[0]), "mlp"),
})
# ... and without groups (A.X-K2-Light).
FAMILY_CONFIGS["axk2-nogroup"] = ({**FAMILY_CONFIGS["axk2"][0], "n_group": None,
                                   "topk_group": None}, "mlp")
# Multimodal wrappers: the first element is the text config; "vision" the vision config.
_VL_LAYERS = {"auto": "AutoModelForImageTextToText",
              "layers": lambda m: m.model.language_model.layers}
FAMILY_CONFIGS.update({
    "qwen3_vl_moe": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                          num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1,
                          mlp_only_layers=[0]), "mlp",
                     {**_VL_LAYERS, "vision": dict(depth=1, hidden_size=16, intermediate_size=16,
                                                   num_heads=2, out_hidden_size=32,
                                                   deepstack_visual_indexes=[0])}),
    "qwen3_5_moe": (dict(moe_intermediate_size=16, shared_expert_intermediate_size=24,
                         num_experts=6, num_experts_per_tok=2, head_dim=8,
                         linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                         linear_num_value_heads=2,
                         layer_types=["linear_attention", "full_attention", "full_attention"]),
                    "mlp", {**_VL_LAYERS, "vision": dict(depth=1, hidden_size=16,
                                                         intermediate_size=16, num_heads=2,
                                                         out_hidden_size=32)}),
    "glm4v_moe": (dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                       num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                       first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                       head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                     "mrope_section": [2, 1, 1]}), "mlp",
                  {**_VL_LAYERS, "vision": dict(depth=1, hidden_size=16, intermediate_size=16,
                                                num_heads=2, out_hidden_size=32)}),
    "llama4": (dict(intermediate_size=16, intermediate_size_mlp=48, num_local_experts=6,
                    num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=2),
               "feed_forward",
               {"auto": "AutoModelForImageTextToText",
                "layers": lambda m: m.language_model.model.layers,
                # Llama4ForConditionalGeneration.forward fails without images in the installed
                # transformers (it reads outputs.image_outputs from the text model's output):
                # logits come from its text model (the vision tower is compared by weights).
                "logits": lambda m, ids: m.language_model(ids).logits,
                "route": lambda b, x: _llama4_route(b, x),
                "vision": dict(num_hidden_layers=1, hidden_size=16, intermediate_size=16,
                               num_attention_heads=2, vision_output_dim=16,
                               projector_input_dim=16, projector_output_dim=16, image_size=28,
                               patch_size=14)}),
})
FAMILY_CONFIGS["kimi_k25"] = (
    {**FAMILY_CONFIGS["deepseek_v3"][0], "routed_scaling_factor": 1.5}, "mlp",
    {**_VL_LAYERS, "vision": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2)})
_OCR_VISION = {"sam_config": dict(hidden_size=16, output_channels=16, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=64, patch_size=16,
                                  global_attn_indexes=[1], window_size=2, mlp_dim=16,
                                  downsample_channels=[16, 32]),
               "encoder_config": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      vocab_size=64)}
for _t, _method in (("deepseek_ocr2", "group_limited_greedy"), ("unlimited_ocr", "greedy")):
    FAMILY_CONFIGS[_t] = (
        {**FAMILY_CONFIGS["deepseek_v2"][0], "topk_method": _method,
         **({} if _method != "greedy" else {"n_group": None, "topk_group": None}),
         "mlp_layer_types": ["dense", "sparse", "sparse"]}, "mlp",
        {**_VL_LAYERS, "vision": _OCR_VISION})
FAMILY_CONFIGS.update({
    "minimax_m2": (dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
                        head_dim=8), "mlp",
                   {"route": lambda b, x: b.gate(x, b.e_score_correction_bias)[1:]}),
    "hy_v3": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                   num_experts_per_tok=2, num_shared_experts=2, router_scaling_factor=2.2,
                   head_dim=8, **_SPARSE_FROM_1), "mlp",
              {"route": lambda b, x: b.gate(x, b.e_score_correction_bias)[1:]}),
})
FAMILY_CONFIGS.update({
    "laguna": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                    num_experts_per_tok=2, shared_expert_intermediate_size=24,
                    moe_routed_scaling_factor=1.8, head_dim=8, **_SPARSE_FROM_1), "mlp",
               # the block, not the router, scales the routed output
               {"route": lambda b, x: (b.gate(x)[1] * b.routed_scaling_factor, b.gate(x)[2])}),
    "kolibri1": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                      num_experts_per_tok=2, shared_expert_intermediate_size=24, head_dim=8),
                 "mlp"),
})
FAMILY_CONFIGS.update({
    "afmoe": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                   num_experts_per_tok=2, num_shared_experts=2, route_scale=1.7,
                   num_dense_layers=1, head_dim=8, global_attn_every_n_layers=2), "mlp",
              {"route": lambda b, x: b.router(x[None], b.expert_bias)[1:]}),
    "cohere2_moe": (dict(intermediate_size=16, prefix_dense_intermediate_size=48, num_experts=6,
                         num_experts_per_tok=2, num_shared_experts=1,
                         shared_expert_combination_strategy="sum", head_dim=8,
                         **_SPARSE_FROM_1), "mlp"),
})
FAMILY_CONFIGS["cohere2_moe-sigmoid"] = ({**FAMILY_CONFIGS["cohere2_moe"][0],
                                          "expert_selection_fn": "sigmoid"}, "mlp")
FAMILY_CONFIGS["granitemoe_swa"] = FAMILY_CONFIGS["granitemoeshared"]
FAMILY_CONFIGS["granitemoehybrid"] = (
    {**FAMILY_CONFIGS["granitemoeshared"][0], "layer_types": ["mamba", "attention", "mamba"],
     "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
     "mamba_chunk_size": 8}, *FAMILY_CONFIGS["granitemoeshared"][1:])
FAMILY_CONFIGS["beam"] = (
    dict(_DEEPSEEK_LIKE, **_SPARSE_FROM_1, num_experts=8, head_dim=8), "mlp",
    {"route": lambda b, x: (b.gate(x)[1] * b.routed_scaling_factor, b.gate(x)[2])})
FAMILY_CONFIGS["openai_privacy_filter"] = (
    dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, head_dim=8,
         swiglu_limit=1.5, swiglu_alpha=1.3), "mlp",
    {"auto": "AutoModelForTokenClassification",
     # the router's weights are divided by k, the block multiplies its output by k
     "route": lambda b, x: (b.router(x)[1] * b.num_experts, b.router(x)[2])})
FAMILY_CONFIGS["dots3_note"] = (
    dict(_DEEPSEEK_LIKE, **_DSA, **_SPARSE_FROM_1, shared_experts_intermediate_size=12),
    "mlp",
    {**_VL_LAYERS,
     "vision": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, moe_intermediate_size=8, adapter_in_dim=16,
                    adapter_out_dim=32, mlp_layer_types=["dense"]),
     "configs": {"audio_config": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, downsample_hidden_size=8,
                                      adapter_input_size=16, adapter_out_dim=32,
                                      feature_size=16)}})
# gelu: the shared experts follow hidden_act, the routed ones are SiLU-gated regardless.
FAMILY_CONFIGS["aria"] = (
    dict(intermediate_size=16, moe_num_experts=6, moe_topk=2, moe_num_shared_experts=2,
         head_dim=8, hidden_act="gelu_pytorch_tanh"), "mlp",
    {"auto": "AutoModelForImageTextToText", "layers": lambda m: m.model.language_model.layers,
     "route": lambda b, x: b.router(x)[1:],
     "vision": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, image_size=28, patch_size=14),
     "configs": {"projector_patch_to_query_dict": {"4": 4}}})
# A low swiglu_limit so the clamps bite (routed experts and shared MLP alike).
FAMILY_CONFIGS["minimax_m3_vl"] = (
    dict(intermediate_size=16, dense_intermediate_size=48, shared_intermediate_size=24,
         num_local_experts=6, num_experts_per_tok=2, head_dim=8, rotary_dim=4, swiglu_limit=1.5,
         swiglu_alpha=1.3, routed_scaling_factor=1.7, index_n_heads=2, index_head_dim=8,
         index_block_size=4, index_topk_blocks=2, **_SPARSE_FROM_1), "mlp",
    {"auto": "AutoModelForImageTextToText", "layers": lambda m: m.model.language_model.layers,
     "route": lambda b, x: (b.gate(x)[1] * b.routed_scaling_factor, b.gate(x)[2]),
     "vision": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, image_size=28, patch_size=14),
     "configs": {"projector_hidden_size": 32}})
# Qwen4-Exp: qwen3_5_moe's block in every layer (text model, and the VL wrapper's decoder).
_QWEN4_EXP = dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
                  num_experts_per_tok=3, head_dim=8, linear_key_head_dim=8,
                  linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
                  layer_types=["linear_attention", "full_attention", "linear_attention"],
                  indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                  indexer_compress_ratio=2, hc_lowrank=16)
FAMILY_CONFIGS["qwen4_exp_text"] = (dict(_QWEN4_EXP, norm_topk_prob=False), "mlp")
FAMILY_CONFIGS["qwen4_exp"] = (
    dict(_QWEN4_EXP, num_experts_per_tok=2), "mlp",
    {**_VL_LAYERS, "vision": dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                  out_hidden_size=32)})
# Mistral 4: softmax scores, groups masked to 0.0 (4 groups, keep 2), renormalized, scaled;
# the -nogroup variant is the published 1/1 (plain top-k) without renormalization.
FAMILY_CONFIGS["mistral4"] = (
    dict(_DEEPSEEK_LIKE, **{**_MLA, "head_dim": 16}, first_k_dense_replace=1,
         routed_scaling_factor=1.7), "mlp",     # head_dim = nope + rope (8 breaks its rotary)
    {"auto": "AutoModelForImageTextToText"})
FAMILY_CONFIGS["mistral4-nogroup"] = (
    {**FAMILY_CONFIGS["mistral4"][0], "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    *FAMILY_CONFIGS["mistral4"][1:])
# Mistral Large 4: the text decoder of a Pixtral wrapper, saved with Mistral's native names.
FAMILY_CONFIGS["mistral_large4"] = (
    dict(_DEEPSEEK_LIKE, **_DSA, **_SPARSE_FROM_1, routed_scaling_factor=1.7), "mlp",
    {**_VL_LAYERS, "vision": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=28, patch_size=14,
                                  head_dim=8)})
# Nemotron-H without latent projections: relu2 experts, DeepSeek-V3 router with 4 groups.
FAMILY_CONFIGS["nemotron_h"] = (
    dict(intermediate_size=48, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
         n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
         routed_scaling_factor=1.3, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
         ssm_state_size=8, n_groups=1, num_hidden_layers=4,
         layers_block_type=["mamba", "moe", "attention", "moe"]), "mixer")
# Nemotron-3.5-Transcribe: the same Nemotron-H text decoder inside a speech model (tiny
# speech-recognition, diarization and word-timestamp parts, dense for SEIF).
_TINY_ENCODER = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_mel_bins=16)
FAMILY_CONFIGS["nemo_speechlm"] = (
    FAMILY_CONFIGS["nemotron_h"][0], "mixer",
    {"auto": "AutoModelForMultimodalLM", "layers": lambda m: m.model.language_model.layers,
     "wrap": lambda text: dict(
         text_config=text,
         audio_config=dict(asr_config=_TINY_ENCODER,
                           diarization_config=dict(audio_config=_TINY_ENCODER,
                                                   head_config=dict(hidden_size=8,
                                                                    audio_hidden_size=16))),
         word_timestamp_config=dict(hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                    vocab_size=16, blank_token_id=15))})
# Nemotron-H Omni: the same Nemotron-H as its language model, with a tiny RADIO vision tower.
FAMILY_CONFIGS["nemotron_h_omni"] = (
    FAMILY_CONFIGS["nemotron_h"][0], "mixer",
    {"auto": "AutoModelForImageTextToText", "layers": lambda m: m.language_model.model.layers,
     "vision": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                    patch_size=16, max_img_size=64, video_temporal_patch_size=2),
     "configs": {"projector_hidden_size": 16, "vision_hidden_size": 16}})
# Two MoE stacks: the first element is the thinker's text config, "wrap" nests it with the
# talker's (another hidden size; mlp_only_layers=[1], which the talker's decoder layer ignores:
# every talker layer is MoE) and minimal vision / audio / code-predictor / code2wav parts. The
# installed talker reads a spatial_merge_size its config class lacks (published configs have it).
_OMNI_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
              "interleaved": True}


def _omni_config(text: dict) -> dict:
    talker = dict(COMMON, hidden_size=24, num_hidden_layers=2, head_dim=8, intermediate_size=40,
                  moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=5,
                  num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                  rope_parameters=_OMNI_ROPE)
    return dict(
        thinker_config=dict(
            text_config=text,
            audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                              encoder_ffn_dim=16, output_dim=text["hidden_size"],
                              num_mel_bins=16, downsample_hidden_size=8, n_window=4,
                              n_window_infer=8),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                               out_hidden_size=text["hidden_size"],
                               deepstack_visual_indexes=[0])),
        talker_config=dict(text_config=talker, thinker_hidden_size=text["hidden_size"],
                           spatial_merge_size=2,
                           code_predictor_config=dict(hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2,
                                                      num_key_value_heads=1, head_dim=8,
                                                      intermediate_size=16, vocab_size=64,
                                                      num_code_groups=4)),
        code2wav_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=16, codebook_size=64,
                             decoder_dim=16, num_quantizers=4, upsample_rates=[2, 2],
                             upsampling_ratios=[2, 2], sliding_window=8))


def _omni_logits(model, ids):
    """The thinker's text logits and the talker's codec logits (on the codec embeddings of
    the same ids), flattened into one tensor."""
    talker = model.talker(inputs_embeds=model.talker.model.codec_embedding(ids)).logits
    return torch.cat([model.thinker(input_ids=ids).logits.flatten(), talker.flatten()])


FAMILY_CONFIGS["qwen3_omni_moe"] = (
    dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
         norm_topk_prob=False, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[1],
         rope_parameters=_OMNI_ROPE), "mlp",
    {"auto": "AutoModelForMultimodalLM", "wrap": _omni_config, "logits": _omni_logits,
     # SEIF layers: the thinker's text decoder layers, then the talker's
     "layers": lambda m: [*m.thinker.model.language_model.layers, *m.talker.model.layers]})
FAMILY_CONFIGS["deepseek_v2-greedy"] = (
    {**FAMILY_CONFIGS["deepseek_v2"][0], "topk_method": "greedy", "n_group": None,
     "topk_group": None}, "mlp")


def _jetmoe_route(block, x):
    """(weights [T, k], indices [T, k]) unpacked from JetMoeTopKGating's expert-sorted output
    (index_sorted_experts, batch_index, batch_gates, expert_size, logits)."""
    order, _, gates, sizes, _ = block.router(x)
    experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    weights, indices = torch.empty_like(gates), torch.empty_like(order)
    weights[order], indices[order] = gates, experts
    return weights.reshape(-1, block.router.top_k), indices.reshape(-1, block.router.top_k)


# JetMoE: the MoE block (mlp) has stacked experts and its own output bias (SEIF 1.1); its
# attention is a mixture of attention heads (self_attention.experts), dense for SEIF.
FAMILY_CONFIGS["jetmoe"] = (
    dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, kv_channels=8,
         aux_loss_coef=0.02), "mlp",
    {"route": _jetmoe_route, "is_moe": lambda block: hasattr(block, "input_linear")})
# Text-only model types of multimodal wrappers (a text model saved alone): the wrapper's tiny
# text kwargs and its router probe; the bare text models (AutoModel) give hidden states.
_BARE = {"auto": "AutoModel", "layers": lambda m: m.layers,
         "logits": lambda m, ids: m(ids).last_hidden_state}
for _t, _bare in (("aria", False), ("qwen3_5_moe", False), ("dots3_note", False),
                  ("minimax_m3_vl", False), ("qwen3_vl_moe", True), ("glm4v_moe", True),
                  ("mistral_large4", True)):
    _route = {k: v for k, v in FAMILY_CONFIGS[_t][2].items() if k == "route"}
    FAMILY_CONFIGS[f"{_t}_text"] = (FAMILY_CONFIGS[_t][0], FAMILY_CONFIGS[_t][1],
                                    {**(_BARE if _bare else {}), **_route})
# ... and the OCR ones, whose text models no Auto class loads (built by their own class).
for _t, _cls in (("deepseek_ocr2", "DeepseekOcr2TextModel"),
                 ("unlimited_ocr", "UnlimitedOcrTextModel")):
    FAMILY_CONFIGS[f"{_t}_text"] = (FAMILY_CONFIGS[_t][0], FAMILY_CONFIGS[_t][1],
                                    {**_BARE, "auto": _cls})
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


def build(model_type: str, path: Path, *, dtype=torch.float32, seed: int = 0,
          config_kwargs: dict | None = None, **save_kwargs):
    """A tiny random model of `model_type`, saved to `path`. Weights are re-drawn with a larger
    scale than the default init so routing is decided by clear margins, and DeepSeek's
    e_score_correction_bias (zeros at init) is random so the selection bias matters."""
    kwargs = {**COMMON, **FAMILY_CONFIGS[model_type][0], **(config_kwargs or {})}
    vision = options(model_type).get("vision")
    if vision is not None:              # a multimodal wrapper: kwargs are its text decoder's
        kwargs = {"text_config": kwargs, "vision_config": vision,
                  **options(model_type).get("configs", {})}
    wrap = options(model_type).get("wrap")
    if wrap is not None:                # several stacks: kwargs are the first one's
        kwargs = wrap(kwargs)
    return build_tiny_hf(model_type.split("-")[0], path, kwargs, seed=seed, dtype=dtype,
                         auto=options(model_type).get("auto", "AutoModelForCausalLM"),
                         **save_kwargs)


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
    is_moe = options(model_type).get("is_moe", lambda block: hasattr(block, "experts"))
    expected = [i for i in range(len(decoder_layers(model, model_type)))
                if is_moe(moe_block(model, model_type, i))]
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
    logits = options(model_type).get("logits", lambda m, ids: m(ids, **kw).logits)
    with torch.no_grad():
        m1 = auto.from_pretrained(root / "hf").eval()
        m2 = auto.from_pretrained(back).eval()
        l0, l1, l2 = logits(model, ids), logits(m1, ids), logits(m2, ids)
    assert torch.equal(l1, l2)
    assert torch.equal(l0, l2)
    # Every loaded weight (vision towers of multimodal wrappers included) is bitwise the same.
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_seif_verify_finds_every_block(converted):
    """`seif verify` on the transformers directory and its SEIF conversion: the oracle (the
    family's own MoE block, found in the loaded model through the family table, the text
    decoder of a multimodal wrapper included) runs for every MoE layer and agrees."""
    from seif.verify import verify

    model_type, _, root, out = converted
    report = verify(root / "hf", out, tokens=T)
    assert report.oracle == "transformers"
    assert report.ok, report.to_dict()
    for row in report.layers:
        assert row.oracle_error is not None and row.oracle_error <= row.allowed, row
        assert row.oracle_error <= 1e-6 * row.scale, row      # fp32 rounding, nothing more
        assert not row.notes, row


def test_dtype_casts_all_but_routers(converted):
    """dtype="bf16" (as seif -> seif --dtype): every float tensor is its fp32 value rounded to
    bf16, stacked pieces included; routers (weight, bias, selection bias) keep fp32 bytes."""
    model_type, _, root, out = converted
    cast = seif.convert.convert(root / "hf", root / "bf16.seif", dtype="bf16")
    a, b = seif.open(out), seif.open(cast)
    assert a.manifest.tensors.keys() == b.manifest.tensors.keys()
    routers = {layer.router_name(p) for layer in a.layers
               for p in ("weight", "bias", "selection_bias")}
    # JetMoE's attention heads are routed too (MoA, dense for SEIF): those routers keep fp32
    routers |= {n for n in a.manifest.tensors
                if n.endswith(".self_attention.experts.router.layer.weight")}
    for name, entry in a.manifest.tensors.items():
        got = b.manifest.tensors[name]
        assert got.source_name == entry.source_name and got.shape == entry.shape
        if name in routers:
            assert got.dtype == "F32" and got.checksum == entry.checksum, name
        elif entry.dtype not in ("F64", "F32", "F16", "BF16"):   # integer buffers: untouched
            assert got.dtype == entry.dtype and got.checksum == entry.checksum, name
        else:
            assert got.dtype == "BF16", name
            np.testing.assert_array_equal(
                b.tensor(name), a.tensor(name).astype(b.tensor(name).dtype), err_msg=name)


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


@pytest.mark.parametrize("model_type,match", [("nllb_moe", "one-hot top-1 mask"),
                                              ("axk1", "RMSNorm.*inside the block"),
                                              ("ernie4_5_vl_moe", "modality"),
                                              ("step3p7", "clamp after the activation"),
                                              ("hy_v4", "routed experts use a clamped SwiGLU "
                                                        "without alpha or \\+1.*shared experts "
                                                        "are plain"),
                                              ("hy_v4_vl", "clamped SwiGLU without alpha"),
                                              ("glm5_next", "clamped SwiGLU without alpha"),
                                              ("inkling", "shared experts are weighted by "
                                                          "the router"),
                                              ("inkling2", "softcapped SwiGLU"),
                                              ("inkling2_loop", "softcapped SwiGLU"),
                                              ("muse_spark", "latent space.*RMSNorm"),
                                              ("doge", "product keys"),
                                              ("deepseek_v4", "token id.*sqrt\\(softplus"),
                                              ("longcat_flash", "identity experts"),
                                              ("gemma4", "per_expert_scale.*no router input "
                                                         "norm"),
                                              ("gemma4_text", "per_expert_scale"),
                                              ("diffusion_gemma", "per_expert_scale"),
                                              ("diffusion_gemma_text", "per_expert_scale"),
                                              ("gemma4_unified", "no MoE layers"),
                                              ("gemma4_unified_text", "no MoE layers"),
                                              ("nllb-moe", "one-hot top-1 mask"),
                                              ("inkling_text", "shared experts are weighted"),
                                              ("step3p5", "clamp after the activation"),
                                              ("muse_spark_text", "latent space"),
                                              ("vitpose_backbone", "no router.*dataset_index"),
                                              ("zaya", "router is an MLP.*skip expert that "
                                                       "contributes zero")])
def test_known_unsupported_family_says_why(tmp_path, model_type, match):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ConversionError, match=match):
        seif.convert.convert(src, tmp_path / "out.seif")


def _installed_gate(model_type: str):
    """(gate, up) -> the expert activation of `model_type`'s installed transformers code."""
    if model_type in ("hy_v4", "glm5_next"):
        cls = {"hy_v4": ("HYV4Config", "HYV4Experts"),
               "glm5_next": ("Glm5NextTextConfig", "Glm5NextTextExperts")}[model_type]
        cfg = getattr(transformers, cls[0])(hidden_size=8, moe_intermediate_size=4,
                                            num_local_experts=2, swiglu_limit=1.0)
        modeling = importlib.import_module(
            f"transformers.models.{model_type}.modeling_{model_type}")
        experts = getattr(modeling, cls[1])(cfg)
        return lambda g, u: experts._apply_gate(torch.cat([g, u], dim=-1))
    cfg = transformers.Inkling2TextConfig(mlp_gate_softcap=1.5, mlp_up_softcap=1.5)
    modeling = importlib.import_module("transformers.models.inkling2.modeling_inkling2")
    return modeling.Inkling2SoftcappedSwiGLU(cfg)


@pytest.mark.parametrize("model_type", ["hy_v4", "glm5_next", "inkling2"])
def test_refused_activation_is_no_seif_activation(model_type):
    """The refusal's reason holds against the installed code: on inputs where its clamps /
    softcaps bite, the family's expert activation matches no SEIF gated activation (swiglu;
    swiglu_oai at the family's limit, with alpha 1 or 1.702)."""
    from seif.moe import activation
    rng = np.random.default_rng(0)
    g, u = (rng.uniform(-3.0, 3.0, (64,)) for _ in range(2))
    with torch.no_grad():
        got = _installed_gate(model_type)(torch.tensor(g), torch.tensor(u)).numpy()
    candidates = [activation(name, g, u) for name in ("swiglu", "geglu", "geglu_tanh")]
    candidates += [activation("swiglu_oai", g, u, alpha=a, limit=1.0) for a in (1.0, 1.702)]
    for want in candidates:
        assert np.abs(got - want).max() > 1e-2
    if model_type != "inkling2":   # what the refusal says it computes
        silu = lambda x: x / (1.0 + np.exp(-x))  # noqa: E731
        np.testing.assert_allclose(got, silu(np.minimum(g, 1.0)) * np.clip(u, -1.0, 1.0),
                                   rtol=1e-12)


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
    ("gpt_oss", {"quantization_config": {"quant_method": "bitsandbytes_4bit"}},
     "quant_method 'bitsandbytes_4bit' is not supported for gpt_oss.*mxfp4"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8",
                                             "activation_scheme": "static"}},
     "activation_scheme 'static'"),
    ("granitemoe", {"quantization_config": {"quant_method": "fp8"}},
     "stores its experts stacked"),
    ("phimoe", {"num_experts_per_tok": 3}, "always picks exactly 2"),
    ("ernie4_5_moe", {"use_bias": True}, "use_bias=True is not supported"),
    ("laguna", {"moe_router_logit_softcapping": 30.0}, "no router logit softcap"),
    ("hy_v3", {"mlp_bias": True}, "mlp_bias=True is not supported"),
    ("cohere2_moe", {"shared_expert_combination_strategy": "average"}, "averaging them"),
    ("nemotron_h", {"moe_latent_size": 8}, "moe_latent_size=8: its routed experts run in a "
                                           "latent space"),
    ("nemotron_h", {"mlp_bias": True}, "mlp_bias=True is not supported"),
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


def test_qwen3_omni_moe_two_stacks_one_index_space(tmp_path):
    """Thinker text layer i is SEIF layer i, talker layer j is SEIF layer
    thinker.num_hidden_layers + j (each with its own hidden size and source prefix); the
    family table finds each layer's stack from either; load_layer reads each stack's blocks by
    that index; replace_moe_blocks swaps both stacks' blocks; transformers.load rebuilds the
    whole model with every weight bitwise the source's."""
    from seif.converters import torch as st
    from seif.converters.transformers import FAMILIES as TABLE
    from seif.converters.transformers import load, stack_layer

    model = build("qwen3_omni_moe", tmp_path / "hf")
    out = seif.convert.convert(tmp_path / "hf", tmp_path / "m.seif")
    ckpt = seif.open(out)
    n = model.config.thinker_config.text_config.num_hidden_layers
    assert n == 3
    assert [(s.index, s.source_prefix, s.hidden_size, s.shared_experts is not None)
            for s in ckpt.layers] == [(0, "thinker.model.layers.0.mlp", 32, False),
                                      (2, "thinker.model.layers.2.mlp", 32, False),
                                      (3, "talker.model.layers.0.mlp", 24, True),
                                      (4, "talker.model.layers.1.mlp", 24, True)]
    family = TABLE["qwen3_omni_moe"]
    for spec in ckpt.layers:
        by_prefix = stack_layer(family, spec.index, source_prefix=spec.source_prefix)
        assert stack_layer(family, spec.index, config=model.config) == by_prefix
        assert by_prefix[1] == (spec.index if spec.index < n else spec.index - n)
    with pytest.raises(ConversionError, match="none of the family's MoE stacks"):
        stack_layer(family, 0, source_prefix="model.layers.0.mlp")
    rng = np.random.default_rng(2)
    for spec in ckpt.layers:
        x = rng.standard_normal((T, spec.hidden_size)).astype(np.float32)
        with torch.no_grad():
            got = st.load_layer(out, spec.index)(torch.from_numpy(x)).numpy()
        want = hf_moe_output(model, "qwen3_omni_moe", spec.index, x)
        assert float(np.abs(got - want).max()) <= 1e-5, spec.index
    ids = torch.randint(0, COMMON["vocab_size"], (2, 12), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        before = _omni_logits(model, ids)
        replaced = st.replace_moe_blocks(model, out)
        after = _omni_logits(model, ids)
    assert replaced == ["thinker.model.language_model.layers.0.mlp",
                        "thinker.model.language_model.layers.2.mlp",
                        "talker.model.layers.0.mlp", "talker.model.layers.1.mlp"]
    assert all(isinstance(model.get_submodule(name), st.SparseMoE) for name in replaced)
    scale = float(before.abs().max())
    assert float((after - before).abs().max()) <= 1e-5 * max(scale, 1.0)
    loaded = load(out)
    assert type(loaded).__name__ == "Qwen3OmniMoeForConditionalGeneration"
    source = transformers.AutoModelForMultimodalLM.from_pretrained(tmp_path / "hf")
    s1, s2 = source.state_dict(), loaded.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_dense_layer_with_expert_tensors_is_refused(tmp_path):
    """A config that disagrees with the tensors is an error, never a silent mis-mapping."""
    build("qwen3_moe", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["mlp_only_layers"] = [1]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="layer 1 should be dense"):
        seif.convert.convert(tmp_path / "hf", tmp_path / "out.seif")
    assert not (tmp_path / "out.seif").exists()


def test_output_bias_into_a_family_without_one_is_refused(tmp_path):
    """A SEIF 1.1 output bias has no place in a Mixtral checkpoint: refused, never dropped."""
    build("mixtral", tmp_path / "hf")
    src = seif.open(seif.convert.convert(tmp_path / "hf", tmp_path / "m.seif"))
    tensors = {n: src.tensor(n) for n in src.tensor_names()}
    layers = src.layers
    layers[0].output_bias = True
    tensors[layers[0].output_bias_name()] = np.ones(layers[0].hidden_size, np.float32)
    biased = seif.save(tmp_path / "b.seif", tensors, layers, model=src.manifest.model)
    with pytest.raises(ConversionError, match="output bias"):
        seif.convert.convert(biased, tmp_path / "back", target_format="transformers")
    assert not (tmp_path / "back").exists()


def test_module_import_needs_no_torch():
    import subprocess
    import sys
    code = ("import sys, seif.converters.transformers as t; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "print(t.supported_families())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mixtral" in out.stdout


# --------------------------------------------------------------------------- quantized weights
FP8_PUBLISHED = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                 "activation_scheme": "dynamic"}   # as DeepSeek-V3 publishes it


def _save_dir(path: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _publish(tmp_path: Path, model, published: dict) -> None:
    """Save `published` (the installed save_pretrained's tensors in another layout) with the
    same config at tmp_path/pub, and check transformers loads it into the same weights."""
    _save_dir(tmp_path / "pub", published, json.loads((tmp_path / "hf" / "config.json")
                                                      .read_text()))
    again = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "pub")
    want = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k


def _load_dir(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _fp8_quantize(w, block):
    """DeepSeek-V3-style block quantization: fp8 e4m3 values, F32 scales `[ceil(R/br),
    ceil(C/bc)]` that multiply (`weight_scale_inv`); returns (q, scale, real values of q)."""
    r = torch.arange(w.shape[0]) // block[0]
    c = torch.arange(w.shape[1]) // block[1]
    amax = torch.stack([torch.stack([w[r == i][:, c == j].abs().max()
                                     for j in range(int(c[-1]) + 1)])
                        for i in range(int(r[-1]) + 1)])
    scale = (amax / 448.0).clamp(min=1e-12)
    full = scale[r[:, None], c[None, :]]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def _fp8_dense(name: str, t) -> bool:
    """What DeepSeek-V3 quantizes: every linear weight but embeddings, lm_head and routers."""
    return t.ndim == 2 and name.endswith(".weight") and not any(
        k in name for k in ("embed_tokens", "lm_head", "norm", "mlp.gate.weight"))


@pytest.fixture(scope="module", params=[[128, 128], [8, 12]], ids=["published", "partial"])
def fp8_deepseek(request, tmp_path_factory):
    """A tiny DeepSeek-V3 whose linear weights are fp8 block-quantized (published config form,
    and 8x12 blocks so several, partial, blocks tile each weight); plus the transformers model
    loaded with the dequantized fp32 weights, the reference."""
    block = request.param
    root = tmp_path_factory.mktemp("fp8")
    build("deepseek_v3", root / "fp32")
    config = json.loads((root / "fp32" / "config.json").read_text())
    fp8, deq = {}, {}
    for name, t in _load_dir(root / "fp32").items():
        if _fp8_dense(name, t):
            q, scale, real = _fp8_quantize(t, block)
            fp8[name], fp8[name + "_scale_inv"], deq[name] = q, scale, real
        else:
            fp8[name] = deq[name] = t
    qcfg = {**FP8_PUBLISHED, "weight_block_size": block}
    _save_dir(root / "hf", fp8, {**config, "quantization_config": qcfg})
    _save_dir(root / "deq", deq, config)
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "deq").eval()
    out = seif.convert.convert(root / "hf", root / "model.seif")
    return root, reference, out, block


def test_fp8_block_experts_pass_through_and_match_transformers(fp8_deepseek):
    """fp8 expert weights keep their bytes, carry an fp8-block descriptor with their scale
    (`<canonical>_scale`, in the expert's shard); dense fp8 weights keep their names and
    scales; the dequantized SEIF forward equals transformers' block on the dequantized
    weights."""
    root, reference, out, block = fp8_deepseek
    ckpt = seif.open(out)
    m = ckpt.manifest
    assert "quant.fp8-block" in m.required_features
    name = "layers.1.experts.3.down.weight"
    entry = m.tensors[name]
    assert entry.dtype == "F8_E4M3" and entry.quantization.scheme == "fp8-block"
    assert entry.quantization.block == block and entry.quantization.scale == name + "_scale"
    assert m.tensors[name + "_scale"].shard == entry.shard
    assert m.tensors[name + "_scale"].source_name.endswith("down_proj.weight_scale_inv")
    shared = m.tensors["layers.1.shared_experts.0.gate.weight"]
    assert shared.quantization.scale == "layers.1.shared_experts.0.gate.weight_scale"
    dense = "model.layers.0.self_attn.kv_b_proj.weight"
    assert m.tensors[dense].quantization.scale == dense + "_scale_inv"
    assert m.tensors[m.layers[0].router_name()].quantization is None
    src = _load_dir(root / "hf")
    np.testing.assert_array_equal(
        ckpt.tensor(name).view(np.uint8),
        src["model.layers.1.mlp.experts.3.down_proj.weight"].view(torch.uint8).numpy())
    rng = np.random.default_rng(1)
    for layer in m.layers:
        x = rng.standard_normal((T, layer.hidden_size)).astype(np.float32)
        params = ckpt.moe_params(layer.index)
        got = moe_forward(x, layer, params)
        want = hf_moe_output(reference, "deepseek_v3", layer.index, x)
        err = float(np.max(np.abs(got - want)))
        assert err <= 1e-5, f"fp8 layer {layer.index}: max abs err {err}"
        _, hf_idx = hf_route(reference, "deepseek_v3", layer.index, x)
        res = route(router_logits(x, params.router_weight, None), layer.routing,
                    params.selection_bias)
        np.testing.assert_array_equal(np.sort(hf_idx, -1), np.sort(res.indices, -1))


def test_fp8_round_trip_is_byte_identical(fp8_deepseek):
    root, _, out, _ = fp8_deepseek
    back = seif.convert.convert(out, root / "back", target_format="transformers")
    assert read_all(root / "hf") == read_all(back)
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((root / "hf" / "config.json").read_text())


def test_fp8_dtype_dequantizes(fp8_deepseek, tmp_path):
    """dtype="bf16": quantized weights (expert and dense) become their real values in bf16 and
    lose their scales, routers keep fp32; back in transformers the config drops its
    quantization_config and the model loads."""
    root, reference, _, block = fp8_deepseek
    if block != [8, 12]:
        pytest.skip("one block size is enough")
    out = seif.convert.convert(root / "hf", tmp_path / "bf16.seif", dtype="bf16")
    ckpt = seif.open(out)
    m = ckpt.manifest
    assert not any(f.startswith("quant.") for f in m.required_features)
    assert not any(n.endswith(("_scale", "_scale_inv")) for n in m.tensors)
    deq = _load_dir(root / "deq")
    for name, src in [("layers.2.experts.5.up.weight", "model.layers.2.mlp.experts.5.up_proj"),
                      ("model.layers.1.self_attn.o_proj.weight",
                       "model.layers.1.self_attn.o_proj")]:
        assert m.tensors[name].dtype == "BF16" and m.tensors[name].quantization is None
        np.testing.assert_array_equal(ckpt.tensor(name).astype(np.float32),
                                      deq[src + ".weight"].to(torch.bfloat16).float().numpy())
    assert m.tensors[m.layers[0].router_name()].dtype == "F32"
    back = seif.convert.convert(out, tmp_path / "back", target_format="transformers")
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype in (torch.bfloat16,
                                                                    torch.float32)


MXFP4_DIMS = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2)


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory):
    """A tiny gpt-oss with MXFP4 experts as published (`*_blocks` U8 [E, out, in/32, 16],
    `*_scales` U8 [E, out, in/32], biases bf16/fp32); the reference is the fp32 model with
    its experts set to transformers' own dequantization of those blocks."""
    from conftest import MXFP4_QUANTIZATION_CONFIG, pack_gpt_oss_mxfp4
    root = tmp_path_factory.mktemp("mxfp4")
    model = build("gpt_oss", root / "fp32", config_kwargs=MXFP4_DIMS)
    tensors = _load_dir(root / "fp32")
    pack_gpt_oss_mxfp4(model, tensors)
    config = json.loads((root / "fp32" / "config.json").read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    _save_dir(root / "hf", tensors, config)
    out = seif.convert.convert(root / "hf", root / "model.seif")
    return root, model, out


def test_mxfp4_dequantization_agrees_with_transformers():
    """seif.quant's mxfp4 (low nibble first, 2^(s-127)) against transformers' own
    convert_moe_packed_tensors on random bytes, for every scale but 255 (NaN in the spec)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from seif.manifest import Quantization
    from seif.quant import dequantize
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (2, 6, 3), dtype=torch.uint8, generator=gen)
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    for e in range(2):
        q = Quantization("mxfp4", [6, 96], "s", group_size=32)
        got = dequantize(blocks[e].numpy(), q, {"s": scales[e].numpy()}.__getitem__)
        np.testing.assert_array_equal(got, hf[e].numpy())


def test_mxfp4_experts_pass_through_and_match_transformers(mxfp4_gpt_oss):
    root, model, out = mxfp4_gpt_oss
    ckpt = seif.open(out)
    m = ckpt.manifest
    assert "quant.mxfp4" in m.required_features
    layer = m.layers[0]
    gate, up = layer.expert_name(2, "gate"), layer.expert_name(2, "up")
    assert m.tensors[gate].dtype == "U8" and m.tensors[gate].shape == [64, 2, 16]
    assert m.tensors[gate].quantization.logical_shape == [64, 64]
    assert m.tensors[gate + "_scale"].shard == m.tensors[gate].shard
    src = _load_dir(root / "hf")
    blocks = src["model.layers.0.mlp.experts.gate_up_proj_blocks"][2]
    np.testing.assert_array_equal(ckpt.tensor(gate), blocks[0::2].numpy())   # interleaved rows
    np.testing.assert_array_equal(ckpt.tensor(up), blocks[1::2].numpy())
    rng = np.random.default_rng(1)
    for layer in m.layers:
        x = rng.standard_normal((T, layer.hidden_size)).astype(np.float32)
        got = moe_forward(x, layer, ckpt.moe_params(layer.index))
        want = hf_moe_output(model, "gpt_oss", layer.index, x)
        err = float(np.max(np.abs(got - want)))
        assert err <= 1e-5, f"mxfp4 layer {layer.index}: max abs err {err}"
        params = ckpt.moe_params(layer.index)
        _, hf_idx = hf_route(model, "gpt_oss", layer.index, x)
        res = route(router_logits(x, params.router_weight, params.router_bias), layer.routing)
        np.testing.assert_array_equal(np.sort(hf_idx, -1), np.sort(res.indices, -1))


def test_mxfp4_round_trip_is_byte_identical(mxfp4_gpt_oss):
    root, _, out = mxfp4_gpt_oss
    back = seif.convert.convert(out, root / "back", target_format="transformers")
    assert read_all(root / "hf") == read_all(back)
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((root / "hf" / "config.json").read_text())


def test_mxfp4_dtype_bf16_dequantizes(mxfp4_gpt_oss, tmp_path):
    """--dtype bf16: experts become bf16 values (exactly transformers' bf16 dequantization),
    written back as the unquantized stacked `gate_up_proj` / `down_proj`; the router stays
    fp32, and transformers loads the result with no quantization_config."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    root, _, _ = mxfp4_gpt_oss
    out = seif.convert.convert(root / "hf", tmp_path / "bf16.seif", dtype="bf16")
    m = seif.open(out).manifest
    assert not any(f.startswith("quant.") for f in m.required_features)
    assert m.tensors[m.layers[0].router_name()].dtype == "F32"
    back = seif.convert.convert(out, tmp_path / "back", target_format="transformers")
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    src, got = _load_dir(root / "hf"), _load_dir(back)
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.1.mlp.experts.{proj}"
        want = convert_moe_packed_tensors(src[name + "_blocks"], src[name + "_scales"],
                                          dtype=torch.bfloat16)
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want)
    assert got["model.layers.1.mlp.experts.down_proj_bias"].dtype == torch.bfloat16
    transformers.AutoModelForCausalLM.from_pretrained(back)


def test_export_and_load_helpers(tmp_path):
    """`export(model, out)` from a live model and `load(path)` back give the same logits."""
    from seif.converters.transformers import export, load

    model = build("mixtral", tmp_path / "hf")
    out = export(model, tmp_path / "m.seif")
    assert seif.open(out).layers
    again = load(out).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    with pytest.raises(ConversionError, match="expected a transformers model"):
        export(object(), tmp_path / "x.seif")
    # A multimodal wrapper comes back as its own class (the family's auto class), every weight
    # bitwise the source's.
    vl = build("qwen3_vl_moe", tmp_path / "vl")
    again = load(export(vl, tmp_path / "vl.seif"))
    assert type(again) is type(vl)
    want = vl.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k


# --------------------------------------------------------------------------- family specifics
def _assert_layers_match(model, model_type: str, out: Path) -> None:
    """Every MoE layer of the SEIF checkpoint `out` against transformers' block in `model`:
    output within 1e-5, the same expert sets."""
    ckpt = seif.open(out)
    rng = np.random.default_rng(1)
    for layer in ckpt.layers:
        x = rng.standard_normal((T, layer.hidden_size)).astype(np.float32)
        params = ckpt.moe_params(layer.index)
        err = float(np.max(np.abs(moe_forward(x, layer, params)
                                  - hf_moe_output(model, model_type, layer.index, x))))
        assert err <= 1e-5, f"{model_type} layer {layer.index}: max abs err {err}"
        _, hf_idx = hf_route(model, model_type, layer.index, x)
        res = route(router_logits(x, params.router_weight, params.router_bias), layer.routing,
                    params.selection_bias)
        np.testing.assert_array_equal(np.sort(hf_idx, -1), np.sort(res.indices, -1))


def test_qwen3_vl_moe_published_expert_layout(tmp_path):
    """Published Qwen3-VL-MoE checkpoints stack experts `[E, H, 2I]` / `[E, I, H]`;
    save_pretrained writes `[E, 2I, H]` / `[E, H, I]`. transformers loads both (deciding by
    shape); SEIF reads both into the same canonical tensors, and the way back writes each
    layout as it was."""
    dims = {"moe_intermediate_size": 24}          # H = 32 != 2I: no square ambiguity
    model = build("qwen3_vl_moe", tmp_path / "hf", config_kwargs=dims)
    tensors = _load_dir(tmp_path / "hf")
    stacked = sorted(k for k in tensors if k.endswith(("experts.gate_up_proj",
                                                       "experts.down_proj")))
    assert len(stacked) == 4                      # MoE layers 1 and 2
    published = {k: v.transpose(1, 2).contiguous() if k in stacked else v
                 for k, v in tensors.items()}
    _publish(tmp_path, model, published)
    a = seif.open(seif.convert.convert(tmp_path / "hf", tmp_path / "a.seif"))
    b = seif.open(seif.convert.convert(tmp_path / "pub", tmp_path / "b.seif"))
    from seif.converters.transformers import METADATA_TRANSPOSED
    assert METADATA_TRANSPOSED not in a.manifest.metadata
    assert json.loads(b.manifest.metadata[METADATA_TRANSPOSED]) == stacked
    assert a.manifest.tensors.keys() == b.manifest.tensors.keys()
    for name in a.manifest.tensors:
        np.testing.assert_array_equal(a.tensor(name), b.tensor(name), err_msg=name)
    _assert_layers_match(model, "qwen3_vl_moe", tmp_path / "b.seif")
    back = seif.convert.convert(tmp_path / "b.seif", tmp_path / "back",
                                target_format="transformers")
    assert read_all(tmp_path / "pub") == read_all(back)


def test_axk2_masks_dropped_groups_to_zero(tmp_path):
    """A.X-K2 fills dropped groups with 0.0, not DeepSeek-V3's -inf. With every selection bias
    near -2 all choice values are negative, so the 0-filled dropped group (4 experts, k = 4)
    is exactly what gets picked: a -inf mask would pick the kept group instead."""
    kwargs = {"n_group": 2, "topk_group": 1, "num_experts_per_tok": 4}
    model = build("axk2", tmp_path / "hf0", config_kwargs=kwargs)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(-2.0, 0.1)
    model.save_pretrained(tmp_path / "hf")
    out = seif.convert.convert(tmp_path / "hf", tmp_path / "m.seif")
    ckpt = seif.open(out)
    assert {layer.routing.group_mask for layer in ckpt.layers} == {"zero"}
    _assert_layers_match(model, "axk2", out)
    layer = ckpt.layers[0]
    x = np.random.default_rng(1).standard_normal((T, layer.hidden_size)).astype(np.float32)
    params = ckpt.moe_params(layer.index)
    logits = router_logits(x, params.router_weight, None)
    zero = route(logits, layer.routing, params.selection_bias).indices
    import dataclasses
    inf = route(logits, dataclasses.replace(layer.routing, group_mask="neg_inf"),
                params.selection_bias).indices
    assert not np.array_equal(np.sort(zero, -1), np.sort(inf, -1))


def test_kimi_k25_published_names(tmp_path):
    """Kimi-K2.5 publishes its text decoder as `language_model.model.layers`; the installed
    save_pretrained writes `language_model.model.blocks`. transformers loads both into the same
    weights; SEIF maps both (keeping each layer's prefix), and the way back is exact."""
    model = build("kimi_k25", tmp_path / "hf")
    tensors = _load_dir(tmp_path / "hf")
    assert any(k.startswith("language_model.model.blocks.") for k in tensors)
    published = {k.replace("language_model.model.blocks.", "language_model.model.layers."): v
                 for k, v in tensors.items()}
    _publish(tmp_path, model, published)
    out = seif.convert.convert(tmp_path / "pub", tmp_path / "m.seif")
    assert [layer.source_prefix for layer in seif.open(out).layers] == \
        [f"language_model.model.layers.{i}.mlp" for i in (1, 2)]
    _assert_layers_match(model, "kimi_k25", out)
    back = seif.convert.convert(out, tmp_path / "back", target_format="transformers")
    assert read_all(tmp_path / "pub") == read_all(back)
