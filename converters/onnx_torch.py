"""Whole-model ONNX export from transformers: `seif convert HF_DIR model.onnx --to onnx`.

The causal LM is exported by `torch.onnx.export(dynamo=True)` with every MoE block replaced by
ONE `ai.seif.SeifMoE` node (spec/ops.md), dynamic batch and sequence:

1. HF_DIR -> a temporary SEIF checkpoint (the transformers converter, `seif.convert.convert`);
2. `AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=float32)`, then
   `seif.converters.torch.replace_moe_blocks(model, seif_path)`: each family's MoE block becomes
   a `SparseMoE` keeping the block's return convention;
3. while torch.export traces, `SparseMoE.forward` calls the custom op `seif::moe` (this module
   installs `seif.converters.torch.export_hook` for the duration of the export). Its eager
   implementation is SparseMoE's own math, its fake implementation says "same shape as the
   hidden states", and the `custom_translation_table` entry emits the SeifMoE node with the
   layer's attributes (`seif.converters.onnx.layer_attributes`) and the block's weight tensors
   (initializers) as inputs in contract order. Routing is therefore never traced: no
   data-dependent `nonzero`, no expert subgraph baked in by the dummy input's routing. A SEIF
   1.1 output bias (JetMoE) is an Add of the bias right after the node, named
   `layers.<index>.output_bias` as the layer exporter writes it;
4. the model is fixed up for ONNX Runtime: IR version 10, default opset 21, `ai.seif` v1, every
   SeifMoE node named `layers.<index>.moe` with all 17 inputs, the model-local SeifRouter /
   SeifMoE function bodies of `seif.converters.onnx` attached (so any ONNX runtime runs the file
   without the native library; where `libseif_ort.so` is registered its kernel wins), SEIF
   metadata (`seif.layers`, `seif.model`) so `--from onnx` reads the layers back;
5. written atomically (external data beyond 2 GB).

A quantized source (fp8 blocks, gpt-oss MXFP4) is dequantized on the way (HF -> SEIF with
`dtype="f32"` -> a temporary plain transformers directory), so no quantization backend is
needed. A bf16/f16 source is loaded in float32; the router tensors, which SparseMoE keeps in
their stored dtype, are widened to float32 (exactly) so that every SeifMoE weight has one type.

Refused, with the reason: routing that couples the tokens of a group (capacity, expert choice,
Soft MoE: SparseMoE routes each sequence of a batch as its own group, one SeifMoE node routes all
B*S tokens at once), MoE layers of different configurations in one model (a model holds one
SeifMoE function body, see spec/ops.md §4), families without a causal-LM head, dtypes other
than float32.

Input `input_ids` int64 [batch, sequence]; output `logits` float32 [batch, sequence, vocab].
No KV cache (use_cache=False): a full-sequence forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path

from seif.errors import ConversionError

__all__ = ["MOE_OP", "export_model", "register", "to_onnx"]

MOE_OP = "seif::moe"
_SPARSE_NAMES = {          # SeifMoE input (spec/ops.md) -> SparseMoE parameter / buffer
    "router_weight": "router_weight", "router_bias": "router_bias",
    "selection_bias": "selection_bias", "gate_proj": "gate_proj", "up_proj": "up_proj",
    "down_proj": "down_proj", "gate_bias": "gate_proj_bias", "up_bias": "up_proj_bias",
    "down_bias": "down_proj_bias", "shared_gate_proj": "shared_gate_proj",
    "shared_up_proj": "shared_up_proj", "shared_down_proj": "shared_down_proj",
    "shared_gate_bias": "shared_gate_proj_bias", "shared_up_bias": "shared_up_proj_bias",
    "shared_down_bias": "shared_down_proj_bias", "shared_expert_gate": "shared_expert_gate",
}
_WRAPPER = "lm"                 # the export wrapper's attribute holding the model
_COUPLED = "capacity, expert-choice and Soft MoE routing couple the tokens of a group"


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConversionError("whole-model ONNX export needs torch and transformers: pip "
                              "install 'seif[torch,onnx]'") from None
    return torch


# =========================================================================== the custom op
@functools.lru_cache(maxsize=64)
def _layer(spec_json: str):
    from seif.manifest import LayerSpec
    return LayerSpec.from_dict(json.loads(spec_json), "seif::moe layer")


@functools.lru_cache(maxsize=64)
def _shell(spec_json: str):
    """A SparseMoE for this layer description with meta-device parameters: `functional_call`
    supplies the real tensors, so no weight memory is held here."""
    torch = _torch()
    from seif.converters.torch import SparseMoE
    with torch.device("meta"):
        return SparseMoE(_layer(spec_json), torch.float32)


@functools.lru_cache(maxsize=1)
def _ops():
    """Register `seif::moe` (once per process) and return (op overload, translation fn)."""
    torch = _torch()
    from seif.converters.onnx import MOE_INPUTS

    required = ("hidden_states", "router_weight", "up_proj", "down_proj")
    schema = "(" + ", ".join(f"Tensor{'' if n in required else '?'} {n}" for n in MOE_INPUTS) \
        + ", str layer) -> Tensor"

    def moe(hidden_states, *weights_and_layer):
        """SeifMoE (spec/ops.md §3) on hidden_states [N, H]: SparseMoE's math, all N tokens
        one routing group; the weights in contract order, then the LayerSpec as JSON."""
        *weights, layer = weights_and_layer
        shell = _shell(layer)
        tensors = {k: v for k, v in zip(_SPARSE_NAMES.values(), weights) if v is not None}
        out = torch.func.functional_call(shell, tensors, (hidden_states,))
        return out.clone() if out is hidden_states else out

    op = torch.library.custom_op(MOE_OP, moe, mutates_args=(), schema=schema)

    @op.register_fake
    def _fake(hidden_states, *args):
        return hidden_states.new_empty(hidden_states.shape)

    return torch.ops.seif.moe.default, _translation()


def _translation():
    """The custom_translation_table function: one ai.seif SeifMoE node."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset
    from seif.converters.onnx import (
        DOMAIN,
        DOMAIN_VERSION,
        MOE_ATTRIBUTES,
        MOE_INPUTS,
        layer_attributes,
    )

    option = OpSchema.FormalParameterOption
    required = ("hidden_states", "router_weight", "up_proj", "down_proj")
    inputs = [OpSchema.FormalParameter(
        n, "T" if n == "hidden_states" else "W",
        param_option=option.Single if n in required else option.Optional) for n in MOE_INPUTS]
    attr_types = {"s": OpSchema.AttrType.STRING, "i": OpSchema.AttrType.INT,
                  "f": OpSchema.AttrType.FLOAT}
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        "SeifMoE", DOMAIN, DOMAIN_VERSION, inputs=inputs,
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", types, "activations"), ("W", types, "weights")],
        attributes=[OpSchema.Attribute(name, attr_types[kind], "")
                    for name, (kind, _default) in MOE_ATTRIBUTES.items()])
    seif_moe = Op(Opset(DOMAIN, DOMAIN_VERSION), "SeifMoE", schema)

    def translate(hidden_states, router_weight, router_bias, selection_bias, gate_proj,
                  up_proj, down_proj, gate_bias, up_bias, down_bias, shared_gate_proj,
                  shared_up_proj, shared_down_proj, shared_gate_bias, shared_up_bias,
                  shared_down_bias, shared_expert_gate, layer):
        return seif_moe(hidden_states, router_weight, router_bias, selection_bias, gate_proj,
                        up_proj, down_proj, gate_bias, up_bias, down_bias, shared_gate_proj,
                        shared_up_proj, shared_down_proj, shared_gate_bias, shared_up_bias,
                        shared_down_bias, shared_expert_gate,
                        **layer_attributes(_layer(layer)))

    return translate


