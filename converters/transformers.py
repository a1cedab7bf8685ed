"""transformers checkpoints <-> SEIF, family by family, exact.

A transformers checkpoint is a directory with `config.json` and safetensors file(s)
(`model.safetensors`, or shards listed in `model.safetensors.index.json`). This module reads the
files, never the live model: `save_pretrained` in transformers 5.x writes the *published*
per-expert names (e.g. Mixtral `block_sparse_moe.experts.{e}.w1.weight`), not the stacked
in-memory `gate_up_proj`, and the files are what users have. Some families publish stacked
experts (GraniteMoE `input_linear [E, 2I, H]`, gpt-oss `gate_up_proj [E, H, 2I]` interleaved,
Llama 4, DBRX): a :class:`Stacked` rule in the family table splits them into SEIF's per-expert
tensors, one expert slice at a time, and the same rule re-stacks them on the way back.

Families are described declaratively in :data:`FAMILIES`: where a layer's MoE block lives, the
source names of its router / expert / shared-expert tensors, which decoder layers are MoE, and a
function of the config giving the routing descriptor. Every routing fact was read off the
installed transformers modeling code (5.24) and is checked by `tests/test_transformers.py`
against transformers' own MoE block forward.

Tensors are streamed as raw bytes (each file's safetensors header parsed with
`seif.shardfile.read_header`, bytes read with `os.pread`), so bf16 / fp8 pass through bit for bit
and the model is never materialised. Importing this module needs neither torch nor transformers;
transformers is imported (for `AutoConfig`, which applies each family's defaults and attribute
maps) only when a conversion runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seif import dtypes
from seif.errors import ConversionError, FormatError, SeifError
from seif.layout import TensorSpec
from seif.manifest import (
    Capacity,
    FFNSpec,
    LayerSpec,
    ModelInfo,
    Quantization,
    RoutingSpec,
    SharedExpertsSpec,
    Training,
)
from seif.progress import byte_progress
from seif.shardfile import read_header

__all__ = ["FAMILIES", "REFUSED", "Family", "export", "from_seif", "load", "register",
           "stack_layer", "supported_families", "to_seif"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Manifest metadata key: JSON list of the stacked source tensors stored `[E, in, out]` by a
# `Stacked(transposed="auto")` rule (the others are `[E, out, in]`).
METADATA_TRANSPOSED = "transformers.transposed_sources"
SAFETENSORS_SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3   # what save_pretrained uses (5GB)
COPY_CHUNK = 64 * 1024 * 1024           # bounded memory when copying a large tensor
MXFP4_GROUP = 32                        # elements per MXFP4 group (one E8M0 scale)
FP8_DEFAULT_BLOCK = [128, 128]          # FineGrainedFP8Config.weight_block_size default
FP8_SCALE_SUFFIX = "_scale_inv"         # DeepSeek-V3: X.weight -> X.weight_scale_inv
# quantization_config.quant_method -> the SEIF scheme its tensors pass through as
QUANT_SCHEMES = {"fp8": "fp8-block", "mxfp4": "mxfp4"}
_CASTABLE = {"F64", "F32", "F16", "BF16"}   # what `dtype` casts to (as seif -> seif --dtype)


# --------------------------------------------------------------------------- config helpers
def _activation(cfg: Any, act: str | None = None) -> str:
    """transformers' `hidden_act` (or `act`) -> the SEIF gated activation (experts are
    act(gate) * up)."""
    act = getattr(cfg, "hidden_act", "silu") if act is None else act
    table = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu",
             "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh"}
    if act not in table:
        raise ConversionError(f"hidden_act {act!r} has no SEIF activation yet "
                              f"(supported: {', '.join(table)})")
    return table[act]


def _training(cfg: Any) -> Training:
    jitter = float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0)
    return Training(noise="jitter" if jitter > 0 else "none", noise_std=jitter,
                    aux_loss_coef=float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0))


def _softmax_topk(cfg: Any, *, renormalize: bool | None = None) -> RoutingSpec:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax (fp32) over all experts, top-k, the k
    probabilities renormalized to sum 1 when `norm_topk_prob` (Mixtral: always), no epsilon."""
    norm = bool(cfg.norm_topk_prob) if renormalize is None else renormalize
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="softmax",
                       normalize="sum" if norm else "none", training=_training(cfg))


def _deepseek_v3_routing(cfg: Any) -> RoutingSpec:
    """DeepseekV3TopkRouter: fp32 logits, sigmoid scores; choice = scores +
    e_score_correction_bias; group score = sum of the top-2 choice scores per group; keep
    `topk_group` groups, the rest masked to -inf; top-k of the choice; weights = unbiased scores
    at the chosen experts; if norm_topk_prob: / (sum + 1e-20); then x routed_scaling_factor
    (applied whether or not norm_topk_prob)."""
    norm = bool(cfg.norm_topk_prob)
    return RoutingSpec(kind="group_topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid",
                       selection_bias=True, normalize="sum" if norm else "none",
                       epsilon=1e-20 if norm else 0.0, epsilon_rule="add",
                       scale=float(cfg.routed_scaling_factor), n_group=int(cfg.n_group),
                       topk_group=int(cfg.topk_group), group_score="top2_sum",
                       group_mask="neg_inf", training=_training(cfg))


def _deepseek_v2_routing(cfg: Any) -> RoutingSpec:
    """DeepseekV2TopkRouter: fp32 logits, softmax scores; topk_method "greedy": plain top-k;
    "group_limited_greedy": group score = max score in the group, keep `topk_group` groups, the
    rest masked to 0.0; weights = the scores, never renormalized (norm_topk_prob is ignored by
    the installed code), x routed_scaling_factor."""
    method = cfg.topk_method
    common = dict(top_k=int(cfg.num_experts_per_tok), scoring="softmax", normalize="none",
                  scale=float(cfg.routed_scaling_factor), training=_training(cfg))
    if method == "greedy":
        return RoutingSpec(kind="topk", **common)
    if method == "group_limited_greedy":
        return RoutingSpec(kind="group_topk", n_group=int(cfg.n_group),
                           topk_group=int(cfg.topk_group), group_score="max", group_mask="zero",
                           **common)
    raise ConversionError(f"deepseek_v2 topk_method {method!r} is not supported yet (the "
                          "installed transformers defines greedy and group_limited_greedy)")


def _jetmoe_routing(cfg: Any) -> RoutingSpec:
    """JetMoeTopKGating: fp32 logits, top-k of the logits, softmax over the k (as GraniteMoE);
    its load-balancing coefficient is `aux_loss_coef`."""
    routing = _topk_softmax_over_k(cfg)
    routing.training.aux_loss_coef = float(getattr(cfg, "aux_loss_coef", 0.0) or 0.0)
    return routing


def _topk_softmax_over_k(cfg: Any) -> RoutingSpec:
    """GraniteMoE(Shared), gpt-oss: top-k of the raw logits, then softmax over the k chosen
    logits (scoring "softmax_topk"); nothing else."""
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="softmax_topk",
                       training=_training(cfg))


def _phimoe_routing(cfg: Any) -> RoutingSpec:
    """PhimoeTopKRouter -> sparsemixer (inference branch): router_jitter_noise is the sparse
    mixer's threshold eps, not noise; input_jitter_noise is the training-time input jitter."""
    if int(cfg.num_experts_per_tok) != 2:
        raise ConversionError(f"phimoe with num_experts_per_tok={cfg.num_experts_per_tok}: the "
                              "installed sparsemixer always picks exactly 2 experts, whatever "
                              "the config says; refusing a config that disagrees with the code")
    jitter = float(getattr(cfg, "input_jitter_noise", 0.0) or 0.0)
    return RoutingSpec(kind="sparse_mixer", top_k=2, jitter_eps=float(cfg.router_jitter_noise),
                       training=Training(noise="jitter" if jitter > 0 else "none",
                                         noise_std=jitter,
                                         aux_loss_coef=float(cfg.router_aux_loss_coef or 0.0)))


def _dbrx_routing(cfg: Any) -> RoutingSpec:
    """DbrxFFN.route_tokens_to_experts: softmax, top-k, then w / ||w||_p with
    p = moe_normalize_expert_weights (no epsilon; None = no normalization)."""
    f = cfg.ffn_config
    p = f.moe_normalize_expert_weights
    jitter = float(f.moe_jitter_eps or 0.0)
    return RoutingSpec(kind="topk", top_k=int(f.moe_top_k), scoring="softmax",
                       normalize="none" if p is None else "lp",
                       norm_p=1.0 if p is None else float(p),
                       training=Training(noise="jitter" if jitter > 0 else "none",
                                         noise_std=jitter,
                                         aux_loss_coef=float(f.moe_loss_weight or 0.0)))


def _dbrx_ffn(cfg: Any) -> FFNSpec:
    f = cfg.ffn_config
    return FFNSpec(int(f.ffn_hidden_size), _activation(cfg, (f.ffn_act_fn or {}).get("name",
                                                                                    "silu")))


def _ernie_routing(cfg: Any) -> RoutingSpec:
    """Ernie4_5_MoeTopKRouter: fp32 softmax; selection on softmax + e_score_correction_bias
    (moe_statics, choosing only); weights = unbiased softmax at the chosen experts /
    clamp(sum, min=moe_norm_min)."""
    return RoutingSpec(kind="topk", top_k=int(cfg.moe_k), scoring="softmax", selection_bias=True,
                       normalize="sum", epsilon=float(cfg.moe_norm_min), epsilon_rule="clamp",
                       training=_training(cfg))


def _lfm2_moe_routing(cfg: Any) -> RoutingSpec:
    """Lfm2MoeTopKRouter: sigmoid of the logits; choice on sigmoid + expert_bias when
    use_expert_bias (weights from the unbiased sigmoid); no groups; if norm_topk_prob:
    / (sum + 1e-6); then x routed_scaling_factor."""
    norm = bool(cfg.norm_topk_prob)
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid",
                       selection_bias=bool(cfg.use_expert_bias),
                       normalize="sum" if norm else "none", epsilon=1e-6 if norm else 0.0,
                       epsilon_rule="add", scale=float(cfg.routed_scaling_factor),
                       training=_training(cfg))


def _hunyuan_check(cfg: Any) -> None:
    for key in ("num_experts", "moe_topk"):
        if not isinstance(getattr(cfg, key), int):
            raise ConversionError(f"hunyuan_v1_moe with a per-layer {key} list: the installed "
                                  "HunYuanMoEV1Experts sizes every layer by one expert count; "
                                  "refusing a config the code cannot build")


def _ernie_moe_layer(cfg: Any, layer: int) -> bool:
    """Ernie4_5_MoeDecoderLayer: MoE iff (layer + 1) % moe_layer_interval == 0 and
    moe_layer_start_index <= layer <= moe_layer_end_index (-1 = last layer)."""
    end = cfg.moe_layer_end_index
    end = cfg.num_hidden_layers - 1 if end == -1 else end
    return (layer + 1) % cfg.moe_layer_interval == 0 and cfg.moe_layer_start_index <= layer <= end


def _llama4_routing(cfg: Any) -> RoutingSpec:
    """Llama4Router: top-k of the raw logits, sigmoid of the k chosen (others -inf -> 0); the
    weight multiplies the expert *input* (Llama4TextMoe scales routed_in), no renormalization."""
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid_topk",
                       weight_on="input", training=_training(cfg))


def _switch_routing(cfg: Any) -> RoutingSpec:
    """SwitchTransformersTop1Router: logits in router_dtype (fp32), softmax, argmax (top-1, no
    renormalization: the weight is the max probability); per sequence, an expert keeps the
    first `expert_capacity` tokens in position order (cumsum <= capacity), and a dropped token
    gets nothing from the MoE (0; the residual is outside the block)."""
    if getattr(cfg, "router_dtype", "float32") != "float32":
        raise ConversionError(f"switch_transformers router_dtype {cfg.router_dtype!r}: SEIF "
                              "routes in float32 only")
    return RoutingSpec(kind="topk", top_k=1, scoring="softmax", router_bias=bool(cfg.router_bias),
                       capacity=Capacity(tokens=int(cfg.expert_capacity), drop_policy="zero"),
                       training=Training(
                           noise="jitter" if cfg.router_jitter_noise else "none",
                           noise_std=float(cfg.router_jitter_noise or 0.0),
                           aux_loss_coef=float(cfg.router_aux_loss_coef or 0.0),
                           z_loss_coef=float(cfg.router_z_loss_coef or 0.0)))


def _switch_block(cfg: Any, layer: int) -> str:
    """SEIF layer index: encoder blocks 0..num_layers-1, then decoder blocks."""
    if layer < cfg.num_layers:
        return f"encoder.block.{layer}.layer.1.mlp"
    return f"decoder.block.{layer - cfg.num_layers}.layer.2.mlp"


def _switch_sparse(cfg: Any, layer: int) -> bool:
    """SwitchTransformersStack: block i is sparse iff step > 0 and (i % step == 1 or
    step == 1), step = encoder_sparse_step / decoder_sparse_step."""
    decoder = layer >= cfg.num_layers
    i = layer - cfg.num_layers if decoder else layer
    step = cfg.decoder_sparse_step if decoder else cfg.encoder_sparse_step
    return step > 0 and (i % step == 1 or step == 1)


def _ungated(act: str) -> str:
    table = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu",
             "relu2": "relu2"}     # transformers' relu2 = relu(x)^2 (ReLUSquaredActivation)
    if act not in table:
        raise ConversionError(f"activation {act!r} has no SEIF ungated activation yet "
                              f"(supported: {', '.join(table)})")
    return table[act]


def _ernie_check(cfg: Any) -> None:
    if getattr(cfg, "use_bias", False):
        raise ConversionError("ernie4_5_moe with use_bias=True is not supported yet: the shared "
                              "expert would carry biases the routed experts do not (unverified)")


def _no_mlp_bias(cfg: Any) -> None:
    if getattr(cfg, "mlp_bias", False):
        raise ConversionError("mlp_bias=True is not supported yet: the shared expert would carry "
                              "biases the routed experts do not")


