"""Whole-model ONNX export from transformers (`seif.converters.onnx_torch`), no downloads.

For Mixtral, Qwen3-MoE, DeepSeek-V3 and gpt-oss: a tiny random causal LM built from its config
class is exported with `seif convert HF_DIR model.onnx` (the registry). The graph must hold exactly
one `ai.seif.SeifMoE` node per MoE layer and no routing or expert computation of its own, carry
the portable function bodies, have dynamic batch and sequence, and its logits in ONNX Runtime
must match transformers' own (fp32, <= 1e-4) at several (batch, sequence) shapes, both on the
function bodies (no library) and on the native kernels (libseif_ort.so registered).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import build_tiny_hf  # noqa: E402
from seif.converters import onnx_torch  # noqa: E402
from seif.converters import torch as seif_torch  # noqa: E402
from seif.runtime import Session  # noqa: E402
from seif.runtime.library import library_path  # noqa: E402

import seif  # noqa: E402
import seif.convert  # noqa: E402
from seif.errors import ConversionError  # noqa: E402
from seif.manifest import Capacity, FFNSpec, LayerSpec, RoutingSpec  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
# model_type -> (config kwargs, number of MoE layers)
FAMILIES = {
    "mixtral": (dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=4), 2),
    "qwen3_moe": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                       num_experts_per_tok=3, norm_topk_prob=False, head_dim=8,
                       decoder_sparse_step=1, mlp_only_layers=[]), 2),
    # group-limited sigmoid routing, selection bias, routed scale, 2 shared experts, MLA
    "deepseek_v3": (dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                         n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                         n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                         norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                         num_key_value_heads=4), 2),
    # swiglu_oai with clamps that bite, router bias, softmax over the top k, attention sinks
    "gpt_oss": (dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                     head_dim=8, swiglu_limit=1.5, swiglu_alpha=1.3, sliding_window=4), 2),
}
SHAPES = [(1, 5), (3, 11)]          # neither is the export's example shape (2, 8)
TOL = 1e-4
HAS_LIBRARY = library_path() is not None


def build(model_type: str, path: Path, **overrides):
    """A tiny random causal LM, weights re-drawn at a larger scale (clear routing margins) and
    DeepSeek's selection bias random; saved to `path`."""
    return build_tiny_hf(model_type, path, {**COMMON, **FAMILIES[model_type][0], **overrides})


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = build(model_type, root / "hf")
    onnx_torch.register()
    out = seif.convert.convert(root / "hf", root / "model.onnx")
    return model_type, model, root, out


def _ids(batch: int, seq: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    return torch.randint(0, COMMON["vocab_size"], (batch, seq), generator=gen).numpy()


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


# --------------------------------------------------------------------------- graph
def test_one_seif_moe_node_per_moe_layer(exported):
    model_type, _model, root, out = exported
    m = onnx.load(str(out))
    want_layers = FAMILIES[model_type][1]
    moe = [n for n in m.graph.node if (n.domain, n.op_type) == ("ai.seif", "SeifMoE")]
    assert len(moe) == want_layers
    assert len({n.name for n in moe}) == want_layers
    assert all(n.name.startswith("layers.") and n.name.endswith(".moe") for n in moe)
    assert all(len(n.input) == 17 for n in moe)
    # routing is not traced: no top-k, no data-dependent indexing in the graph itself
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert not {"TopK", "NonZero", "ArgMax", "Loop", "If"} & set(ops), ops
    # expert weights (rank-3 stacks) are read by the SeifMoE nodes only: no per-expert MatMul
    stacks = {t.name for t in m.graph.initializer if len(t.dims) == 3}
    assert stacks
    for n in m.graph.node:
        if n.op_type != "SeifMoE":
            assert not stacks & set(n.input), (n.op_type, n.name)
    assert all(set(n.input[4:7]) <= stacks for n in moe)      # gate/up/down projections
    assert len({n.input[5] for n in moe}) == want_layers       # each layer its own experts
    # portable: function bodies for the domain, IR <= 10, ai.seif v1, default opset 21
    assert m.ir_version <= 10
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets["ai.seif"] == 1 and opsets[""] == 21
    assert [f.name for f in m.functions][-1] == "SeifMoE"
    assert all(f.domain == "ai.seif" for f in m.functions)
    # dynamic batch and sequence
    (inp,) = m.graph.input
    assert inp.name == "input_ids"
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert [o.name for o in m.graph.output] == ["logits"]
    onnx.checker.check_model(m)
    meta = {p.key: p.value for p in m.metadata_props}
    assert len(json.loads(meta["seif.layers"])) == want_layers


def test_weights_keep_transformers_names(exported):
    _model_type, _model, _root, out = exported
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert "model.embed_tokens.weight" in names
    assert not any(n.startswith("lm.") for n in names)


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("library", [False, True], ids=["function-body", "native-kernel"])
def test_logits_match_transformers(exported, library):
    _model_type, model, _root, out = exported
    if library and not HAS_LIBRARY:
        pytest.skip("libseif_ort.so is not built")
    sess = Session(out, library="auto" if library else None)
    assert (sess.library is not None) == library
    for batch, seq in SHAPES:
        ids = _ids(batch, seq)
        got = sess.run(input_ids=ids)["logits"]
        want = _hf_logits(model, ids)
        assert got.shape == want.shape == (batch, seq, COMMON["vocab_size"])
        err = float(np.abs(got - want).max())
        assert err <= TOL, (batch, seq, err)
        assert float(np.abs(want).max()) > 0.1


def test_onnx_reference_runs_the_whole_model(exported):
    """The portable file needs no ONNX Runtime at all: onnx.reference runs it too."""
    from onnx.reference import ReferenceEvaluator
    _model_type, model, _root, out = exported
    ids = _ids(2, 5)
    got = ReferenceEvaluator(onnx.load(str(out))).run(None, {"input_ids": ids})[0]
    assert float(np.abs(got - _hf_logits(model, ids)).max()) <= TOL


def _profiled_ops(path: Path, library: bool) -> collections.Counter:
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / f"profile_{int(library)}")
    if library:
        so.register_custom_ops_library(str(library_path()))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"input_ids": _ids(2, 3)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    return collections.Counter(e["args"].get("op_name") for e in events
                               if e.get("cat") == "Node")