def _export_forward(module, hidden_states):
    """SparseMoE.forward under torch.export: one `seif::moe` op on [B*S, H]."""
    torch = _torch()
    op, _ = _ops()
    spec = module.spec
    H = spec.hidden_size
    if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != H:
        raise ConversionError(f"hidden states are {list(hidden_states.shape)}; expected "
                              f"[T, {H}] or [B, S, {H}]")
    x = hidden_states.reshape(-1, H)
    tensors = [getattr(module, name, None) for name in _SPARSE_NAMES.values()]
    # SeifMoE computes the layer without its SEIF 1.1 output bias; the bias is an Add right
    # after the node (as `seif convert --to onnx` writes it), named by `_finish`.
    out = op(x, *tensors, _spec_json(dataclasses.replace(spec, output_bias=False)))
    if module.output_bias is not None:
        out = out + module.output_bias.to(out.dtype)
    out = out.reshape(hidden_states.shape)
    if module.return_router_logits:
        bias = module.router_bias
        logits = torch.nn.functional.linear(x.float(), module.router_weight.float(),
                                            None if bias is None else bias.float())
        return out, logits.to(hidden_states.dtype)
    return out


def _spec_json(spec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)


@contextlib.contextmanager
def _export_hook():
    from seif.converters import torch as seif_torch
    previous = seif_torch.export_hook
    seif_torch.export_hook = _export_forward
    try:
        yield
    finally:
        seif_torch.export_hook = previous