def _qwen_sparse_layer(cfg: Any, layer: int) -> bool:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: MoE iff not in mlp_only_layers and
    num_experts > 0 and (layer + 1) % decoder_sparse_step == 0."""
    return (layer not in (cfg.mlp_only_layers or [])) and cfg.num_experts > 0 \
        and (layer + 1) % cfg.decoder_sparse_step == 0


def _sparse_by_type(cfg: Any, layer: int) -> bool:
    """Decoder layers built from `mlp_layer_types` (DeepSeek-V3.2, GLM-MoE-DSA, EXAONE-MoE,
    MiMo-V2-Flash, Kimi-Linear, Bailing-hybrid, A.X-K2, Mellum): MoE iff "sparse"."""
    return cfg.mlp_layer_types[layer] == "sparse"


def _axk2_routing(cfg: Any) -> RoutingSpec:
    """AXK2TopkRouter: DeepSeek-V3's (sigmoid, selection bias, +1e-20 renormalization if
    norm_topk_prob, routed scaling), except that dropped groups are masked to 0.0, not -inf,
    and that without `n_group` (A.X-K2-Light) there is no group stage at all."""
    norm = bool(cfg.norm_topk_prob)
    common = dict(top_k=int(cfg.num_experts_per_tok), scoring="sigmoid", selection_bias=True,
                  normalize="sum" if norm else "none", epsilon=1e-20 if norm else 0.0,
                  epsilon_rule="add", scale=float(cfg.routed_scaling_factor),
                  training=_training(cfg))
    if cfg.n_group is None:
        return RoutingSpec(kind="topk", **common)
    return RoutingSpec(kind="group_topk", n_group=int(cfg.n_group),
                       topk_group=int(cfg.topk_group), group_score="top2_sum",
                       group_mask="zero", **common)


def _sigmoid_biased(cfg: Any, *, epsilon: float = 0.0, scale: float = 1.0) -> RoutingSpec:
    """MiniMax-M2, HY-V3: sigmoid of the logits; choice = sigmoid + a block-level selection
    bias (weights from the unbiased sigmoid); no groups; weights / (sum + epsilon), always;
    x scale."""
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid",
                       selection_bias=True, normalize="sum", epsilon=epsilon,
                       epsilon_rule="add", scale=scale, training=_training(cfg))


def _laguna_routing(cfg: Any) -> RoutingSpec:
    """LagunaTopKRouter + LagunaSparseMoeBlock: sigmoid, selection bias, top-k, / sum (no
    epsilon); the block multiplies the routed output by moe_routed_scaling_factor (= scaling
    the weights). A router logit softcap has no SEIF field: refused."""
    if float(cfg.moe_router_logit_softcapping or 0.0) > 0.0:
        raise ConversionError(f"laguna with moe_router_logit_softcapping="
                              f"{cfg.moe_router_logit_softcapping}: SEIF 1.0 has no router "
                              "logit softcap")
    return _sigmoid_biased(cfg, scale=float(cfg.moe_routed_scaling_factor))


def _kolibri1_routing(cfg: Any) -> RoutingSpec:
    """Kolibri1TopKRouter: fp32 logits; top-k of logits + selection bias; weights = sigmoid
    of the k unbiased logits, / their sum (no epsilon) if norm_topk_prob."""
    norm = bool(cfg.norm_topk_prob)
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid_topk",
                       selection_bias=True, normalize="sum" if norm else "none",
                       training=_training(cfg))


def _cohere2_moe_routing(cfg: Any) -> RoutingSpec:
    """Cohere2MoeTopKRouter: top-k of the raw logits; expert_selection_fn "softmax": softmax
    over the k (norm_topk_prob unused); "sigmoid": sigmoid of the k, / their sum (no epsilon)
    if norm_topk_prob. Cohere2MoeSparseMoeBlock's "average" of routed and shared outputs has
    no SEIF field: refused."""
    if int(cfg.num_shared_experts or 0) > 0 and cfg.shared_expert_combination_strategy != "sum":
        raise ConversionError(f"cohere2_moe with shared_expert_combination_strategy="
                              f"{cfg.shared_expert_combination_strategy!r}: SEIF adds the shared "
                              "output to the routed one; averaging them has no SEIF field")
    fn = cfg.expert_selection_fn
    k = int(cfg.num_experts_per_tok)
    if fn == "softmax":
        return RoutingSpec(kind="topk", top_k=k, scoring="softmax_topk", training=_training(cfg))
    if fn == "sigmoid":
        return RoutingSpec(kind="topk", top_k=k, scoring="sigmoid_topk",
                           normalize="sum" if cfg.norm_topk_prob else "none",
                           training=_training(cfg))
    raise ConversionError(f"cohere2_moe expert_selection_fn {fn!r} (the installed code defines "
                          "softmax and sigmoid)")


def _flint_routing(cfg: Any) -> RoutingSpec:
    """FlintTopKRouter: fp32 logits, sigmoid, top-k of the sigmoid (no selection bias, no
    groups), divided by their plain sum (no epsilon) when norm_topk_prob; no scaling."""
    norm = bool(cfg.norm_topk_prob)
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid",
                       normalize="sum" if norm else "none", training=_training(cfg))


_GATE_UP_DOWN = {"gate": "experts.{e}.gate_proj", "up": "experts.{e}.up_proj",
                 "down": "experts.{e}.down_proj"}
_SHARED_GATE_UP_DOWN = {"gate": "{p}.gate_proj", "up": "{p}.up_proj", "down": "{p}.down_proj"}


@dataclass(frozen=True)
class Stacked:
    """One source tensor that holds a projection (or several) of *every* expert at once, which
    SEIF stores as separate per-expert tensors (`[out, in]` weights, `[out]` biases).

    The rule is a pure permutation of elements, so both directions are bit exact:

    * the source is `[E, out, in]` (weights) or `[E, out]` (biases); `transposed` means
      `[E, in, out]` (the expert computes `x @ W`: gpt-oss, Llama 4, DBRX's w2); "auto" is
      decided per tensor from its stored shape, and the tensors found transposed are listed in
      the manifest's metadata (`METADATA_TRANSPOSED`) so the way back writes them the same way;
    * `flat`: the expert axis is folded into the first one, `[E * out, in]` (DBRX);
    * `per_expert=False`: no expert axis at all, the tensor of one module (GraniteMoeShared's
      shared MLP); its pieces are shared expert 0's;
    * several projections (`projs`, e.g. gate and up) share the `out` axis: `concat` = first
      block gate, then up (GraniteMoE, Llama 4: `chunk(2)`); `interleave` = gate at even,
      up at odd positions (gpt-oss: `[..., ::2]`, `[..., 1::2]`).

    Expert e's slice is contiguous in the file (`nbytes / E` bytes at `e * nbytes / E`), so
    conversion streams one expert at a time. SEIF -> transformers re-stacks with the same rule
    from the family table; the manifest records only `source_name` (the stacked tensor) on each
    piece.
    """

    suffix: str                   # under the block (shared: under the shared prefix)
    projs: tuple[str, ...]        # SEIF projections held, in storage order
    part: str = "weight"          # "weight" | "bias" | "weight_scale" (a quantization companion)
    # True / False, or "auto": as transformers' `Transpose(check_dims=True)` loads it, `[E, out,
    # in]` when the stored shape is that (square: always), else `[E, in, out]` (Qwen3-VL-MoE:
    # published checkpoints are `[E, in, out]`, save_pretrained writes `[E, out, in]`).
    transposed: bool | str = False
    split: str = "concat"         # "concat" | "interleave"
    flat: bool = False
    per_expert: bool = True
    # Quantized experts (gpt-oss MXFP4): `quant` is the SEIF scheme of the pieces. The rule of
    # the stored values (part "weight", shape [E, out, in/32, 16]) names in `scale` the suffix
    # of its companion rule's tensor (part "weight_scale", [E, out, in/32]).
    quant: str | None = None
    scale: str | None = None


@dataclass(frozen=True)
class Family:
    """How one transformers model_type lays out and routes its MoE layers.

    Source names are `{block}.{pattern}.{weight|bias}`, `block` being `block.format(l=layer)`
    (or `block(cfg, layer)`). `experts` maps SEIF projections to patterns with `{e}`; `shared`
    to patterns with `{p}` (= `{block}.{shared_module}`, or `shared_prefix`). Projections
    covered by a `stacked` / `shared_stacked` rule are read from that stacked tensor instead.
    The callables take the transformers config object (AutoConfig); `check` refuses configs
    the mapping cannot express, before any tensor is read.

    A checkpoint with several MoE decoder stacks (Qwen3-Omni-MoE: thinker and talker) is one
    family whose `stacks` are Family objects of their own (each with its `sub_config`, a
    dotted path, its block template numbered by the stack's own layer index, routing, ...);
    the family itself then names no block. SEIF layer indices run over the stacks in order:
    stack s's layer j is `j + ` the layer slots (`n_layers`) of the stacks before it, as
    Switch numbers encoder then decoder blocks (see :func:`stack_layer`).
    """

    model_type: str
    # template with {l}, or (cfg, l) -> prefix; None only with `stacks`
    block: str | Callable[[Any, int], str] | None = None
    num_experts: Callable[[Any], int] | None = None
    routing: Callable[[Any], RoutingSpec] | None = None
    expert_ffn: Callable[[Any], FFNSpec] | None = None
    is_moe_layer: Callable[[Any, int], bool] = lambda cfg, layer: True
    router: str = "gate"
    experts: dict[str, str] = field(default_factory=lambda: dict(_GATE_UP_DOWN))
    router_bias: str | None = None            # full tensor suffix, e.g. "gate.bias"
    selection_bias: str | None = None         # e.g. "gate.e_score_correction_bias"; with {l}:
    #                                           an absolute template (outside the block)
    shared_module: str | None = None
    shared: dict[str, str] = field(default_factory=lambda: dict(_SHARED_GATE_UP_DOWN))
    shared_ffn: Callable[[Any], FFNSpec] | None = None
    shared_gate: str | None = None            # full tensor suffix, [1, H]
    # Absolute prefix of the shared expert's tensors when they live outside the MoE block
    # (GraniteMoeShared: `model.layers.{l}.shared_mlp`); default `{block}.{shared_module}`.
    shared_prefix: str | None = None
    stacked: tuple[Stacked, ...] = ()         # expert tensors stored stacked (replace `experts`)
    shared_stacked: tuple[Stacked, ...] = ()  # shared tensors stored fused (replace `shared`)
    selection_bias_lead: tuple[int, ...] = ()  # source shape is lead + [E] (ERNIE: (1,))
    check: Callable[[Any], None] | None = None  # refuses configs the mapping cannot express
    # Number of layer slots (SEIF layer indices); default num_hidden_layers. Encoder-decoder
    # families number encoder layers first, then decoder layers.
    n_layers: Callable[[Any], int] | None = None
    # What loads the source (verify's oracle, load(), tests): an Auto class, or the model
    # class itself where no Auto class maps the config (deepseek_ocr2_text).
    automodel: str = "AutoModelForCausalLM"
    notes: str = ""
    # quantization_config.quant_method -> the stacked rules that replace `stacked` for a
    # checkpoint quantized that way (gpt-oss: "mxfp4"). FP8 block quantization ("fp8") of
    # plainly stored tensors needs no entry: every family with per-expert tensors takes it.
    quantized: dict[str, tuple[Stacked, ...]] = field(default_factory=dict)
    # Multimodal wrappers: the attribute of the checkpoint's config holding the text decoder's
    # config (e.g. "text_config"); every callable above then receives that config. Tensors
    # outside the text decoder's MoE blocks (vision tower, projector) pass through as dense.
    sub_config: str | None = None
    # Other on-disk templates of `block` that transformers also loads (the first whose router
    # tensor is present wins; the manifest keeps each layer's prefix for the way back), and the
    # in-memory module path when it differs from every on-disk one (for finding the block in a
    # live model: seif.converters.torch.find_moe_block, seif verify's oracle).
    block_alternatives: tuple[str, ...] = ()
    module: str | None = None
    # The block's own output bias [H], added after the experts (SEIF 1.1 `output_bias`,
    # tensor `layers.{l}.output_bias`): its suffix under the block (JetMoE: "bias").
    output_bias: str | None = None
    # Several MoE decoder stacks, in SEIF layer-index order (see the class docstring).
    stacks: tuple[Family, ...] = ()

    def __post_init__(self) -> None:
        single = (self.block, self.num_experts, self.routing, self.expert_ffn)
        if self.stacks and any(v is not None for v in single):
            raise TypeError(f"{self.model_type}: a family with stacks names no block of its own")
        if not self.stacks and any(v is None for v in single):
            raise TypeError(f"{self.model_type}: block, num_experts, routing and expert_ffn "
                            "are required")


def _sub_config(cfg: Any, path: str | None) -> Any:
    """`cfg.a.b` for the dotted path "a.b" (a stack's config inside a composite config)."""
    for part in (path.split(".") if path else ()):
        cfg = getattr(cfg, part)
    return cfg


def _n_slots(family: Family, cfg: Any) -> int:
    """The number of SEIF layer indices one (single-stack) family's layers take, `cfg` being
    its own (sub-)config: `n_layers`, default num_hidden_layers."""
    return int(family.n_layers(cfg) if family.n_layers else cfg.num_hidden_layers)


def _template_index(template: str, prefix: str) -> int | None:
    """The `{l}` of `prefix` if it is `template` with a layer index filled in, else None."""
    head, sep, tail = template.partition("{l}")
    if not sep or not prefix.startswith(head) or not prefix.endswith(tail):
        return None
    digits = prefix[len(head): len(prefix) - len(tail)]
    return int(digits) if digits.isdigit() else None


def stack_layer(family: Family, index: int, *, source_prefix: str | None = None,
                config: Any = None) -> tuple[Family, int]:
    """(stack, layer index in that stack's own numbering) of SEIF layer `index`; a
    single-stack family is its own stack, its numbering SEIF's.

    With `config` (the checkpoint's whole config) the stack is found from `index` and the
    stacks' layer counts; otherwise from `source_prefix` (what the manifest records per
    layer), matched against each stack's block templates."""
    if not family.stacks:
        return family, index
    if config is not None:
        offset = 0
        for stack in family.stacks:
            n = _n_slots(stack, _sub_config(config, stack.sub_config))
            if offset <= index < offset + n:
                return stack, index - offset
            offset += n
        raise ConversionError(f"{family.model_type} has {offset} layer slots; there is no "
                              f"layer {index}")
    if source_prefix is not None:
        for stack in family.stacks:
            for template in (stack.block, *stack.block_alternatives):
                j = _template_index(template, source_prefix) if isinstance(template, str) \
                    else None
                if j is not None:
                    return stack, j
    raise ConversionError(f"layer {index} of this {family.model_type} checkpoint: its source "
                          f"prefix {source_prefix!r} is under none of the family's MoE stacks")


def _stacks(family: Family) -> tuple[Family, ...]:
    return family.stacks or (family,)


_DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    block="model.layers.{l}.mlp",
    num_experts=lambda c: c.n_routed_experts,
    routing=_deepseek_v3_routing,
    expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
    is_moe_layer=lambda c, layer: layer >= c.first_k_dense_replace,
    selection_bias="gate.e_score_correction_bias",
    shared_module="shared_experts",
    shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts,
                                 _activation(c)),
    notes="sigmoid, group-limited top-k (top-2 sum, -inf mask), selection bias, "
          "norm_topk_prob (+1e-20), routed_scaling_factor; first_k_dense_replace; "
          "n_shared_experts as one MLP of moe_intermediate_size * n_shared_experts",
)


_QWEN3_MOE = Family(
    model_type="qwen3_moe",
    block="model.layers.{l}.mlp",
    num_experts=lambda c: c.num_experts,
    routing=_softmax_topk,
    expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
    is_moe_layer=_qwen_sparse_layer,
    notes="softmax, top-k, norm_topk_prob; decoder_sparse_step, mlp_only_layers",
)


def _like_deepseek_v3(model_type: str, notes: str, **changes) -> Family:
    """A family whose MoE block is DeepSeek-V3's verbatim (router, experts, shared experts);
    only the model type, the MoE-layer rule and the notes differ."""
    return dataclasses.replace(_DEEPSEEK_V3, model_type=model_type, notes=notes, **changes)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(
        model_type="mixtral",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=lambda c: _softmax_topk(c, renormalize=True),
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
        notes="softmax, top-k, always renormalized",
    ),
    Family(
        model_type="qwen2_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_qwen_sparse_layer,
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        shared_gate="shared_expert_gate.weight",
        notes="softmax, top-k, norm_topk_prob; shared expert x sigmoid(shared gate); "
              "decoder_sparse_step, mlp_only_layers",
    ),
    _QWEN3_MOE,
    Family(
        model_type="qwen3_next",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_qwen_sparse_layer,
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        shared_gate="shared_expert_gate.weight",
        notes="as qwen2_moe (the hybrid linear/full attention is dense)",
    ),
    Family(
        model_type="flex_olmo",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        notes="as olmoe",
    ),
    Family(
        model_type="minimax",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=lambda c: _softmax_topk(c, renormalize=True),
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
        notes="as mixtral; the decoder layer's mlp_alpha/beta_factor residual mix and the "
              "lightning attention are outside the MoE block (dense)",
    ),
    Family(
        model_type="hunyuan_v1_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=lambda c: _softmax_topk(c, renormalize=True),
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        router="gate.wg",
        shared_module="shared_mlp",
        shared_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        check=_hunyuan_check,
        notes="fp32 router (gate.wg), softmax, top-k (moe_topk), always renormalized; an "
              "ungated shared MLP of intermediate_size",
    ),
    Family(
        model_type="lfm2_moe",
        block="model.layers.{l}.feed_forward",
        num_experts=lambda c: c.num_experts,
        routing=_lfm2_moe_routing,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: layer >= c.num_dense_layers,
        experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
        selection_bias="expert_bias",
        notes="sigmoid, top-k (no groups), selection bias expert_bias (use_expert_bias), "
              "norm_topk_prob (+1e-6), routed_scaling_factor; num_dense_layers",
    ),
    Family(
        model_type="olmoe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        notes="softmax, top-k, norm_topk_prob (default off)",
    ),
    _DEEPSEEK_V3,
    # Glm4MoeTopkRouter, Dots1TopkRouter are DeepseekV3TopkRouter verbatim; Glm4MoeLiteMoE and
    # SolarOpenMoE are Glm4MoeMoE.
    _like_deepseek_v3("glm4_moe", "as deepseek_v3"),
    _like_deepseek_v3("glm4_moe_lite", "as deepseek_v3; MoE where mlp_layer_types[l] == 'sparse'",
                      is_moe_layer=lambda c, layer: c.mlp_layer_types[layer] == "sparse"),
    _like_deepseek_v3("solar_open", "as deepseek_v3; every layer MoE",
                      is_moe_layer=lambda c, layer: True),
    _like_deepseek_v3("dots1", "as deepseek_v3"),
    # Config-only model types: transformers loads sarvam_mla with DeepseekV3ForCausalLM and
    # sarvam_moe with Glm4MoeForCausalLM (whose save_pretrained publishes the selection bias as
    # gate.expert_bias, and attention / embeddings under Sarvam's own names, passed as dense).
    _like_deepseek_v3("sarvam_mla", "as deepseek_v3 (DeepseekV3ForCausalLM)"),
    _like_deepseek_v3("sarvam_moe", "as glm4_moe (Glm4MoeForCausalLM); selection bias published "
                      "as gate.expert_bias", selection_bias="gate.expert_bias"),
    # Their TopkRouter / Experts / MoE classes are DeepSeek-V3's verbatim (the router reads
    # config.num_local_experts, an attribute-map alias); layers MoE per mlp_layer_types.
    *(_like_deepseek_v3(t, "as deepseek_v3; MoE where mlp_layer_types[l] == 'sparse'",
                        num_experts=lambda c: c.num_local_experts,
                        is_moe_layer=_sparse_by_type)
      for t in ("deepseek_v32", "glm_moe_dsa")),
    _like_deepseek_v3("kimi_linear", "as deepseek_v3, published with Mixtral names "
                      "(block_sparse_moe, experts w1/w3/w2); MoE where mlp_layer_types[l] == "
                      "'sparse'",
                      block="model.layers.{l}.block_sparse_moe",
                      experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3",
                               "down": "experts.{e}.w2"},
                      num_experts=lambda c: c.num_local_experts, is_moe_layer=_sparse_by_type),
    _like_deepseek_v3("bailing_hybrid", "as deepseek_v3 (selection bias published as "
                      "gate.expert_bias); MoE where mlp_layer_types[l] == 'sparse'; MTP layers "
                      "(layers.{num_hidden_layers}+, which transformers ignores) pass through "
                      "as dense tensors",
                      selection_bias="gate.expert_bias",
                      num_experts=lambda c: c.num_local_experts, is_moe_layer=_sparse_by_type),
    _like_deepseek_v3("exaone_moe", "as deepseek_v3 (num_experts, num_shared_experts; the "
                      "selection bias on disk at mlp.e_score_correction_bias); MoE where "
                      "mlp_layer_types[l] == 'sparse'",
                      num_experts=lambda c: c.num_experts, is_moe_layer=_sparse_by_type,
                      selection_bias="e_score_correction_bias",   # published, block level
                      shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size
                                                   * c.num_shared_experts, _activation(c))),
    _like_deepseek_v3("mimo_v2_flash", "as deepseek_v3 without shared experts; MoE where "
                      "mlp_layer_types[l] == 'sparse'",
                      num_experts=lambda c: c.num_local_experts, is_moe_layer=_sparse_by_type,
                      shared_module=None, shared_ffn=None),
    _like_deepseek_v3("beam", "as deepseek_v3 without shared experts (routed_scaling_factor "
                      "applied by the block after aggregation: the same); MoE where "
                      "mlp_layer_types[l] == 'sparse'; its final_logit_softcapping is on the LM "
                      "head (dense)",
                      num_experts=lambda c: c.num_experts, is_moe_layer=_sparse_by_type,
                      shared_module=None, shared_ffn=None),
    _like_deepseek_v3("axk2", "sigmoid, selection bias, group-limited top-k with dropped groups "
                      "masked to 0 (no groups when n_group is null), +1e-20 renormalization, "
                      "routed scaling; shared experts; MoE where mlp_layer_types[l] == 'sparse' "
                      "(the gated RMSNorms around it are dense)",
                      num_experts=lambda c: c.num_local_experts, is_moe_layer=_sparse_by_type,
                      routing=_axk2_routing),
    # Multimodal wrappers: the text decoder's MoE blocks, the rest dense.
    _like_deepseek_v3("glm4v_moe", "as glm4_moe, in the text decoder "
                      "(model.language_model); vision tower dense",
                      block="model.language_model.layers.{l}.mlp", sub_config="text_config",
                      automodel="AutoModelForImageTextToText"),
    Family(
        model_type="qwen3_vl_moe",
        block="model.language_model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=lambda c: _softmax_topk(c, renormalize=True),
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_qwen_sparse_layer,
        stacked=(Stacked("experts.gate_up_proj", ("gate", "up"), transposed="auto"),
                 Stacked("experts.down_proj", ("down",), transposed="auto")),
        sub_config="text_config",
        automodel="AutoModelForImageTextToText",
        notes="text decoder (model.language_model): softmax, top-k, always renormalized; "
              "decoder_sparse_step, mlp_only_layers; experts stacked, published [E, H, 2I] / "
              "[E, I, H] or as save_pretrained writes them [E, 2I, H] / [E, H, I] (gate "
              "then up), told apart by shape as transformers does; vision tower dense",
    ),
    Family(
        model_type="qwen3_5_moe",
        block="model.language_model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=lambda c: _softmax_topk(c, renormalize=True),
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        shared_gate="shared_expert_gate.weight",
        sub_config="text_config",
        automodel="AutoModelForImageTextToText",
        notes="text decoder (model.language_model), every layer MoE: softmax, top-k, always "
              "renormalized; shared expert x sigmoid(shared gate); vision tower dense",
    ),
    Family(
        model_type="minimax_m2",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=_sigmoid_biased,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
        selection_bias="e_score_correction_bias",
        notes="sigmoid, top-k, selection bias (block-level e_score_correction_bias), always "
              "renormalized (no epsilon); Mixtral names on disk; every layer MoE",
    ),
    Family(
        model_type="hy_v3",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=lambda c: _sigmoid_biased(c, epsilon=1e-20,
                                          scale=float(c.router_scaling_factor)),
        expert_ffn=lambda c: (_no_mlp_bias(c), FFNSpec(c.moe_intermediate_size,
                                                       _activation(c)))[1],
        is_moe_layer=_sparse_by_type,
        router="router.gate",
        selection_bias="expert_bias",
        shared_module="shared_mlp",
        shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.num_shared_experts,
                                     _activation(c)),
        notes="fp32 router (router.gate), sigmoid, top-k, selection bias (expert_bias), "
              "renormalized (+1e-20), x router_scaling_factor; an ungated shared MLP "
              "(shared_mlp); MoE where mlp_layer_types[l] == 'sparse'",
    ),
    Family(
        model_type="laguna",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_laguna_routing,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_sparse_by_type,
        selection_bias="experts.e_score_correction_bias",      # as published
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        notes="sigmoid, top-k, selection bias (experts.e_score_correction_bias on disk), "
              "renormalized (no epsilon), x moe_routed_scaling_factor; an ungated shared "
              "expert; MoE where mlp_layer_types[l] == 'sparse'; router logit softcap refused",
    ),
    Family(
        model_type="kolibri1",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_kolibri1_routing,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        selection_bias="model.layers.{l}.moe.router.expert_bias",     # as published
        shared_module="shared_experts",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        notes="fp32 router; top-k of logits + selection bias (moe.router.expert_bias), "
              "sigmoid of the k unbiased logits, renormalized if norm_topk_prob; an ungated "
              "shared MLP; every layer MoE",
    ),
    Family(
        model_type="afmoe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=lambda c: _sigmoid_biased(c, epsilon=1e-20, scale=float(c.route_scale)),
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: layer >= c.num_dense_layers,
        router="router.gate",
        selection_bias="expert_bias",
        shared_module="shared_experts",
        shared_ffn=lambda c: (FFNSpec(c.moe_intermediate_size * c.num_shared_experts,
                                      _activation(c)) if c.num_shared_experts else None),
        notes="fp32 sigmoid (router.gate), top-k, selection bias (block-level expert_bias), "
              "renormalized (+1e-20), x route_scale; ungated shared experts; num_dense_layers",
    ),
    Family(
        model_type="cohere2_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_cohere2_moe_routing,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: c.mlp_layer_types[layer] != "dense",
        shared_module="shared_experts",
        shared_ffn=lambda c: (FFNSpec(c.intermediate_size * c.num_shared_experts,
                                      _activation(c)) if c.num_shared_experts else None),
        notes="top-k of logits, softmax over the k (or sigmoid of the k, renormalized if "
              "norm_topk_prob); shared experts added (\"sum\"; \"average\" refused); MoE "
              "where mlp_layer_types[l] != 'dense'",
    ),
    # Qwen-style routers in text models.
    dataclasses.replace(_QWEN3_MOE, model_type="mellum", is_moe_layer=_sparse_by_type,
                        notes="as qwen3_moe; MoE where mlp_layer_types[l] == 'sparse'"),
    Family(
        model_type="lara_mini",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        stacked=(Stacked("experts.gate_up_proj", ("gate", "up")),
                 Stacked("experts.down_proj", ("down",))),
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        notes="fp32 router, softmax, top-k, norm_topk_prob; an ungated shared expert; every "
              "layer MoE; experts stacked on disk as in memory ([E, 2I, H], gate rows then "
              "up; [E, H, I])",
    ),
    Family(
        model_type="flint",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_flint_routing,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_qwen_sparse_layer,
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        notes="fp32 router, sigmoid, top-k (no bias, no groups), plain-sum renormalization if "
              "norm_topk_prob; an ungated shared expert; decoder_sparse_step, mlp_only_layers",
    ),
    Family(
        model_type="deepseek_v2",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.n_routed_experts,
        routing=_deepseek_v2_routing,
        expert_ffn=lambda c: (_no_mlp_bias(c), FFNSpec(c.moe_intermediate_size,
                                                       _activation(c)))[1],
        is_moe_layer=lambda c, layer: layer >= c.first_k_dense_replace,
        shared_module="shared_experts",
        shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts,
                                     _activation(c)),
        notes="softmax; greedy top-k or group-limited (group max, masked to 0); never "
              "renormalized; routed_scaling_factor; first_k_dense_replace; shared experts",
    ),
    Family(
        model_type="granitemoe",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=_topk_softmax_over_k,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        router="router.layer",
        stacked=(Stacked("input_linear.weight", ("gate", "up")),
                 Stacked("output_linear.weight", ("down",))),
        notes="top-k of logits, softmax over the k; experts stacked on disk "
              "(input_linear [E, 2I, H] = gate rows then up rows, output_linear [E, H, I])",
    ),
    Family(
        model_type="granitemoeshared",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=_topk_softmax_over_k,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        router="router.layer",
        stacked=(Stacked("input_linear.weight", ("gate", "up")),
                 Stacked("output_linear.weight", ("down",))),
        shared_prefix="model.layers.{l}.shared_mlp",
        shared_ffn=lambda c: (FFNSpec(c.shared_intermediate_size, _activation(c))
                              if c.shared_intermediate_size else None),
        shared={"down": "{p}.output_linear"},
        shared_stacked=(Stacked("input_linear.weight", ("gate", "up"), per_expert=False),),
        notes="as granitemoe, plus a shared SwiGLU MLP with no sigmoid gate (decoder-layer "
              "shared_mlp; fused input_linear [2I, H] = gate rows then up rows) added to the "
              "MoE output",
    ),
    Family(
        model_type="gpt_oss",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_local_experts,
        routing=_topk_softmax_over_k,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, "swiglu_oai", bias=True,
                                     alpha=float(c.swiglu_alpha), limit=float(c.swiglu_limit)),
        router="router",
        router_bias="router.bias",
        stacked=(Stacked("experts.gate_up_proj", ("gate", "up"), transposed=True,
                         split="interleave"),
                 Stacked("experts.gate_up_proj_bias", ("gate", "up"), part="bias",
                         split="interleave"),
                 Stacked("experts.down_proj", ("down",), transposed=True),
                 Stacked("experts.down_proj_bias", ("down",), part="bias")),
        quantized={"mxfp4": (
            Stacked("experts.gate_up_proj_blocks", ("gate", "up"), split="interleave",
                    quant="mxfp4", scale="experts.gate_up_proj_scales"),
            Stacked("experts.gate_up_proj_scales", ("gate", "up"), part="weight_scale",
                    split="interleave", quant="mxfp4"),
            Stacked("experts.gate_up_proj_bias", ("gate", "up"), part="bias",
                    split="interleave"),
            Stacked("experts.down_proj_blocks", ("down",), quant="mxfp4",
                    scale="experts.down_proj_scales"),
            Stacked("experts.down_proj_scales", ("down",), part="weight_scale", quant="mxfp4"),
            Stacked("experts.down_proj_bias", ("down",), part="bias"))},
        notes="router bias; top-k of logits, softmax over the k; clamped SwiGLU (swiglu_oai, "
              "alpha, limit, up + 1) with biases; experts stacked [E, H, 2I], gate/up "
              "interleaved; MXFP4 (*_blocks [E, out, in/32, 16], *_scales [E, out, in/32]) "
              "split per expert by rows and passed through",
    ),
    Family(
        model_type="phimoe",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=_phimoe_routing,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
        notes="sparse mixer (top-2, jitter_eps = router_jitter_noise), inference form",
    ),
    Family(
        model_type="jamba",
        block="model.layers.{l}.feed_forward",
        num_experts=lambda c: c.num_experts,
        routing=lambda c: _softmax_topk(c, renormalize=False),
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: c.layers_num_experts[layer] > 1,
        router="router",
        notes="softmax, top-k, never renormalized; MoE every expert_layer_period layers from "
              "expert_layer_offset (attention and Mamba layers alike)",
    ),
    Family(
        model_type="dbrx",
        block="transformer.blocks.{l}.ffn",
        num_experts=lambda c: c.ffn_config.moe_num_experts,
        routing=_dbrx_routing,
        expert_ffn=_dbrx_ffn,
        router="router.layer",
        stacked=(Stacked("experts.mlp.w1", ("gate",), flat=True),
                 Stacked("experts.mlp.v1", ("up",), flat=True),
                 Stacked("experts.mlp.w2", ("down",), flat=True, transposed=True)),
        notes="softmax, top-k, Lp renormalization (moe_normalize_expert_weights); experts "
              "as 2-D w1/v1/w2 [E*I, H], w2 is [in, out] per expert",
    ),
    Family(
        model_type="ernie4_5_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.moe_num_experts,
        routing=_ernie_routing,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_ernie_moe_layer,
        selection_bias="moe_statics.e_score_correction_bias",
        selection_bias_lead=(1,),
        shared_module="shared_experts",
        shared_ffn=lambda c: (FFNSpec(c.moe_intermediate_size * c.moe_num_shared_experts,
                                      _activation(c)) if c.moe_num_shared_experts else None),
        check=_ernie_check,
        notes="fp32 softmax, selection bias [1, E] (choosing only), renormalized with "
              "clamp(sum, min=moe_norm_min); shared experts; moe_layer_start/end/interval",
    ),
    Family(
        model_type="llama4_text",
        block="model.layers.{l}.feed_forward",
        num_experts=lambda c: c.num_local_experts,
        routing=_llama4_routing,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: layer in c.moe_layers,
        router="router",
        stacked=(Stacked("experts.gate_up_proj", ("gate", "up"), transposed=True),
                 Stacked("experts.down_proj", ("down",), transposed=True)),
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        notes="top-k of logits, sigmoid of the k, weight on the expert input; shared expert; "
              "experts stacked [E, H, 2I] (gate then up); moe_layers",
    ),
    Family(
        model_type="switch_transformers",
        block=_switch_block,
        num_experts=lambda c: c.num_experts,
        routing=_switch_routing,
        expert_ffn=lambda c: FFNSpec(c.d_ff, _ungated(c.dense_act_fn)),
        is_moe_layer=_switch_sparse,
        router="router.classifier",
        experts={"up": "experts.expert_{e}.wi", "down": "experts.expert_{e}.wo"},
        n_layers=lambda c: c.num_layers + c.num_decoder_layers,
        automodel="AutoModelForSeq2SeqLM",
        notes="encoder-decoder (SEIF layers: encoder blocks, then decoder blocks); softmax "
              "top-1, capacity expert_capacity per sequence by position, dropped -> 0; "
              "ungated wi/wo experts",
    ),
)}