@pytest.mark.skipif(not HAS_LIBRARY, reason="libseif_ort.so is not built")
def test_native_kernel_replaces_function_body(exported):
    """With the library, ORT runs one SeifMoE kernel per layer; without it, the function
    bodies are inlined (their TopK runs, no SeifMoE node is left)."""
    model_type, _model, _root, out = exported
    with_lib = _profiled_ops(out, True)
    without = _profiled_ops(out, False)
    assert with_lib["SeifMoE"] == FAMILIES[model_type][1]
    assert with_lib["TopK"] == 0
    assert without["SeifMoE"] == 0 and without["TopK"] > 0


def test_layers_import_back_from_the_whole_model(exported, tmp_path):
    """`--from onnx` reads the MoE layers back out of the whole model: the same descriptors
    and byte-identical tensors as converting the transformers directory directly."""
    _model_type, _model, root, out = exported
    direct = seif.convert.convert(root / "hf", tmp_path / "direct.seif")
    back = seif.convert.convert(out, tmp_path / "back.seif", source_format="onnx")
    with seif.open(direct) as a, seif.open(back) as b:
        assert [x.to_dict() for x in b.layers] == [x.to_dict() for x in a.layers]
        assert b.tensor_names()
        for name in b.tensor_names():
            want, got = a.tensor(name), b.tensor(name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name


def test_external_data_beyond_the_limit(exported, tmp_path, monkeypatch):
    """Weights beyond the protobuf limit go to one external data file; ORT still runs it."""
    import seif.converters.onnx as sx
    _model_type, model, _root, out = exported
    monkeypatch.setattr(sx, "EXTERNAL_DATA_BYTES", 0)
    dst = tmp_path / "ext.onnx"
    sx._save_model(onnx.load(str(out)), dst)
    assert (tmp_path / "ext.onnx.data").is_file()
    stored = onnx.load(str(dst), load_external_data=False)
    moe = [n for n in stored.graph.node if n.op_type == "SeifMoE"]
    external = {t.name for t in stored.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {n.input[5] for n in moe} <= external
    ids = _ids(2, 6)
    got = Session(dst, library=None).run(input_ids=ids)["logits"]
    assert float(np.abs(got - _hf_logits(model, ids)).max()) <= TOL


def test_mxfp4_gpt_oss_is_dequantized_and_exported(tmp_path):
    """A gpt-oss with MXFP4 experts as published: dequantized on the way (no quantization
    backend needed), logits equal to the fp32 model holding transformers' own dequantization."""
    from conftest import MXFP4_QUANTIZATION_CONFIG, pack_gpt_oss_mxfp4
    from safetensors.torch import load_file, save_file
    model = build("gpt_oss", tmp_path / "fp32", intermediate_size=32)
    tensors = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    pack_gpt_oss_mxfp4(model, tensors)
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    (tmp_path / "hf").mkdir()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    out = onnx_torch.to_onnx(tmp_path / "hf", tmp_path / "m.onnx")
    ids = _ids(2, 7)
    got = Session(out, library=None).run(input_ids=ids)["logits"]
    assert float(np.abs(got - _hf_logits(model, ids)).max()) <= TOL


def test_bf16_checkpoint_exports_float32(tmp_path):
    """A bf16 checkpoint: exported in float32 (routers widened to the experts' type, exactly),
    logits equal to transformers loading it in float32."""
    model = build("mixtral", tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32).eval()
    out = onnx_torch.to_onnx(tmp_path / "hf", tmp_path / "m.onnx")
    m = onnx.load(str(out))
    assert {t.data_type for t in m.graph.initializer if len(t.dims) >= 2} == \
        {onnx.TensorProto.FLOAT}
    ids = _ids(2, 7)
    for library in ([None, "auto"] if HAS_LIBRARY else [None]):
        got = Session(out, library=library).run(input_ids=ids)["logits"]
        assert float(np.abs(got - _hf_logits(reference, ids)).max()) <= TOL


# --------------------------------------------------------------------------- the custom op
def test_custom_op_eager_is_sparse_moe(exported):
    """torch.ops.seif.moe's eager implementation is SparseMoE's math, on [N, H]."""
    model_type, _model, root, _out = exported
    path = seif.convert.convert(root / "hf", root / "op_check.seif", overwrite=True)
    with seif.open(path) as ckpt:
        index = ckpt.layers[0].index
    module = seif_torch.load_layer(path, index)
    op, _translate = onnx_torch._ops()
    x = torch.randn(7, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    weights = [getattr(module, n, None) for n in onnx_torch._SPARSE_NAMES.values()]
    with torch.no_grad():
        got = op(x, *weights, onnx_torch._spec_json(module.spec))
        want = module(x)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert seif_torch.export_hook is None          # only set while exporting


# --------------------------------------------------------------------------- refusals
def _layer(index: int, routing: RoutingSpec, activation: str = "swiglu") -> LayerSpec:
    return LayerSpec(index, 4, 8, routing, FFNSpec(8, activation))


@pytest.mark.parametrize("routing", [
    RoutingSpec("topk", 2, "softmax", capacity=Capacity(factor=1.25)),
    RoutingSpec("expert_choice", 1, "softmax", capacity=Capacity(factor=1.0)),
], ids=["capacity", "expert_choice"])
def test_token_coupling_routing_is_refused(routing):
    with pytest.raises(ConversionError, match="couple the tokens"):
        onnx_torch._check_layers([_layer(0, routing)])


def test_layers_of_different_configurations_are_refused():
    layers = [_layer(0, RoutingSpec("topk", 2, "softmax")),
              _layer(1, RoutingSpec("topk", 2, "softmax", normalize="sum"))]
    with pytest.raises(ConversionError, match="differ in configuration"):
        onnx_torch._check_layers(layers)


def test_bad_options_are_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    dst = tmp_path / "m.onnx"
    with pytest.raises(ConversionError, match="float32 only"):
        onnx_torch.to_onnx(hf, dst, dtype="bf16")
    with pytest.raises(ConversionError, match="--target ort"):
        onnx_torch.to_onnx(hf, dst, target="ort")
    with pytest.raises(ConversionError, match="layer"):
        onnx_torch.to_onnx(hf, dst, layer=1)
    dst.write_bytes(b"")
    with pytest.raises(ConversionError, match="exists"):
        onnx_torch.to_onnx(hf, dst)


def test_cli_routes_to_the_whole_model_exporter(tmp_path):
    from click.testing import CliRunner

    from seif.cli import main
    onnx_torch.register()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["convert", str(hf), str(tmp_path / "m.onnx"), "--to",
                                       "onnx", "--dtype", "bf16"])
    assert result.exit_code != 0
    assert "float32 only" in result.output


def test_switch_transformers_is_refused(tmp_path):
    """Capacity routing (and no causal-LM head): refused with the reason, nothing written."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "switch_transformers", d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        num_experts=4, expert_capacity=8, vocab_size=64)
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "hf")
    onnx_torch.register()
    with pytest.raises(ConversionError, match="couple the tokens"):
        seif.convert.convert(tmp_path / "hf", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".seif-export-")]


def test_jetmoe_output_bias_survives_the_whole_model_export(tmp_path):
    """JetMoE (SEIF 1.1 output bias; its MoA attention is plain graph): each MoE block is one
    SeifMoE node plus the Add of its bias, the logits match transformers at shapes other than
    the export's, and `--from onnx` gives back the direct conversion's layers and bytes."""
    model = build_tiny_hf("jetmoe", tmp_path / "hf",
                          {**COMMON, "intermediate_size": 16, "num_local_experts": 6,
                           "num_experts_per_tok": 2, "kv_channels": 8})
    onnx_torch.register()
    out = seif.convert.convert(tmp_path / "hf", tmp_path / "model.onnx")
    m = onnx.load(str(out))
    moe = [n for n in m.graph.node if (n.domain, n.op_type) == ("ai.seif", "SeifMoE")]
    adds = {n.name: n for n in m.graph.node if n.name.endswith(".output_bias")}
    assert sorted(adds) == ["layers.0.output_bias", "layers.1.output_bias"] and len(moe) == 2
    for node in moe:
        add = adds[node.name.replace(".moe", ".output_bias")]
        assert add.op_type == "Add" and add.input[0] == node.output[0]
    sess = Session(out, library=None)
    for batch, seq in SHAPES:
        ids = _ids(batch, seq)
        assert float(np.abs(sess.run(input_ids=ids)["logits"] - _hf_logits(model, ids)).max()) \
            <= TOL
    direct = seif.convert.convert(tmp_path / "hf", tmp_path / "direct.seif")
    back = seif.convert.convert(out, tmp_path / "back.seif", source_format="onnx")
    with seif.open(direct) as a, seif.open(back) as b:
        assert [x.to_dict() for x in b.layers] == [x.to_dict() for x in a.layers]
        assert all(x.output_bias for x in b.layers)
        for name in b.tensor_names():
            assert b.tensor(name).tobytes() == a.tensor(name).tobytes(), name