# =========================================================================== checks
def _refusal(layer) -> str | None:
    r = layer.routing
    if r.capacity is not None or r.kind in ("expert_choice", "soft_moe"):
        return (f"layer {layer.index}: {_COUPLED}; the exported SeifMoE node would route all "
                "batch*sequence tokens as one group where the model routes each sequence "
                "on its own")
    return None


def _check_layers(layers) -> None:
    from seif.converters.onnx import _check_exportable, _config_key
    for layer in layers:
        why = _refusal(layer)
        if why:
            raise ConversionError(f"cannot export this model to ONNX: {why}")
        _check_exportable(layer)
    keys = {_config_key(layer) for layer in layers}
    if len(keys) > 1:
        raise ConversionError(
            "cannot export this model to ONNX: its MoE layers differ in configuration (routing, "
            "activation or optional tensors), and a model holds one SeifMoE function body (ONNX "
            "Runtime and onnx.reference do not honour function overloads); export the layers "
            "one at a time from the SEIF checkpoint with --layer")


# =========================================================================== export
def _logits_module(model):
    """The module exported: input_ids -> logits of `model`, no cache."""
    torch = _torch()

    class CausalLMLogits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            setattr(self, _WRAPPER, lm)

        def forward(self, input_ids):
            return getattr(self, _WRAPPER)(input_ids=input_ids, use_cache=False).logits

    return CausalLMLogits(model).eval()