FAMILIES["llama4"] = dataclasses.replace(
    FAMILIES["llama4_text"], model_type="llama4",
    block="language_model.model.layers.{l}.feed_forward", sub_config="text_config",
    automodel="AutoModelForImageTextToText",
    notes="as llama4_text, in the text decoder (language_model.model); vision model and "
          "projector dense")


# OpenAI privacy filter: gpt-oss's router (bias, top-k of logits, softmax over the k; its
# division by top_k is undone by the block's multiplication by num_experts_per_tok) and
# clamped-SwiGLU experts with biases, but gate/up concatenated, not interleaved.
FAMILIES["openai_privacy_filter"] = dataclasses.replace(
    FAMILIES["gpt_oss"], model_type="openai_privacy_filter",
    stacked=(Stacked("experts.gate_up_proj", ("gate", "up"), transposed=True),
             Stacked("experts.gate_up_proj_bias", ("gate", "up"), part="bias"),
             Stacked("experts.down_proj", ("down",), transposed=True),
             Stacked("experts.down_proj_bias", ("down",), part="bias")),
    quantized={}, automodel="AutoModelForTokenClassification",
    notes="as gpt_oss (router bias, top-k of logits, softmax over the k: the router's / top_k "
          "and the block's x num_experts_per_tok cancel; clamped SwiGLU with biases) but "
          "gate/up concatenated in [E, H, 2I]; token classification encoder")