def _export_failure(exc: BaseException) -> ConversionError:
    """A one-line ConversionError for an exporter failure: our own refusal when one is in the
    cause chain, else the root cause torch reports."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, ConversionError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(exc)
    if "Exception summary" in text:
        lines = [x.strip() for x in text.split("Exception summary", 1)[1].splitlines()]
        summary = next((x for x in lines if x), "")
    else:
        summary = f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
    return ConversionError(f"torch.onnx.export could not export this model: {summary}")


def export_model(model, layers, replaced: list[str], *, opset: int = 21, example_batch: int = 2,
                 example_seq: int = 8, model_info=None):
    """The ONNX ModelProto of a transformers causal LM whose MoE blocks `replaced` (qualified
    module names, in the order of `layers`, the SEIF LayerSpecs) are SparseMoE modules."""
    torch = _torch()
    from seif.converters.onnx import OPSET
    if opset != OPSET:
        raise ConversionError(f"the SeifMoE function bodies are written for opset {OPSET}")
    _check_layers(layers)
    _one_weight_dtype(model, replaced)
    op, translate = _ops()
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (example_batch, example_seq),
                        generator=torch.Generator().manual_seed(0))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapped = _logits_module(model)
    try:
        with _export_hook(), torch.no_grad():
            program = torch.onnx.export(
                wrapped, (ids,), dynamo=True, opset_version=opset,
                input_names=["input_ids"], output_names=["logits"],
                dynamic_shapes=({0: batch, 1: seq},),
                custom_translation_table={op: translate}, verbose=False)
    except Exception as exc:
        raise _export_failure(exc) from exc
    return _finish(program.model_proto, layers, replaced, model_info)


def _finish(model, layers, replaced: list[str], model_info):
    """IR 10, opsets, SeifMoE node names and full input lists, function bodies, metadata."""
    import onnx
    from seif.converters.onnx import (
        DOMAIN,
        DOMAIN_VERSION,
        IR_VERSION,
        MOE_INPUTS,
        OPSET,
        _functions,
    )
    model.ir_version = min(model.ir_version, IR_VERSION)
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", OPSET) != OPSET:
        raise ConversionError(f"the exporter wrote default opset {opsets['']}, not {OPSET}")
    opsets[""] = OPSET
    opsets[DOMAIN] = DOMAIN_VERSION
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    _strip_prefix(model.graph, _WRAPPER + ".")
    by_router = {f"{name}.router_weight": layer for name, layer in zip(replaced, layers)}
    inits = {t.name for t in model.graph.initializer}
    moe_nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (DOMAIN, "SeifMoE")]
    if len(moe_nodes) != len(layers):
        raise ConversionError(f"the exported graph has {len(moe_nodes)} SeifMoE nodes for "
                              f"{len(layers)} MoE layers")
    seen = set()
    for i, node in enumerate(moe_nodes):
        layer = _node_layer(node, by_router, layers, i)
        if layer.index in seen:
            raise ConversionError(f"two SeifMoE nodes for layer {layer.index}")
        seen.add(layer.index)
        node.name = f"layers.{layer.index}.moe"
        while len(node.input) < len(MOE_INPUTS):     # onnx.reference wants all 17
            node.input.append("")
        for name in node.input[1:]:
            if name and name not in inits:
                raise ConversionError(f"SeifMoE weight {name!r} of layer {layer.index} is "
                                      "computed in the graph, not an initializer")
        if layer.output_bias:
            _name_output_bias(model.graph, node, layer)
    if layers:
        model.functions.extend(_functions(layers[0]))
    meta = {"seif.target": "portable", "seif.export": "transformers-whole-model",
            "seif.layers": json.dumps([layer.to_dict() for layer in layers])}
    if model_info is not None:
        meta["seif.model"] = json.dumps(model_info.to_dict())
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def _name_output_bias(graph, node, layer) -> None:
    """The Add of the layer's output bias right after its SeifMoE node, named
    `layers.{l}.output_bias` with the bias second, as `--from onnx` reads it back."""
    import onnx
    inits = {t.name: t for t in graph.initializer}
    adds = [n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input]
    found = None
    if len(adds) == 1 and len(adds[0].input) == 2:
        other = [i for i in adds[0].input if i != node.output[0]]
        t = inits.get(other[0]) if len(other) == 1 else None
        if t is not None and list(t.dims) == [layer.hidden_size] and \
                t.data_type == onnx.TensorProto.FLOAT:
            found = adds[0]
            del found.input[:]
            found.input.extend([node.output[0], t.name])
    if found is None:
        raise ConversionError(f"layer {layer.index}: the exported graph does not add the output "
                              "bias right after the SeifMoE node (one Add of a float32 [H] "
                              "initializer); refusing to write a model that would lose it")
    found.name = f"layers.{layer.index}.output_bias"


def _strip_prefix(graph, prefix: str) -> None:
    """Name the initializers as the transformers model names its parameters (without the
    export wrapper's attribute), wherever no other value already has that name."""
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}
    rename = {}
    for t in graph.initializer:
        if t.name.startswith(prefix) and t.name[len(prefix):] not in taken:
            rename[t.name] = t.name[len(prefix):]
    if not rename:
        return
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        vi.name = rename.get(vi.name, vi.name)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]


def _node_layer(node, by_router: dict, layers, position: int):
    """The LayerSpec a SeifMoE node computes: by its router weight's initializer name (the
    replaced module's parameter), else by position (decoder layers run in order)."""
    router = node.input[1] if len(node.input) > 1 else ""
    return by_router.get(router, layers[position])


def _one_weight_dtype(model, replaced: list[str]) -> None:
    """SparseMoE keeps router tensors in their stored dtype (bf16 from a bf16 checkpoint) while
    the experts take the model's float32; a SeifMoE node has one weight type W, so the router
    tensors are widened to the experts' dtype (exact: they are used in float32 anyway)."""
    for name in replaced:
        module = model.get_submodule(name)
        target = module.up_proj.dtype
        for attr in ("router_weight", "router_bias", "selection_bias", "shared_expert_gate",
                     "output_bias"):
            t = getattr(module, attr, None)
            if t is not None and t.dtype != target:
                t.data = t.data.to(target)


# =========================================================================== converter
def to_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            dtype: str | None = None, show_progress: bool | None = None,
            target: str | None = None, **options) -> Path:
    """transformers directory `src` (a causal LM) -> whole-model ONNX file `dst`."""
    if options:
        raise ConversionError("options not supported for transformers -> onnx (whole model): "
                              f"{', '.join(sorted(options))}; for single MoE layers convert to "
                              "SEIF first, then SEIF -> ONNX with --layer / --all-layers")
    if dtype not in (None, "f32", "float32", "F32"):
        raise ConversionError(f"whole-model ONNX export is float32 only (got --dtype {dtype})")
    if target not in (None, "portable", "seif-kernels"):
        raise ConversionError(f"--target {target} is not available for whole-model export: it "
                              "writes ai.seif SeifMoE nodes (portable function bodies, native "
                              "kernels when registered)")
    torch = _torch()
    from seif.converters.onnx import _save_model
    from seif.converters.torch import replace_moe_blocks

    import seif
    import seif.convert
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError("destination exists (pass --overwrite)", path=str(dst))
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConversionError("whole-model ONNX export needs transformers") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantized = _quantized(src)
    with tempfile.TemporaryDirectory(prefix=".seif-export-", dir=dst.parent) as tmp:
        # A quantized source (fp8 blocks, MXFP4) is dequantized on the way (`dtype="f32"`) and
        # written back as a plain fp32 transformers directory, so that loading it needs no
        # quantization backend and the exported weights are exactly what SEIF dequantized.
        seif_path = seif.convert.convert(src, Path(tmp) / "model.seif",
                                         source_format="transformers", target_format="seif",
                                         dtype="f32" if quantized else None,
                                         show_progress=show_progress)
        with seif.open(seif_path) as ckpt:
            layers = list(ckpt.layers)
            info = ckpt.manifest.model
        if not layers:
            raise ConversionError("the model has no MoE layers", path=str(src))
        _check_layers(layers)
        hf_dir = src
        if quantized:
            hf_dir = seif.convert.convert(seif_path, Path(tmp) / "hf_f32",
                                          source_format="seif", target_format="transformers",
                                          show_progress=show_progress)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32).eval()
        except ValueError as exc:
            raise ConversionError(f"transformers has no causal-LM class for this model: "
                                  f"{str(exc).splitlines()[0]}", path=str(src)) from None
        replaced = replace_moe_blocks(model, seif_path)
        # As swapped: a family whose shared MLP lives outside the block keeps it outside.
        specs = [model.get_submodule(name).spec for name in replaced]
        proto = export_model(model, specs, replaced, model_info=info)
    _save_model(proto, dst)
    return dst


def _quantized(src: Path) -> bool:
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return False       # the transformers converter reports an unreadable config
    return isinstance(config, dict) and "quantization_config" in config


def register() -> None:
    from seif.convert import register as add
    add("transformers", "onnx", to_onnx)