# GraniteMoeSWA / GraniteMoeHybrid: router, experts and MoE classes are GraniteMoeShared's
# verbatim (class sources identical but for names); GraniteMoeHybrid's decoder layers are MoE
# only when num_local_experts > 0 (else only its shared_mlp, dense).
FAMILIES["granitemoe_swa"] = dataclasses.replace(
    FAMILIES["granitemoeshared"], model_type="granitemoe_swa", router="router",
    stacked=(Stacked("experts.gate_up_proj", ("gate", "up")),
             Stacked("experts.down_proj", ("down",))),
    notes="as granitemoeshared, but stored with the in-memory names (no conversion mapping): "
          "router.weight, experts.gate_up_proj [E, 2I, H] (gate rows then up), "
          "experts.down_proj [E, H, I]; sliding-window attention dense")
FAMILIES["granitemoehybrid"] = dataclasses.replace(
    FAMILIES["granitemoeshared"], model_type="granitemoehybrid",
    is_moe_layer=lambda c, layer: c.num_local_experts > 0,
    notes="as granitemoeshared (Mamba layers dense); no MoE layer when num_local_experts == 0")


# DeepSeek-OCR-2 / Unlimited-OCR: DeepseekV2TopkRouter / Experts / Moe verbatim (class sources
# identical but for names) in a text decoder published at model.layers (in memory
# model.language_model.layers); MoE per mlp_layer_types.
for _t in ("deepseek_ocr2", "unlimited_ocr"):
    FAMILIES[_t] = dataclasses.replace(
        FAMILIES["deepseek_v2"], model_type=_t, is_moe_layer=_sparse_by_type,
        module="model.language_model.layers.{l}.mlp", sub_config="text_config",
        automodel="AutoModelForImageTextToText",
        notes="as deepseek_v2, in the text decoder (published at model.layers); MoE where "
              "mlp_layer_types[l] == 'sparse'; SAM and vision encoders, projector dense")


# dots.3-note: Dots3NoteTextTopkRouter / Experts / TextMoE are DeepSeek-V3's (fp32 sigmoid
# router, selection bias, group-limited top-k masked to -inf, +1e-20, routed scaling; shared
# experts of shared_experts_intermediate_size x n_shared_experts), text decoder published at
# model.layers. Its vision tower's own MoE layers pass through as dense tensors.
FAMILIES["dots3_note"] = _like_deepseek_v3(
    "dots3_note", "as deepseek_v3 in the text decoder (published at model.layers; shared "
    "experts shared_experts_intermediate_size x n_shared_experts); MoE where "
    "mlp_layer_types[l] == 'sparse'; vision (its MoE layers included) and audio encoders "
    "pass through as dense tensors",
    num_experts=lambda c: c.num_local_experts, is_moe_layer=_sparse_by_type,
    shared_ffn=lambda c: FFNSpec(c.shared_experts_intermediate_size * c.n_shared_experts,
                                 _activation(c)),
    module="model.language_model.layers.{l}.mlp", sub_config="text_config",
    automodel="AutoModelForImageTextToText")


FAMILIES["aria"] = Family(
    model_type="aria",
    block="language_model.model.layers.{l}.mlp",
    module="model.language_model.layers.{l}.mlp",
    num_experts=lambda c: c.moe_num_experts,
    routing=lambda c: RoutingSpec(kind="topk", top_k=int(c.moe_topk), scoring="softmax_topk",
                                  training=_training(c)),
    # AriaExperts are SiLU-gated whatever hidden_act says (the shared experts follow it).
    expert_ffn=lambda c: (_no_mlp_bias(c), FFNSpec(c.intermediate_size, "swiglu"))[1],
    router="router",
    stacked=(Stacked("experts.fc1.weight", ("gate", "up"), transposed=True),
             Stacked("experts.fc2.weight", ("down",), transposed=True)),
    shared_module="shared_experts",
    shared_ffn=lambda c: FFNSpec(c.intermediate_size * c.moe_num_shared_experts,
                                 _activation(c)),
    sub_config="text_config",
    automodel="AutoModelForImageTextToText",
    notes="text decoder (language_model.model): top-k of logits, softmax over the k; routed "
          "experts always SwiGLU, stacked fc1 [E, H, 2I] (gate then up) / fc2 [E, I, H]; shared "
          "experts (hidden_act) added; vision tower and projector dense",
)


def _oai_ffn(cfg: Any, size: int) -> FFNSpec:
    """MiniMax-M3's experts and shared MLP: gpt-oss's clamped SwiGLU (clamp gate above and up
    both ways at swiglu_limit, gate * sigmoid(alpha * gate) * (up + 1)), no biases, gate/up
    concatenated."""
    return FFNSpec(size, "swiglu_oai", bias=False, alpha=float(cfg.swiglu_alpha),
                   limit=float(cfg.swiglu_limit))


FAMILIES["minimax_m3_vl"] = Family(
    model_type="minimax_m3_vl",
    block="language_model.model.layers.{l}.block_sparse_moe",
    module="model.language_model.layers.{l}.mlp",
    num_experts=lambda c: c.num_local_experts,
    routing=lambda c: _sigmoid_biased(c, scale=float(c.routed_scaling_factor)),
    expert_ffn=lambda c: _oai_ffn(c, c.intermediate_size),
    is_moe_layer=_sparse_by_type,
    experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
    selection_bias="e_score_correction_bias",
    shared_module="shared_experts",
    shared_ffn=lambda c: _oai_ffn(c, c.shared_intermediate_size),
    sub_config="text_config",
    automodel="AutoModelForImageTextToText",
    notes="text decoder (published language_model.model.layers.{l}.block_sparse_moe, Mixtral "
          "names): sigmoid, selection bias, renormalized (no epsilon), x routed_scaling_factor "
          "(applied by the block); experts and shared MLP use the clamped SwiGLU (swiglu_oai, "
          "no biases); MoE where mlp_layer_types[l] == 'sparse'; vision tower dense",
)


def _kimi_k25_check(cfg: Any) -> None:
    if cfg.model_type != "deepseek_v3":
        raise ConversionError(f"kimi_k25 with a {cfg.model_type!r} text model: only its "
                              "DeepSeek-V3 text decoder is mapped")


FAMILIES["kimi_k25"] = _like_deepseek_v3(
    "kimi_k25", "as deepseek_v3, in the text decoder (published language_model.model.layers; "
    "transformers 5.24's save_pretrained writes language_model.model.blocks, read too); vision "
    "tower and projector dense",
    block="language_model.model.layers.{l}.mlp",
    block_alternatives=("language_model.model.blocks.{l}.mlp",),
    module="model.language_model.layers.{l}.mlp", sub_config="text_config",
    automodel="AutoModelForImageTextToText", check=_kimi_k25_check)


_QWEN4_EXP_TEXT = Family(
    model_type="qwen4_exp_text",
    block="model.layers.{l}.mlp",
    num_experts=lambda c: c.num_experts,
    routing=_softmax_topk,
    expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
    shared_module="shared_expert",
    shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
    shared_gate="shared_expert_gate.weight",
    notes="every layer MoE: softmax, top-k, norm_topk_prob (no epsilon); shared expert x "
          "sigmoid(shared gate) (as qwen3_5_moe). The hyper-connection mixing around the block, "
          "the hashed n-gram embeddings and the GatedDeltaNet are outside it (dense)",
)
FAMILIES["qwen4_exp_text"] = _QWEN4_EXP_TEXT
FAMILIES["qwen4_exp"] = dataclasses.replace(
    _QWEN4_EXP_TEXT, model_type="qwen4_exp", block="model.language_model.layers.{l}.mlp",
    sub_config="text_config", automodel="AutoModelForImageTextToText",
    notes="as qwen4_exp_text, in the text decoder (model.language_model); vision tower dense")


def _mistral4_routing(cfg: Any, *, renormalize: bool | None = None) -> RoutingSpec:
    """Mistral4TopkRouter (MistralLarge4TextTopkRouter: fp32 logits, renormalize always):
    softmax over all experts; group score = sum of the top-2 softmax scores per group, keep
    `topk_group` groups, the rest masked to 0.0; top-k; weights = the scores, / (sum + 1e-20)
    if norm_topk_prob; x routed_scaling_factor. n_group == topk_group keeps every group: plain
    top-k."""
    norm = bool(cfg.norm_topk_prob) if renormalize is None else renormalize
    n_group, topk_group = int(cfg.n_group or 1), int(cfg.topk_group or 1)
    common = dict(top_k=int(cfg.num_experts_per_tok), scoring="softmax",
                  normalize="sum" if norm else "none", epsilon=1e-20 if norm else 0.0,
                  epsilon_rule="add", scale=float(cfg.routed_scaling_factor),
                  training=_training(cfg))
    if n_group == topk_group:
        return RoutingSpec(kind="topk", **common)
    return RoutingSpec(kind="group_topk", n_group=n_group, topk_group=topk_group,
                       group_score="top2_sum", group_mask="zero", **common)


FAMILIES["mistral4"] = Family(
    model_type="mistral4",
    block="model.layers.{l}.mlp",
    num_experts=lambda c: c.n_routed_experts,
    routing=_mistral4_routing,
    expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
    is_moe_layer=lambda c, layer: layer >= c.first_k_dense_replace,
    stacked=(Stacked("experts.gate_up_proj", ("gate", "up")),
             Stacked("experts.down_proj", ("down",))),
    shared_module="shared_experts",
    shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts, _activation(c)),
    automodel="AutoModelForImageTextToText",
    notes="softmax (model dtype); top-k, or group-limited (top-2 sum, dropped groups 0.0) "
          "when n_group != topk_group; renormalized (+1e-20) if norm_topk_prob; "
          "routed_scaling_factor; ungated shared experts; first_k_dense_replace; experts "
          "stacked on disk as in memory ([E, 2I, H] gate rows then up; [E, H, I])",
)
FAMILIES["mistral_large4"] = Family(
    model_type="mistral_large4",
    block="layers.{l}",
    module="model.language_model.layers.{l}.mlp",
    num_experts=lambda c: c.n_routed_experts,
    routing=lambda c: _mistral4_routing(c, renormalize=True),
    expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
    is_moe_layer=_sparse_by_type,
    experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
    shared_module="shared_experts",
    shared={"gate": "{p}.w1", "up": "{p}.w3", "down": "{p}.w2"},
    shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts, _activation(c)),
    sub_config="text_config",
    automodel="AutoModelForImageTextToText",
    notes="text decoder (published with Mistral's native names: layers.{l}.gate, "
          "experts.{e}.w1/w3/w2, shared_experts.w1/w3/w2): as mistral4 but fp32 router and "
          "always renormalized (+1e-20); MoE where mlp_layer_types[l] == 'sparse'; vision "
          "tower and projector dense",
)



def _text_family(wrapper: str, model_type: str, block: str, *, module: str | None = None,
                 automodel: str = "AutoModelForCausalLM", notes: str = "", **changes) -> Family:
    """The text-only model type of a multimodal wrapper (a text model saved on its own, whose
    config.json is the wrapper's text_config): the wrapper's MoE block, its config at the top
    level (no `sub_config`) and the block where that text model's save_pretrained writes it
    (the wrappers' published layouts come from their own checkpoint-conversion rules, which the
    text model types do not share)."""
    return dataclasses.replace(
        FAMILIES[wrapper], model_type=model_type, block=block, module=module,
        block_alternatives=(), sub_config=None, automodel=automodel,
        notes=f"{wrapper}'s text model saved alone" + (f": {notes}" if notes else ""), **changes)


# save_pretrained of each text model type, tiny models built and read back: AriaTextForCausalLM,
# Qwen3_5MoeForCausalLM, Dots3NoteForCausalLM, MiniMaxM3VLForCausalLM at model.layers.{l}.mlp;
# Qwen3VLMoeTextModel, Glm4vMoeTextModel (AutoModel only) at layers.{l}.mlp, and
# MistralLarge4TextModel with Mistral's native names at layers.{l}; DeepseekOcr2TextModel,
# UnlimitedOcrTextModel (their own classes only) at layers.{l}.mlp.
for _family_entry in (
    _text_family("aria", "aria_text", "model.layers.{l}.mlp"),
    _text_family("qwen3_5_moe", "qwen3_5_moe_text", "model.layers.{l}.mlp"),
    _text_family("dots3_note", "dots3_note_text", "model.layers.{l}.mlp"),
    _text_family("qwen3_vl_moe", "qwen3_vl_moe_text", "layers.{l}.mlp", automodel="AutoModel"),
    _text_family("glm4v_moe", "glm4v_moe_text", "layers.{l}.mlp", automodel="AutoModel",
                 notes="experts stacked as in memory ([E, 2I, H] gate rows then up; [E, H, I])",
                 stacked=(Stacked("experts.gate_up_proj", ("gate", "up")),
                                      Stacked("experts.down_proj", ("down",)))),
    _text_family("mistral_large4", "mistral_large4_text", "layers.{l}", module="layers.{l}.mlp",
                 automodel="AutoModel", shared=dict(_SHARED_GATE_UP_DOWN),
                 notes="routed experts with Mistral's native names (experts.{e}.w1/w3/w2), "
                       "shared experts with transformers' (gate_proj/up_proj/down_proj)"),
    _text_family("minimax_m3_vl", "minimax_m3_vl_text", "model.layers.{l}.mlp",
                 notes="experts stacked as in memory ([E, 2I, H] gate rows then up; [E, H, I]), "
                       "selection bias gate.e_score_correction_bias, the shared MLP's "
                       "gate_up_proj fused [2I, H] (gate rows then up)",
                 stacked=(Stacked("experts.gate_up_proj", ("gate", "up")),
                                      Stacked("experts.down_proj", ("down",))),
                 selection_bias="gate.e_score_correction_bias", shared={"down": "{p}.down_proj"},
                 shared_stacked=(Stacked("gate_up_proj.weight", ("gate", "up"),
                                         per_expert=False),)),
    # No Auto class maps these two config types: only their own classes load them.
    _text_family("deepseek_ocr2", "deepseek_ocr2_text", "layers.{l}.mlp",
                 automodel="DeepseekOcr2TextModel",
                 notes="loaded by DeepseekOcr2TextModel (no Auto class); experts stacked as in "
                       "memory ([E, 2I, H] gate rows then up; [E, H, I])",
                 stacked=(Stacked("experts.gate_up_proj", ("gate", "up")),
                          Stacked("experts.down_proj", ("down",)))),
    _text_family("unlimited_ocr", "unlimited_ocr_text", "layers.{l}.mlp",
                 automodel="UnlimitedOcrTextModel",
                 notes="loaded by UnlimitedOcrTextModel (no Auto class)"),
):
    FAMILIES[_family_entry.model_type] = _family_entry

def _nemotron_h_check(cfg: Any) -> None:
    """NemotronHMoE with moe_latent_size set runs the routed experts in a latent space
    (fc1_latent_proj before, fc2_latent_proj after); SEIF has no latent projection."""
    if cfg.moe_latent_size is not None:
        raise ConversionError(f"nemotron_h with moe_latent_size={cfg.moe_latent_size}: its "
                              "routed experts run in a latent space (fc1_latent_proj H -> "
                              "latent before them, fc2_latent_proj after), which SEIF has no "
                              "field for; only moe_latent_size null is mapped")
    _no_mlp_bias(cfg)


FAMILIES["nemotron_h"] = _like_deepseek_v3(
    "nemotron_h", "DeepSeek-V3 router (fp32 sigmoid, selection bias, group-limited top-k, "
    "+1e-20, routed scaling); ungated experts and shared expert (up, down; mlp_hidden_act, "
    "relu2 = relu(x)^2 by default); MoE where layers_block_type[l] == 'moe' (Mamba and "
    "attention layers dense); moe_latent_size (latent projections) and mlp_bias refused",
    block="backbone.layers.{l}.mixer", module="model.layers.{l}.mixer",
    num_experts=lambda c: c.n_routed_experts,
    expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _ungated(c.mlp_hidden_act)),
    is_moe_layer=lambda c, layer: c.layers_block_type[layer] == "moe",
    experts={"up": "experts.{e}.up_proj", "down": "experts.{e}.down_proj"},
    shared={"up": "{p}.up_proj", "down": "{p}.down_proj"},
    shared_ffn=lambda c: FFNSpec(c.moe_shared_expert_intermediate_size,
                                 _ungated(c.mlp_hidden_act)),
    check=_nemotron_h_check)


# Nemotron-3.5-Transcribe (model_type nemo_speechlm): a speech model whose text decoder
# (AutoModel of text_config, a nemotron_h) is at model.language_model in memory and at
# llm.model.layers on disk (conversion mapping nemo_speechlm); audio tower, projector and word
# timestamp head are dense.
FAMILIES["nemo_speechlm"] = dataclasses.replace(
    FAMILIES["nemotron_h"], model_type="nemo_speechlm", block="llm.model.layers.{l}.mixer",
    module="model.language_model.layers.{l}.mixer", sub_config="text_config",
    automodel="AutoModelForMultimodalLM",
    notes="Nemotron-3.5-Transcribe: its text decoder (llm.model.layers, per-expert names as "
          "the installed save_pretrained writes them) as nemotron_h; the NeMo export's stacked "
          "experts (gate_and_up_projs / down_projs) are not read yet; audio tower, projector "
          "and word timestamp head dense")


# Nemotron-H Omni: a vision(/audio)-language model whose language_model is a whole
# NemotronHForCausalLM (on disk language_model.backbone.layers, in memory
# language_model.model.layers); vision tower, audio encoder and projectors are dense.
FAMILIES["nemotron_h_omni"] = dataclasses.replace(
    FAMILIES["nemotron_h"], model_type="nemotron_h_omni",
    block="language_model.backbone.layers.{l}.mixer",
    module="language_model.model.layers.{l}.mixer", sub_config="text_config",
    automodel="AutoModelForImageTextToText",
    notes="its language model (language_model.backbone.layers) as nemotron_h; vision tower, "
          "audio encoder and projectors dense")


# Qwen3-Omni-MoE: two MoE decoder stacks in one checkpoint. The thinker's text decoder
# (published thinker.model.layers, in memory thinker.model.language_model.layers) is
# Qwen3-MoE's block; the talker's decoder (talker.model.layers) is Qwen2-MoE's, with a shared
# expert gated by sigmoid(shared_expert_gate). Qwen3OmniMoeTalkerDecoderLayer replaces its mlp
# by the MoE block unconditionally, so every talker layer is MoE whatever decoder_sparse_step /
# mlp_only_layers say. The code predictor, code2wav, vision and audio towers are dense.
FAMILIES["qwen3_omni_moe"] = Family(
    model_type="qwen3_omni_moe",
    stacks=(
        dataclasses.replace(
            _QWEN3_MOE, model_type="qwen3_omni_moe.thinker", notes="",
            block="thinker.model.layers.{l}.mlp",
            module="thinker.model.language_model.layers.{l}.mlp",
            sub_config="thinker_config.text_config",
        ),
        Family(
            model_type="qwen3_omni_moe.talker",
            block="talker.model.layers.{l}.mlp",
            num_experts=lambda c: c.num_local_experts,      # num_experts is an alias
            routing=_softmax_topk,
            expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
            shared_module="shared_expert",
            shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
            shared_gate="shared_expert_gate.weight",
            sub_config="talker_config.text_config",
        ),
    ),
    automodel="AutoModelForMultimodalLM",
    notes="two MoE stacks, SEIF layers = thinker text layers, then talker layers: thinker "
          "(thinker.model.layers) softmax, top-k, norm_topk_prob, decoder_sparse_step, "
          "mlp_only_layers; talker (talker.model.layers, every layer MoE) softmax, top-k, "
          "norm_topk_prob, shared expert x sigmoid(shared gate); code predictor, code2wav, "
          "vision and audio towers dense",
)


FAMILIES["jetmoe"] = Family(
    model_type="jetmoe",
    block="model.layers.{l}.mlp",
    num_experts=lambda c: c.num_local_experts,
    routing=_jetmoe_routing,
    expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c, c.activation_function)),
    router="router.layer",
    stacked=(Stacked("input_linear.weight", ("gate", "up")),
             Stacked("output_linear.weight", ("down",))),
    output_bias="bias",
    notes="top-k of the fp32 logits, softmax over the k; experts stacked (input_linear "
          "[E, 2I, H] = gate rows then up rows, output_linear [E, H, I]); the block's bias "
          "[H] is the SEIF 1.1 output_bias. Its attention is a mixture of attention heads "
          "(JetMoeMoA, self_attention.experts.*): not an MoE FFN, kept as dense tensors",
)


# MoE families of the installed transformers that are refused on purpose, and why (read off the
# installed modeling code). Any other unknown model_type is refused too, generically.
REFUSED: dict[str, str] = {
    "axk1": "AXK1MoE passes the MoE output through an RMSNorm (post_mlp_layernorm) inside the "
            "block; SEIF has no output-norm field (its routing is otherwise DeepSeek-V3's)",
    "ernie4_5_vl_moe": "each MoE layer holds a text MoE and a vision MoE, chosen per token by "
                       "its modality (moe_mm_token_type_ids); SEIF describes one router per "
                       "layer",
    "step3p7": "its experts and shared expert clamp after the activation (min(act(gate), "
               "limit) * clip(up), per-layer swiglu_limits, set on Step-3.7-Flash's last MoE "
               "layers); SEIF's clamped SwiGLU (swiglu_oai) clamps before it",
    "nllb_moe": "the installed NllbMoeSparseMLP passes the router's one-hot top-1 mask where "
                "expert indices are expected (so only expert_0 / expert_1 ever run), and its "
                "top-2 router has capacity positions shared across the two choices, "
                "normalize-before/after-dropping and a random second-expert policy applied "
                "at inference; there is no correct reference to verify a mapping against",
    **dict.fromkeys(("hy_v4", "hy_v4_vl"),
                    "its routed experts use a clamped SwiGLU without alpha or +1 "
                    "(silu(min(gate, swiglu_limit)) * clip(up, +-swiglu_limit)); SEIF's clamped "
                    "SwiGLU (swiglu_oai) computes gate * sigmoid(alpha * gate) * (up + 1) "
                    "(its shared experts are plain SwiGLU, the router is DeepSeek-V3's)"),
    "glm5_next": "its experts and shared experts use a clamped SwiGLU without alpha or +1 "
                 "(silu(min(gate, swiglu_limit)) * clip(up, +-swiglu_limit)); SEIF's clamped "
                 "SwiGLU (swiglu_oai) computes gate * sigmoid(alpha * gate) * (up + 1) "
                 "(the router is otherwise DeepSeek-V3's)",
    "deepseek_v4": "its hash_moe layers pick experts from a frozen table indexed by the token "
                   "id (ffn.gate.tid2eid: the token ids would be a second layer input), its "
                   "other layers score with sqrt(softplus(logits)), and its routed and shared "
                   "experts use a clamped SwiGLU without alpha or +1 (silu(min(gate, "
                   "swiglu_limit)) * clip(up, +-swiglu_limit)); SEIF has none of these",
    "longcat_flash": "its router also scores zero_expert_num identity experts (choosing one "
                     "adds weight * x, no FFN) beyond the n_routed_experts FFN experts; SEIF "
                     "has no identity experts (the routing is otherwise SEIF's: softmax, "
                     "selection bias, no renormalization, routed_scaling_factor)",
    **dict.fromkeys(("gemma4", "gemma4_text", "diffusion_gemma", "diffusion_gemma_text"),
                    "its router reads the residual stream through an unweighted RMSNorm times "
                    "router.scale and hidden_size^-0.5 and multiplies the renormalized weights "
                    "by a learned per_expert_scale; its experts see their own RMSNorm of the "
                    "residual (pre_feedforward_layernorm_2) and their sum passes another "
                    "(post_feedforward_layernorm_2); SEIF has no router input norm, per-expert "
                    "scale or expert input / output norms (there is no router logit softcap)"),
    **dict.fromkeys(("gemma4_unified", "gemma4_unified_text"),
                    "it has no MoE layers (its decoder layers have only a dense MLP; the "
                    "config drops num_experts / top_k_experts): nothing for SEIF to describe"),
    "inkling": "its shared experts are weighted by the router: one softmax over the "
               "logsigmoids of the k routed and the shared experts' logits, times route_scale "
               "and a learned global_scale; SEIF's shared experts are ungated or "
               "sigmoid-gated by their own gate",
    **dict.fromkeys(("inkling2", "inkling2_loop"),
                    "its experts use a softcapped SwiGLU (softcap(gate) * sigmoid(gate) * "
                    "softcap(up), mlp_gate_softcap / mlp_up_softcap), which no SEIF "
                    "activation expresses"),
    "muse_spark": "its MoE runs the experts in a latent space (pre_expert_proj + centered "
                  "RMSNorm before, post_expert_proj after), applies an RMSNorm to each expert's "
                  "output, and scales router logits by output_multiplier; SEIF has none of these",
    "vitpose_backbone": "its MoE MLP has no router: the expert is picked per image by the "
                        "caller's dataset_index; SEIF describes routed experts",
    "doge": "DogeCDMoE routes by product keys (top-k over two sqrt(E) key halves, mixing "
            "router logits across tokens) to single-neuron embedding experts (down_embed / "
            "up_embed rows); SEIF describes linear-router top-k over FFN experts",
    "zaya": "its router is an MLP (down_proj, RMSNorm, two GELU layers) whose state carries "
            "across decoder layers, with an extra skip expert that contributes zero (chosen: "
            "its weight is set to 0); SEIF routers are one linear layer",
}

# Model types that share a refused family's reason: nllb_moe's config.json says "nllb-moe", and
# the text decoders of refused multimodal families have model types (and config.json files)
# of their own.
for _alias, _family_of in (("nllb-moe", "nllb_moe"), ("glm5_next_text", "glm5_next"),
                           ("hy_v4_vl_text", "hy_v4_vl"), ("inkling_text", "inkling"),
                           ("inkling2_text", "inkling2"), ("inkling2_loop_text", "inkling2_loop"),
                           ("muse_spark_text", "muse_spark"),
                           ("ernie4_5_vl_moe_text", "ernie4_5_vl_moe"), ("step3p5", "step3p7")):
    REFUSED[_alias] = REFUSED[_family_of]


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def _family(config: dict, where: str) -> Family:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConversionError("config.json has no model_type", path=where)
    family = FAMILIES.get(model_type)
    if family is None and model_type in REFUSED:
        raise ConversionError(f"family {model_type!r} is not supported: {REFUSED[model_type]}",
                              path=where)
    if family is None:
        raise ConversionError(
            f"family {model_type!r} is not supported yet: no verified SEIF mapping of its MoE "
            f"layout and routing (supported: {', '.join(supported_families())})", path=where)
    return family


# --------------------------------------------------------------------------- source files
@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int     # absolute file offset
    nbytes: int


def _source_files(root: Path) -> list[Path]:
    index = root / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"bad safetensors index: {exc}", path=str(index)) from None
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith("."):
                raise FormatError(f"index names an unsafe shard file {f!r}", path=str(index))
        return [root / f for f in files]
    single = root / SAFETENSORS_SINGLE
    if single.exists():
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise ConversionError("only safetensors checkpoints are read (pickle files can run code); "
                              "re-save with save_pretrained(safe_serialization=True)",
                              path=str(root))
    raise ConversionError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}", path=str(root))


def _read_sources(root: Path) -> dict[str, _Source]:
    """Every tensor of the checkpoint, in file order then offset order."""
    out: dict[str, _Source] = {}
    for path in _source_files(root):
        if not path.is_file():
            raise ConversionError("shard listed in the index is missing", path=str(path))
        with open(path, "rb") as fh:
            header = read_header(fh, os.fstat(fh.fileno()).st_size, str(path))
        for name, e in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
            if name in out:
                raise FormatError("tensor appears in two shards", path=str(path), field=name)
            out[name] = _Source(name, path, e.dtype, tuple(e.shape), header.data_start + e.begin,
                                e.end - e.begin)
    return out


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise FormatError("unexpected end of file", field=what)
        got += n
    return buf


# --------------------------------------------------------------------------- transformers -> SEIF
@dataclass(frozen=True)
class _Split:
    """A stacked source tensor and the canonical tensors it becomes: `pieces[e][j]` is expert
    e's projection `rule.projs[j]` (one row when the rule has no expert axis)."""

    source: str
    rule: Stacked
    pieces: tuple[tuple[str, ...], ...]
    shapes: tuple[tuple[int, ...], ...]      # canonical shape of each projection's piece
    quants: tuple[tuple[Quantization | None, ...], ...] = ()   # per piece, like `pieces`

    def quant(self, e: int, j: int) -> Quantization | None:
        return self.quants[e][j] if self.quants else None

    @property
    def source_shape(self) -> tuple[int, ...]:
        return _stacked_shape(self.rule, len(self.pieces), self.shapes)


def _piece_shapes(ffn: FFNSpec, H: int, rule: Stacked) -> tuple[tuple[int, ...], ...]:
    """The stored shape of each projection's piece: `[out, in]` weights, `[out]` biases; MXFP4
    values `[out, in/32, 16]` and scales `[out, in/32]`."""
    I = ffn.intermediate_size
    out = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    shapes = tuple(out[p] for p in rule.projs)
    if rule.part == "bias":
        return tuple(s[:1] for s in shapes)
    if rule.quant == "mxfp4":
        if any(s[1] % MXFP4_GROUP for s in shapes):
            raise ConversionError(f"MXFP4 {rule.suffix}: the input size "
                                  f"{[s[1] for s in shapes]} is not a multiple of "
                                  f"{MXFP4_GROUP}")
        tail = (MXFP4_GROUP // 2,) if rule.part == "weight" else ()
        return tuple((s[0], s[1] // MXFP4_GROUP) + tail for s in shapes)
    return shapes


def _piece_quant(rule: Stacked, layer: LayerSpec, e: int, proj: str,
                 shape: tuple[int, ...], shared: bool = False) -> Quantization | None:
    """The quantization descriptor a stacked rule's piece carries (None: plain values)."""
    if rule.quant != "mxfp4" or rule.part != "weight":
        return None
    name = layer.shared_name if shared else layer.expert_name
    return Quantization("mxfp4", [shape[0], shape[1] * MXFP4_GROUP],
                        scale=name(e, proj, "weight_scale"), group_size=MXFP4_GROUP)


def _stacked_shape(rule: Stacked, n: int, shapes) -> tuple[int, ...]:
    out = sum(s[0] for s in shapes)
    (rest,) = {tuple(s[1:]) for s in shapes}
    if rule.transposed and rule.part != "bias":
        one: tuple[int, ...] = rest + (out,)
    else:
        one = (out,) + rest
    if not rule.per_expert:
        return one
    return (n * one[0],) + one[1:] if rule.flat else (n,) + one


def _raw(dtype: str):
    """An unsigned integer NumPy type of the dtype's width: elements move, bits never change."""
    return np.dtype(f"<u{dtypes.itemsize(dtype)}")


def _split_slab(rule: Stacked, slab: np.ndarray, shapes) -> list[np.ndarray]:
    """One expert's slice of a stacked tensor (flat, raw-typed) -> its per-projection pieces."""
    out = sum(s[0] for s in shapes)
    if rule.transposed and rule.part != "bias":
        a = slab.reshape(shapes[0][1], out).T
    else:
        a = slab.reshape((out,) + tuple(shapes[0][1:]))
    n = len(rule.projs)
    if rule.split == "interleave":
        parts = [a[j::n] for j in range(n)]
    else:
        bounds = np.cumsum([0] + [s[0] for s in shapes])
        parts = [a[bounds[j]:bounds[j + 1]] for j in range(n)]
    return [np.ascontiguousarray(p) for p in parts]


def _join_slab(rule: Stacked, parts: list[np.ndarray], shapes) -> np.ndarray:
    """The inverse of `_split_slab`: per-projection pieces -> one expert's slice (flat)."""
    out = sum(s[0] for s in shapes)
    a = np.empty((out,) + tuple(shapes[0][1:]), dtype=parts[0].dtype)
    parts = [p.reshape(s) for p, s in zip(parts, shapes)]
    n = len(rule.projs)
    if rule.split == "interleave":
        for j, p in enumerate(parts):
            a[j::n] = p
    else:
        bounds = np.cumsum([0] + [s[0] for s in shapes])
        for j, p in enumerate(parts):
            a[bounds[j]:bounds[j + 1]] = p
    if rule.transposed and rule.part != "bias":
        a = a.T
    return np.ascontiguousarray(a).reshape(-1)


def _layer_plan(family: Family, cfg: Any, li: int, E: int, layer: LayerSpec,
                rules: tuple[Stacked, ...] | None = None,
                transposed: Collection[str] = frozenset()
                ) -> tuple[dict[str, str], list[_Split]]:
    """Source name -> canonical name for a layer's plainly stored tensors, and its stacked
    source tensors (`rules`: the family's stacked rules, or those of its quantized layout;
    `transposed`: the sources an "auto" rule finds stored `[E, in, out]`). Used both ways, so
    the rule that split a tensor is the one that re-stacks it."""
    rules = family.stacked if rules is None else rules
    if layer.source_prefix is None and callable(family.block) and cfg is None:
        raise ConversionError(f"layer {li} has no source_prefix; cannot place its tensors in "
                              f"the {family.model_type} layout")
    block = layer.source_prefix or _block(family, cfg, li)
    ffn, shared = layer.experts, layer.shared_experts
    mapping = {f"{block}.{family.router}.weight": layer.router_name()}
    if layer.routing.router_bias:
        mapping[f"{block}.{family.router_bias or family.router + '.bias'}"] = \
            layer.router_name("bias")
    if family.selection_bias and layer.routing.selection_bias:
        mapping[_selection_bias_source(family, block, li)] = layer.router_name("selection_bias")
    splits: list[_Split] = []
    parts = ("weight", "bias") if ffn.bias else ("weight",)
    stacked = {(p, r.part) for r in rules for p in r.projs}
    for e in range(E):
        for proj in ffn.projections:
            for part in parts:
                if (proj, part) not in stacked:
                    src = f"{block}.{family.experts[proj].format(e=e)}.{part}"
                    mapping[src] = layer.expert_name(e, proj, part)
    for rule in rules:
        rule = _resolve(rule, f"{block}.{rule.suffix}", transposed)
        shapes = _piece_shapes(ffn, layer.hidden_size, rule)
        splits.append(_Split(
            f"{block}.{rule.suffix}", rule,
            tuple(tuple(layer.expert_name(e, p, rule.part) for p in rule.projs)
                  for e in range(E)), shapes,
            tuple(tuple(_piece_quant(rule, layer, e, p, sh) for p, sh in zip(rule.projs, shapes))
                  for e in range(E))))
    if shared is not None:
        prefix = (family.shared_prefix.format(l=li) if family.shared_prefix
                  else f"{block}.{family.shared_module}")
        sparts = ("weight", "bias") if shared.ffn.bias else ("weight",)
        sstacked = {(p, r.part) for r in family.shared_stacked for p in r.projs}
        for proj in shared.ffn.projections:
            for part in sparts:
                if (proj, part) not in sstacked:
                    src = f"{family.shared[proj].format(p=prefix)}.{part}"
                    mapping[src] = layer.shared_name(0, proj, part)
        for rule in family.shared_stacked:
            rule = _resolve(rule, f"{prefix}.{rule.suffix}", transposed)
            shapes = _piece_shapes(shared.ffn, layer.hidden_size, rule)
            splits.append(_Split(
                f"{prefix}.{rule.suffix}", rule,
                (tuple(layer.shared_name(0, p, rule.part) for p in rule.projs),), shapes,
                (tuple(_piece_quant(rule, layer, 0, p, sh, shared=True)
                       for p, sh in zip(rule.projs, shapes)),)))
        if shared.gate:
            mapping[f"{block}.{family.shared_gate}"] = layer.shared_gate_name()
    if layer.output_bias:
        if family.output_bias is None:
            raise ConversionError(f"layer {li} has an output bias, which the "
                                  f"{family.model_type} layout has no place for")
        mapping[f"{block}.{family.output_bias}"] = layer.output_bias_name()
    return mapping, splits


def _selection_bias_source(family: Family, block: str, li: int) -> str:
    """The selection bias's source name: `family.selection_bias` under the block, or, as a
    template with {l}, an absolute name (Kolibri-1: `model.layers.{l}.moe.router.expert_bias`
    next to a block at `model.layers.{l}.mlp`)."""
    if "{l}" in family.selection_bias:
        return family.selection_bias.format(l=li)
    return f"{block}.{family.selection_bias}"


def _resolve(rule: Stacked, source: str, transposed: Collection[str]) -> Stacked:
    """The rule with an "auto" orientation decided: transposed iff `source` is listed."""
    if rule.transposed != "auto":
        return rule
    return dataclasses.replace(rule, transposed=source in transposed)


def _auto_transposed(family: Family, cfg: Any, li: int, layer: LayerSpec,
                     rules: tuple[Stacked, ...], sources: dict[str, _Source]) -> set[str]:
    """The sources of the layer's "auto" rules stored `[E, in, out]`: as transformers'
    `Transpose(check_dims=True)` decides, a tensor whose shape is the in-memory `[E, out, in]`
    is taken as it is (a square one too), any other shape as transposed (checked later)."""
    found: set[str] = set()
    block = layer.source_prefix or _block(family, cfg, li)
    for rule in rules:
        if rule.transposed != "auto":
            continue
        src = f"{block}.{rule.suffix}"
        plain = dataclasses.replace(rule, transposed=False)
        shape = _stacked_shape(plain, layer.num_experts,
                               _piece_shapes(layer.experts, layer.hidden_size, plain))
        if src in sources and sources[src].shape != shape:
            found.add(src)
    return found


def _block(family: Family, cfg: Any, li: int, sources: dict[str, _Source] | None = None
           ) -> str:
    """Layer `li`'s MoE block prefix on disk: the family's `block`, or, given the checkpoint's
    tensors, the first of `block` and `block_alternatives` whose router is there."""
    if callable(family.block):
        return family.block(cfg, li)
    candidates = _blocks(family, li)
    if sources is not None:
        for prefix in candidates:
            if f"{prefix}.{family.router}.weight" in sources:
                return prefix
    return candidates[0]


def _blocks(family: Family, li: int) -> list[str]:
    """Every on-disk prefix layer `li`'s MoE block may have (string templates only)."""
    return [t.format(l=li) for t in (family.block, *family.block_alternatives)]


def _layer_spec(family: Family, cfg: Any, li: int, block: str | None = None,
                index: int | None = None) -> LayerSpec:
    """Layer `li`'s descriptor (`index`: its SEIF index when the family is one of several
    stacks, default `li`)."""
    E = int(family.num_experts(cfg))
    routing = family.routing(cfg)
    routing.router_bias = routing.router_bias or family.router_bias is not None
    shared = None
    if family.shared_module is not None or family.shared_prefix is not None:
        sffn = family.shared_ffn(cfg)
        if sffn is not None:
            shared = SharedExpertsSpec(1, sffn, family.shared_gate is not None)
    return LayerSpec(li if index is None else index, E, int(cfg.hidden_size), routing,
                     family.expert_ffn(cfg), shared,
                     source_prefix=block or _block(family, cfg, li),
                     output_bias=family.output_bias is not None)


@dataclass(frozen=True)
class _Quant:
    """What a checkpoint's `quantization_config` says, once accepted."""

    method: str | None = None          # quant_method: None, "fp8", or a key of Family.quantized
    block: tuple[int, int] | None = None   # fp8: weight_block_size


def _quantization(family: Family, config: dict, where: str) -> _Quant:
    """Accept the quantizations SEIF passes through losslessly, refuse every other one before
    any tensor is read: a weight read without its encoding would be silently wrong."""
    q = config.get("quantization_config")
    if q is None:
        return _Quant()
    if not isinstance(q, dict):
        raise ConversionError("quantization_config is not an object", path=where)
    method = q.get("quant_method")
    if method == "fp8":
        problems = []
        if q.get("fmt", "e4m3") != "e4m3":
            problems.append(f"fmt {q.get('fmt')!r} (only e4m3)")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            problems.append(f"activation_scheme {q.get('activation_scheme')!r} (static "
                            "activation scales have no SEIF encoding; only dynamic)")
        if q.get("scale_fmt", "float") != "float":
            problems.append(f"scale_fmt {q.get('scale_fmt')!r} (only float32 scales)")
        if q.get("expert_dtype", "fp8") != "fp8":
            problems.append(f"expert_dtype {q.get('expert_dtype')!r} (only fp8)")
        block = q.get("weight_block_size", FP8_DEFAULT_BLOCK)
        if not (isinstance(block, list | tuple) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                        for b in block)):
            problems.append(f"weight_block_size {block!r} (only block-wise [rows, cols]; "
                            "per-tensor scales are not supported)")
        if any(stack.stacked for stack in _stacks(family)):
            problems.append(f"{family.model_type} stores its experts stacked (only families "
                            "with per-expert tensors)")
        if problems:
            raise ConversionError("fp8 quantization_config with " + "; ".join(problems) +
                                  " is not supported: SEIF passes through DeepSeek-V3-style "
                                  "block-wise e4m3 weights with float32 weight_scale_inv",
                                  path=where)
        return _Quant("fp8", (int(block[0]), int(block[1])))
    if method in family.quantized:
        return _Quant(method)
    known = ["fp8 (block-wise e4m3)"] + [f"{m} ({family.model_type})"
                                           for m in family.quantized]
    raise ConversionError(f"quantization_config quant_method {method!r} is not supported for "
                          f"{family.model_type} (supported: {', '.join(known)}); converting "
                          "it without its encoding would be silently wrong", path=where)


def _fp8_quant(weight: _Source, scale: _Source, block: tuple[int, int], scale_name: str
               ) -> Quantization:
    """The fp8-block descriptor of `weight` with companion `scale` (stored as `scale_name`),
    after checking the pair is what SEIF's fp8-block means (spec 3.3.2)."""
    if weight.dtype != "F8_E4M3" or len(weight.shape) != 2:
        raise ConversionError(f"has a {FP8_SCALE_SUFFIX} companion but is "
                              f"{weight.dtype}{list(weight.shape)}; fp8-block needs a 2-D "
                              "F8_E4M3 weight", field=weight.name)
    rows, cols = weight.shape
    need = (-(-rows // block[0]), -(-cols // block[1]))
    if scale.dtype != "F32" or scale.shape != need:
        raise ConversionError(f"scale is {scale.dtype}{list(scale.shape)}; {list(block)} "
                              f"blocks of a {list(weight.shape)} weight need F32{list(need)}",
                              field=scale.name)
    return Quantization("fp8-block", [rows, cols], scale=scale_name, block=list(block))


def _fp8_companions(mapping: dict[str, str], sources: dict[str, _Source], block, li: int
                    ) -> dict[str, Quantization]:
    """Adds each mapped fp8 weight's `weight_scale_inv` to `mapping` (as `<canonical>_scale`,
    spec 3.3.1, so it lands in the expert's shard) and returns canonical -> descriptor."""
    quants: dict[str, Quantization] = {}
    for src, canonical in list(mapping.items()):
        if src not in sources:
            continue                      # reported as missing by the caller
        scale = src + FP8_SCALE_SUFFIX
        if scale not in sources:
            if sources[src].dtype.startswith("F8_"):
                raise ConversionError(f"layer {li}: fp8 weight without {scale!r}; cannot give "
                                      "its real values", field=src)
            continue
        if ".router." in canonical:
            raise ConversionError(f"layer {li}: the router is quantized; SEIF routers are "
                                  "never quantized (spec 3.3.1)", field=src)
        mapping[scale] = canonical + "_scale"
        quants[canonical] = _fp8_quant(sources[src], sources[scale], block, canonical + "_scale")
    return quants


def _layer_map(family: Family, cfg: Any, sources: dict[str, _Source], root: Path,
               quant: _Quant = _Quant()
               ) -> tuple[list[LayerSpec], dict[str, str], dict[str, _Split],
                          dict[str, Quantization], set[str]]:
    """The MoE layer descriptors, source name -> canonical name for their plainly stored
    tensors, source name -> split rule for their stacked ones, canonical name ->
    quantization descriptor of the plainly stored quantized ones (fp8), and the stacked
    sources an "auto" rule found stored transposed. Several stacks: each stack's, its layers
    numbered after the previous stacks' slots (`stack_layer`)."""
    layers: list[LayerSpec] = []
    rename: dict[str, str] = {}
    splits: dict[str, _Split] = {}
    quants: dict[str, Quantization] = {}
    transposed: set[str] = set()
    offset = 0
    for stack in _stacks(family):
        sub = _sub_config(cfg, stack.sub_config)
        got = _stack_map(stack, sub, sources, root, quant, offset)
        layers += got[0]
        rename.update(got[1])
        splits.update(got[2])
        quants.update(got[3])
        transposed |= got[4]
        offset += _n_slots(stack, sub)
    return layers, rename, splits, quants, transposed


def _stack_map(family: Family, cfg: Any, sources: dict[str, _Source], root: Path,
               quant: _Quant, offset: int
               ) -> tuple[list[LayerSpec], dict[str, str], dict[str, _Split],
                          dict[str, Quantization], set[str]]:
    """`_layer_map` of one MoE stack, `cfg` its own config; its layer `li` is SEIF layer
    `offset + li`."""
    if family.check is not None:
        family.check(cfg)
    rules = family.quantized.get(quant.method, family.stacked)
    layers: list[LayerSpec] = []
    rename: dict[str, str] = {}
    splits: dict[str, _Split] = {}
    quants: dict[str, Quantization] = {}
    transposed: set[str] = set()
    for li in range(_n_slots(family, cfg)):
        block = _block(family, cfg, li, sources)
        if not family.is_moe_layer(cfg, li):
            for prefix in ([block] if callable(family.block) else _blocks(family, li)):
                if f"{prefix}.{family.router}.weight" in sources \
                        or any(n.startswith(f"{prefix}.experts.") for n in sources):
                    raise ConversionError(f"layer {li} should be dense per the config, but the "
                                          f"checkpoint has MoE tensors under {prefix}",
                                          path=str(root))
            continue
        layer = _layer_spec(family, cfg, li, block, offset + li)
        E = layer.num_experts
        try:
            layer.routing.check(f"layer {li} routing", E)
        except SeifError as exc:
            raise ConversionError(f"config gives an invalid routing for layer {li}: "
                                  f"{exc.one_line()}", path=str(root)) from None
        auto = _auto_transposed(family, cfg, li, layer, rules, sources)
        transposed |= auto
        mapping, layer_splits = _layer_plan(family, cfg, li, E, layer, rules, auto)
        if quant.method == "fp8":
            quants.update(_fp8_companions(mapping, sources, quant.block, li))
        wanted = list(mapping) + [sp.source for sp in layer_splits]
        missing = [s for s in wanted if s not in sources]
        if missing:
            stacked = [n for n in sources if n.startswith(f"{block}.experts.")
                       and n.endswith(("gate_up_proj", "down_proj"))]
            hint = " (stacked expert tensors are not read for this family)" if stacked else ""
            raise ConversionError(f"layer {li} lacks {len(missing)} MoE tensors the "
                                  f"{family.model_type} layout needs, e.g. {missing[0]}{hint}",
                                  path=str(root))
        # Any other tensor under the experts' prefix (quantization scales, ...) is unexplained.
        extra = [n for n in sources if n.startswith(f"{block}.experts.") and n not in wanted]
        if extra:
            raise ConversionError(f"layer {li} has expert tensors this converter does not map "
                                  f"yet, e.g. {extra[0]}", path=str(root))
        for sp in layer_splits:
            got = sources[sp.source].shape
            if got != sp.source_shape:
                raise ConversionError(f"stacked tensor has shape {list(got)}; the config "
                                      f"implies {list(sp.source_shape)}", path=str(root),
                                      field=sp.source)
            splits[sp.source] = sp
        if family.selection_bias and layer.routing.selection_bias:
            src = _selection_bias_source(family, block, li)
            want = tuple(family.selection_bias_lead) + (E,)
            if sources[src].shape != want:
                raise ConversionError(f"selection bias has shape {list(sources[src].shape)}, "
                                      f"expected {list(want)}", path=str(root), field=src)
        layers.append(layer)
        rename.update(mapping)
    return layers, rename, splits, quants, transposed


def _target_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    try:
        target = dtypes.normalize_name(dtype)
    except FormatError as exc:
        raise ConversionError(exc.one_line()) from None
    if target not in _CASTABLE:
        raise ConversionError(f"--dtype must be a float type ({', '.join(sorted(_CASTABLE))})")
    return target


def _cast_dtype(name: str, stored: str, quant: Quantization | None, target: str | None) -> str:
    """The dtype a tensor is written in under `dtype` (seif -> seif --dtype semantics): routers
    (weight, bias, selection bias) keep theirs, quantized tensors are dequantized to `target`,
    other float tensors cast, everything else kept."""
    if target is None or (quant is None and (".router." in name or stored not in _CASTABLE)):
        return stored
    return target


def _plain_stacked_source(family: Family, sp: _Split) -> str:
    """The unquantized stacked tensor a quantized rule's pieces come back to once dequantized
    (gpt-oss: `gate_up_proj_blocks` -> `gate_up_proj`)."""
    prefix = sp.source[: len(sp.source) - len(sp.rule.suffix)]
    for rule in family.stacked:
        if rule.projs == sp.rule.projs and rule.part == "weight":
            return prefix + rule.suffix
    raise ConversionError(f"{family.model_type}: no unquantized layout to dequantize "
                          f"{sp.source!r} into", field=sp.source)


def to_seif(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            dtype: str | None = None, show_progress: bool | None = None,
            max_shard_bytes: int | None = None, resume: bool = False, keep_partial: bool = True,
            jobs: int | None = None, **options) -> Path:
    """Convert a transformers checkpoint directory `src` into the SEIF checkpoint `dst`.

    Quantized weights (FP8 block-wise `weight_scale_inv`, gpt-oss MXFP4) pass through byte for
    byte with their quantization descriptors, unless `dtype` is given: then, as
    `seif -> seif --dtype`, float tensors are cast to it, quantized ones dequantized to it (their
    scales dropped), and routers keep their dtype.

    With `resume`, shards an interrupted run finished are verified and reused (their source
    bytes are not even read)."""
    from seif.quant import dequantize
    from seif.writer import CheckpointWriter, FileRange

    from .hf_config import with_config

    if options:
        raise ConversionError(f"options not supported for transformers -> seif: "
                              f"{', '.join(options)}")
    target = _target_dtype(dtype)
    root = Path(src)
    config_path = root / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read config.json: {exc}", path=str(config_path)) from None
    if not isinstance(config, dict):
        raise ConversionError("config.json is not an object", path=str(config_path))
    family = _family(config, str(config_path))     # refuse before touching anything else
    quant = _quantization(family, config, str(config_path))
    sources = _read_sources(root)

    layers, rename, splits, quants, transposed = with_config(
        root, config, lambda cfg: _layer_map(family, cfg, sources, root, quant))
    reshaped = {       # canonical name -> SEIF shape, where it only drops unit dims
        layer.router_name("selection_bias"): (layer.num_experts,) for layer in layers
        if stack_layer(family, layer.index, source_prefix=layer.source_prefix)[0]
        .selection_bias_lead}
    canonical = set(rename.values()) | {n for sp in splits.values()
                                        for row in sp.pieces for n in row}
    if quant.method == "fp8":      # dense fp8 weights (attention, dense MLPs) keep their names
        for s in sources.values():
            scale = sources.get(s.name + FP8_SCALE_SUFFIX)
            if s.name not in rename and s.name not in splits and scale is not None \
                    and scale.name not in rename:
                quants[s.name] = _fp8_quant(s, scale, quant.block, scale.name)
    companions = {q.scale for q in quants.values()}
    by_name = {rename.get(s.name, s.name): s for s in sources.values() if s.name not in splits}

    specs: list[TensorSpec] = []
    for s in sources.values():
        sp = splits.get(s.name)
        if sp is not None:
            if target is not None and sp.rule.part == "weight_scale":
                continue                  # folded into the dequantized pieces
            for e, row in enumerate(sp.pieces):
                for j, (name, shape) in enumerate(zip(row, sp.shapes)):
                    q = sp.quant(e, j)
                    if target is None:
                        specs.append(TensorSpec(name, s.dtype, shape, source_name=s.name,
                                                quantization=q))
                    else:
                        specs.append(TensorSpec(
                            name, _cast_dtype(name, s.dtype, q, target),
                            tuple(q.logical_shape) if q else shape,
                            source_name=_plain_stacked_source(family, sp) if q else s.name))
            continue
        name = rename.get(s.name, s.name)
        if s.name not in rename and name in canonical:
            raise ConversionError("a dense tensor has a canonical SEIF name", field=s.name)
        q = quants.get(name)
        if target is None:
            specs.append(TensorSpec(name, s.dtype, reshaped.get(name, s.shape),
                                    source_name=s.name, quantization=q))
        elif name not in companions:
            specs.append(TensorSpec(name, _cast_dtype(name, s.dtype, q, target),
                                    tuple(q.logical_shape) if q else reshaped.get(name, s.shape),
                                    source_name=s.name))
    planned = {spec.name: spec for spec in specs}
    archs = config.get("architectures") or [None]
    model = ModelInfo(source_framework="transformers", architecture=archs[0],
                      model_type=family.model_type, source_config=config)
    total = sum(spec.nbytes for spec in specs)
    with byte_progress(total, "converting", show_progress) as advance:
        extra = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
        if transposed:
            extra["metadata"] = {METADATA_TRANSPOSED: json.dumps(sorted(transposed))}
        writer = CheckpointWriter(dst, layers, model=model, overwrite=overwrite,
                                  progress=advance, resume=resume, keep_partial=keep_partial,
                                  jobs=jobs, **extra)
        with writer:
            writer.plan(specs)
            fds: dict[Path, int] = {}

            def read(s: _Source, length: int | None = None, at: int = 0) -> bytes:
                fd = fds.get(s.path)
                if fd is None:
                    fd = fds[s.path] = os.open(s.path, os.O_RDONLY)
                n = s.nbytes if length is None else length
                return _pread_exact(fd, n, s.offset + at, s.name)

            def array(s: _Source) -> np.ndarray:
                return np.frombuffer(read(s), dtype=dtypes.to_numpy(s.dtype)).reshape(s.shape)

            def convert(data, stored: str, shape, spec: TensorSpec, q, get):
                """Raw bytes (or a raw-typed piece) of a tensor stored as `stored`[`shape`] ->
                what `spec` plans: the same bytes, or (with `dtype`) cast / dequantized."""
                if target is None:
                    return data if isinstance(data, bytes | bytearray) \
                        else memoryview(data.reshape(-1).view(np.uint8))
                a = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) \
                    else data.reshape(-1).view(np.uint8)
                a = a.view(dtypes.to_numpy(stored)).reshape(shape)
                if q is not None:
                    a = dequantize(a, q, get, spec.name)
                return np.ascontiguousarray(a.reshape(spec.shape)
                                            .astype(dtypes.to_numpy(spec.dtype)))

            try:
                for s in sources.values():
                    sp = splits.get(s.name)
                    if sp is None:
                        name = rename.get(s.name, s.name)
                        if name not in planned or not writer.needs(name):
                            continue
                        if target is None:   # the same bytes: copied file to file
                            writer.write(name, FileRange(s.path, s.offset))
                            continue
                        writer.write(name, convert(read(s), s.dtype, s.shape, planned[name],
                                                   quants.get(name), lambda n: array(by_name[n])))
                        continue
                    if sp.rule.part == "weight_scale" and target is not None:
                        continue
                    # Stacked: one expert's slice at a time (contiguous), split, written.
                    step = s.nbytes // len(sp.pieces)
                    raw = _raw(s.dtype)
                    scale_sp = None
                    if target is not None and sp.rule.scale:
                        scale_sp = splits[sp.source[: len(sp.source) - len(sp.rule.suffix)]
                                          + sp.rule.scale]
                    for e, row in enumerate(sp.pieces):
                        if not any(writer.needs(n) for n in row if n in planned):
                            continue
                        slab = np.frombuffer(read(s, step, e * step), dtype=raw)
                        pieces = _split_slab(sp.rule, slab, sp.shapes)
                        scales: dict[str, np.ndarray] = {}
                        if scale_sp is not None:
                            ss = sources[scale_sp.source]
                            sstep = ss.nbytes // len(scale_sp.pieces)
                            sslab = np.frombuffer(read(ss, sstep, e * sstep), dtype=_raw(ss.dtype))
                            scales = dict(zip(scale_sp.pieces[e],
                                              _split_slab(scale_sp.rule, sslab, scale_sp.shapes)))
                        for j, (name, piece) in enumerate(zip(row, pieces)):
                            if writer.needs(name):
                                writer.write(name, convert(piece, s.dtype, sp.shapes[j],
                                                           planned[name], sp.quant(e, j),
                                                           scales.__getitem__))
            finally:
                for fd in fds.values():
                    os.close(fd)
    return Path(dst)


# --------------------------------------------------------------------------- SEIF -> transformers
def _st_header(entries: list[tuple[str, str, list[int], int]]) -> tuple[bytes, int]:
    """A safetensors header for (name, dtype, shape, nbytes) in order; (bytes, data size)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    cursor = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, cursor


def from_seif(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
              dtype: str | None = None, show_progress: bool | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> Path:
    """Write the SEIF checkpoint `src` back as a transformers directory `dst`: config.json
    verbatim, every tensor under its source name with its stored bytes unchanged."""
    from seif.reader import Checkpoint

    if options:
        raise ConversionError(f"options not supported for seif -> transformers: "
                              f"{', '.join(options)}")
    if dtype is not None:
        raise ConversionError("--dtype is not supported for seif -> transformers yet")
    out = Path(dst)
    if out.exists() and not overwrite:
        raise ConversionError("destination exists (pass overwrite=True / --overwrite)",
                              path=str(out))
    with Checkpoint(src) as ckpt:
        m = ckpt.manifest
        if m.model.source_framework != "transformers" or not m.model.source_config:
            raise ConversionError("this SEIF checkpoint was not converted from transformers "
                                  f"(source_framework {m.model.source_framework!r}, no "
                                  "source_config); cannot rebuild a transformers directory",
                                  path=str(src))
        family = m.model.model_type or m.model.source_config.get("model_type")
        if family not in FAMILIES:
            raise ConversionError(f"family {family!r} is not supported yet", path=str(src))
        fam = FAMILIES[family]
        # Stacked source tensors are rebuilt from their pieces with the family's rule.
        piece_of: dict[str, _Split] = {}
        reshape: dict[str, list[int]] = {}
        transposed = _metadata_transposed(m, str(src))
        for layer in m.layers:
            stack, li = stack_layer(fam, layer.index, source_prefix=layer.source_prefix)
            _, layer_splits = _layer_plan(stack, None, li, layer.num_experts, layer,
                                          _stored_rules(stack, m, layer), transposed)
            for sp in layer_splits:
                for row in sp.pieces:
                    for n in row:
                        piece_of[n] = sp
            if stack.selection_bias_lead and layer.routing.selection_bias:
                reshape[layer.router_name("selection_bias")] = \
                    list(stack.selection_bias_lead) + [layer.num_experts]
        # (seif name or split, out name, dtype, shape, nbytes)
        items: list[tuple[str | _Split, str, str, list[int], int]] = []
        seen: set[str] = set()
        for name, entry in m.tensors.items():
            sp = piece_of.get(name)
            target = sp.source if sp is not None else (entry.source_name or name)
            if sp is not None and entry.source_name != sp.source:
                raise ConversionError(f"tensor's source_name is {entry.source_name!r}, but the "
                                      f"{family} layout stacks it into {sp.source!r}",
                                      field=name)
            if target in seen:
                if sp is not None:
                    continue
                raise ConversionError("two tensors map to the same source name", field=target)
            seen.add(target)
            stored = m.resolve(name)
            if sp is None:
                shape = reshape.get(name, list(stored.shape))
                if _numel(shape) != _numel(stored.shape):
                    raise ConversionError(f"cannot restore shape {shape} from "
                                          f"{list(stored.shape)}", field=name)
                items.append((name, target, stored.dtype, shape,
                              dtypes.itemsize(stored.dtype) * _numel(stored.shape)))
                continue
            for e, row in enumerate(sp.pieces):
                for j, (n, shape) in enumerate(zip(row, sp.shapes)):
                    piece = m.tensors.get(n)
                    if piece is None:
                        raise ConversionError(f"stacked {sp.source!r} lacks its piece", field=n)
                    got = m.resolve(n)
                    if got.dtype != stored.dtype or tuple(got.shape) != tuple(shape) \
                            or piece.quantization != sp.quant(e, j) \
                            or piece.source_name != sp.source:
                        raise ConversionError(f"piece of stacked {sp.source!r} has dtype "
                                              f"{got.dtype}, shape {list(got.shape)}, "
                                              f"quantization {piece.quantization}; expected "
                                              f"{stored.dtype}, {list(shape)}, "
                                              f"{sp.quant(e, j)}", field=n)
            shape = list(sp.source_shape)
            items.append((sp, target, stored.dtype, shape,
                          dtypes.itemsize(stored.dtype) * _numel(shape)))
        shards: list[list[tuple[str | _Split, str, str, list[int], int]]] = [[]]
        size = 0
        for item in items:
            if shards[-1] and size + item[4] > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += item[4]
        names = ([SAFETENSORS_SINGLE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))])
        tmp = out.parent / f"{out.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            total = sum(i[4] for i in items)
            with byte_progress(total, "exporting", show_progress) as advance:
                for file, shard in zip(names, shards):
                    header, _ = _st_header([(t, d, s, n) for _, t, d, s, n in shard])
                    with open(tmp / file, "wb") as fh:
                        fh.write(header)
                        for name, _, dt, _, n in shard:
                            if isinstance(name, _Split):
                                for row in name.pieces:
                                    slab = _join_slab(name.rule, [
                                        np.frombuffer(_read_stored(ckpt, p), dtype=_raw(dt))
                                        for p in row], name.shapes)
                                    fh.write(memoryview(slab.view(np.uint8)))
                                    advance(slab.nbytes)
                                continue
                            sh, offset, length = ckpt.stored_bytes(name)
                            assert length == n
                            done = 0
                            while done < length:
                                step = min(COPY_CHUNK, length - done)
                                fh.write(_pread_exact(sh.fd, step, offset + done, name))
                                done += step
                                advance(step)
                        fh.flush()
                        os.fsync(fh.fileno())
            if len(shards) > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {t: f for f, sh in zip(names, shards)
                                        for _, t, _, _, _ in sh}}
                (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(
                json.dumps(_written_config(m), indent=2, sort_keys=True) + "\n")
            if out.exists():
                old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _metadata_transposed(m, where: str) -> set[str]:
    """The sources recorded as stored `[E, in, out]` by an "auto" stacked rule."""
    text = m.metadata.get(METADATA_TRANSPOSED)
    if text is None:
        return set()
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConversionError(f"metadata {METADATA_TRANSPOSED!r} is not a JSON list of tensor "
                              "names", path=where)
    return set(names)


def _stored_rules(family: Family, m, layer: LayerSpec) -> tuple[Stacked, ...]:
    """The stacked rules the layer's stored pieces follow: a quantized layout's when its first
    quantized piece carries that scheme (the checkpoint was not dequantized), else the plain."""
    for method, rules in family.quantized.items():
        probe = next(r for r in rules if r.quant and r.part == "weight")
        entry = m.tensors.get(layer.expert_name(0, probe.projs[0]))
        if entry is not None and entry.quantization is not None \
                and entry.quantization.scheme == QUANT_SCHEMES.get(method):
            return rules
    return family.stacked


def _written_config(m) -> dict:
    """The source config, verbatim; less its quantization_config when no tensor is quantized
    any more (converted with `dtype`), so transformers loads the dequantized weights as such."""
    config = m.model.source_config
    if "quantization_config" in config and not any(t.quantization for t in m.tensors.values()):
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    return config


def _read_stored(ckpt, name: str) -> bytes:
    sh, offset, length = ckpt.stored_bytes(name)
    return _pread_exact(sh.fd, length, offset, name)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def export(model_or_dir, out: str | os.PathLike, **options) -> Path:
    """Write a transformers model (a `PreTrainedModel`, or a checkpoint directory) as SEIF.

    A live model is saved with `save_pretrained` into a temporary directory first: the
    converter reads files (the published on-disk names), never a model's in-memory layout.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        return to_seif(model_or_dir, out, **options)
    import tempfile

    if not hasattr(model_or_dir, "save_pretrained"):
        raise ConversionError(f"expected a transformers model or a directory, got "
                              f"{type(model_or_dir).__name__}")
    with tempfile.TemporaryDirectory(prefix="seif-export-") as tmp:
        model_or_dir.save_pretrained(tmp)
        return to_seif(tmp, out, **options)


def load(path: str | os.PathLike, **from_pretrained_kwargs):
    """A transformers model (`AutoModelForCausalLM`, or the family's own auto class) rebuilt
    from a SEIF checkpoint converted from transformers: bitwise the source model's weights."""
    import tempfile

    import transformers

    from seif.reader import Checkpoint

    with Checkpoint(path) as ckpt:
        family = FAMILIES.get(ckpt.manifest.model.model_type)
    auto = getattr(transformers, family.automodel if family else "AutoModelForCausalLM")
    with tempfile.TemporaryDirectory(prefix="seif-load-") as tmp:
        hf = Path(tmp) / "model"
        from_seif(path, hf)
        return auto.from_pretrained(hf, **from_pretrained_kwargs)


def register() -> None:
    from seif.convert import register as add
    add("transformers", "seif", to_seif)
    add("seif", "transformers", from_seif)
