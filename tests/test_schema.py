"""The JSON Schema, the spec text and `seif.manifest` describe the same manifest (spec §4, §7.2).

(a) manifests built in Python for every routing kind, shared experts, capacity, quantization and
    aliases serialize to JSON that the schema accepts (and that `Manifest.from_dict` reads back);
(b) the schema's objects list exactly the dataclass fields and the keys `to_dict` emits, its enums
    equal the vocabularies in `seif.manifest`, and the feature and dtype tables of the spec equal
    the code's;
(c) broken manifests are refused by both the schema and `Manifest.from_dict`;
plus the reference writer's output validates against the schema.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from seif import dtypes
from seif.errors import FeatureError, FormatError, SecurityError, SeifError, VersionError
from seif.manifest import (
    ACTIVATIONS,
    CHECKSUM_ALGORITHMS,
    DROP_POLICIES,
    EPSILON_RULES,
    GROUP_MASKS,
    GROUP_SCORES,
    KNOWN_FEATURES,
    NORMALIZATIONS,
    QUANT_SCHEMES,
    ROUTING_KINDS,
    SCORINGS,
    SHARD_ROLES,
    WEIGHT_ON,
    Capacity,
    FFNSpec,
    LayerSpec,
    Layout,
    Manifest,
    ModelInfo,
    Quantization,
    RoutingSpec,
    ShardEntry,
    SharedExpertsSpec,
    TensorEntry,
    Training,
)

jsonschema = pytest.importorskip("jsonschema")

SPEC_DIR = Path(__file__).resolve().parent.parent / "spec"
SCHEMA = json.loads((SPEC_DIR / "seif-v1.schema.json").read_text())
SPEC_TEXT = (SPEC_DIR / "seif-v1.md").read_text()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def schema_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATOR.iter_errors(doc)]


# --------------------------------------------------------------------------- building manifests
def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _quantized(name: str, logical: tuple[int, ...], scheme: str):
    """(stored dtype, stored shape, Quantization, companions {name: (dtype, shape)}) per §3.3."""
    R, C = logical
    if scheme == "fp8-block":
        block = [2, 3]
        scale_shape = (math.ceil(R / block[0]), math.ceil(C / block[1]))
        q = Quantization("fp8-block", list(logical), f"{name}_scale", block=block)
        return "F8_E4M3", logical, q, {q.scale: ("F32", scale_shape)}
    if scheme == "mxfp4":
        assert C % 32 == 0
        q = Quantization("mxfp4", list(logical), f"{name}_scale", group_size=32)
        return "U8", (R, C // 32, 16), q, {q.scale: ("U8", (R, C // 32))}
    if scheme == "int-group":
        groups = math.ceil(C / 8)
        q = Quantization("int-group", list(logical), f"{name}_scale", group_size=8, bits=4,
                         zero_point=f"{name}_zero")
        return "U8", (R, math.ceil(C / 2)), q, {q.scale: ("F16", (R, groups)),
                                                q.zero_point: ("U8", (R, groups))}
    raise AssertionError(scheme)


def build_manifest(layers: list[LayerSpec], *, quant: str | None = None,
                   alias_pairs: dict[str, str] | None = None, dense: bool = True,
                   model: ModelInfo | None = None) -> Manifest:
    """A consistent manifest for `layers`: every expected tensor stored (or aliased), expert
    tensors in an "experts" shard, the rest in a "dense" one, 64-byte aligned offsets."""
    alias_pairs = alias_pairs or {}
    wanted: list[tuple[str, str, tuple[int, ...], Quantization | None]] = []
    if dense:
        wanted.append(("model.embed_tokens.weight", "BF16", (10, layers[0].hidden_size), None))
    for layer in layers:
        for name, shape in layer.expected_tensors().items():
            is_expert_weight = ".experts." in name and name.endswith(".weight") \
                and len(shape) == 2
            if quant and is_expert_weight:
                dtype, stored, q, companions = _quantized(name, shape, quant)
                wanted.append((name, dtype, stored, q))
                wanted.extend((c, cd, cs, None) for c, (cd, cs) in companions.items())
            else:
                wanted.append((name, "F32", shape, None))

    cursors = {"dense-00000.safetensors": 0, "experts-00000.safetensors": 0}
    tensors: dict[str, TensorEntry] = {}
    expert_layers, expert_ids = set(), set()
    for name, dtype, shape, q in wanted:
        if name in alias_pairs:
            tensors[name] = TensorEntry(dtype, list(shape), alias_of=alias_pairs[name],
                                        quantization=q)
            continue
        m = re.match(r"^layers\.(\d+)\.experts\.(\d+)\.", name)
        shard = "experts-00000.safetensors" if m else "dense-00000.safetensors"
        if m:
            expert_layers.add(int(m.group(1)))
            expert_ids.add(int(m.group(2)))
        begin = -(-cursors[shard] // 64) * 64
        end = begin + math.prod(shape) * dtypes.itemsize(dtype)
        cursors[shard] = end
        tensors[name] = TensorEntry(dtype, list(shape), shard=shard, data_offsets=[begin, end],
                                    checksum=_digest(name), source_name=f"src.{name}",
                                    quantization=q)
    shards = [
        ShardEntry("dense-00000.safetensors", 4096 + cursors["dense-00000.safetensors"],
                   _digest("dense"), role="mixed"),
        ShardEntry("experts-00000.safetensors", 4096 + cursors["experts-00000.safetensors"],
                   _digest("experts"), role="experts",
                   layers=[min(expert_layers), max(expert_layers)],
                   experts=[min(expert_ids), max(expert_ids)]),
    ]
    features = set()
    for layer in layers:
        features |= layer.features()
    if quant:
        features.add(f"quant.{quant}")
    if alias_pairs:
        features.add("alias")
    return Manifest(required_features=sorted(features), optional_features=["x.hint"],
                    model=model or ModelInfo("transformers", "TestForCausalLM", "test",
                                             {"hidden_size": layers[0].hidden_size}, "test"),
                    layers=layers, tensors=tensors, shards=shards,
                    layout=Layout("by-expert", 1 << 20, 64), generator="tests",
                    metadata={"purpose": "schema test"})


def _layer(index=0, E=4, H=8, I=6, routing=None, act="swiglu", shared=None, **kw) -> LayerSpec:
    return LayerSpec(index=index, num_experts=E, hidden_size=H,
                     routing=routing or RoutingSpec(kind="topk", top_k=2),
                     experts=FFNSpec(I, act, **kw.pop("ffn", {})), shared_experts=shared, **kw)


def case_mixtral():
    return build_manifest([_layer(0, routing=RoutingSpec("topk", 2, normalize="sum",
                                                         training=Training("jitter", 0.01, 0.02)),
                                  source_prefix="model.layers.0.block_sparse_moe"),
                           _layer(1, routing=RoutingSpec("topk", 2, normalize="sum"))])


def case_qwen2_shared_gate():
    shared = SharedExpertsSpec(1, FFNSpec(12, "swiglu"), gate=True)
    return build_manifest([_layer(0, routing=RoutingSpec("topk", 2), shared=shared)])


def case_deepseek_v3_fp8():
    routing = RoutingSpec("group_topk", 2, scoring="sigmoid", selection_bias=True,
                          normalize="sum", epsilon=1e-20, scale=2.5, n_group=4, topk_group=2,
                          group_score="top2_sum", group_mask="neg_inf")
    shared = SharedExpertsSpec(1, FFNSpec(6, "swiglu"))
    return build_manifest([_layer(3, E=8, routing=routing, shared=shared)], quant="fp8-block")


def case_deepseek_v2():
    routing = RoutingSpec("group_topk", 2, n_group=2, topk_group=1, group_score="max",
                          group_mask="zero", scale=16.0)
    return build_manifest([_layer(1, routing=routing,
                                  shared=SharedExpertsSpec(2, FFNSpec(4, "swiglu")))])


def case_expert_choice():
    routing = RoutingSpec("expert_choice", 1, capacity=Capacity(factor=2.0))
    return build_manifest([_layer(0, routing=routing, act="gelu")])


def case_sparse_mixer():
    return build_manifest([_layer(0, routing=RoutingSpec("sparse_mixer", 2, jitter_eps=0.01))])


def case_soft_moe():
    routing = RoutingSpec("soft_moe", 1, router_bias=True, slots_per_expert=3)
    return build_manifest([_layer(0, routing=routing, act="gelu_tanh")])


def case_switch_capacity():
    routing = RoutingSpec("topk", 1, capacity=Capacity(tokens=5, drop_policy="passthrough_scaled"),
                          training=Training("jitter", 0.01, 0.01, 0.001))
    return build_manifest([_layer(1, routing=routing, act="relu", ffn={"bias": True})])


def case_llama4_weight_on_input():
    routing = RoutingSpec("topk", 1, scoring="sigmoid_topk", weight_on="input")
    shared = SharedExpertsSpec(1, FFNSpec(6, "swiglu"))
    return build_manifest([_layer(0, routing=routing, shared=shared)])


def case_gpt_oss_mxfp4():
    routing = RoutingSpec("topk", 2, scoring="softmax_topk", router_bias=True)
    layer = _layer(0, H=32, I=64, routing=routing, act="swiglu_oai",
                   ffn={"bias": True, "alpha": 1.702, "limit": 7.0})
    return build_manifest([layer], quant="mxfp4")


def case_dbrx_lp():
    routing = RoutingSpec("topk", 2, normalize="lp", norm_p=2.0)
    return build_manifest([_layer(0, routing=routing, act="geglu")])


def case_ernie_int_group():
    routing = RoutingSpec("topk", 2, selection_bias=True, normalize="sum", epsilon=1e-12,
                          epsilon_rule="clamp")
    return build_manifest([_layer(0, H=9, routing=routing, act="geglu_tanh")],
                          quant="int-group")


def case_aliases():
    layers = [_layer(0, act="silu"), _layer(1, act="relu2")]  # same up/down shapes
    alias = {f"layers.1.experts.{e}.{p}.weight": f"layers.0.experts.{e}.{p}.weight"
             for e in range(4) for p in ("up", "down")}
    return build_manifest(layers, alias_pairs=alias)


def case_expert_subset():
    return build_manifest([_layer(2, E=3, expert_ids=[5, 9, 17])], dense=False,
                          model=ModelInfo())


def case_jetmoe_output_bias():
    """SEIF 1.1: JetMoE's layer output bias (two layers, the second also has a shared gate)."""
    routing = RoutingSpec("topk", 2, scoring="softmax_topk")
    shared = SharedExpertsSpec(1, FFNSpec(6, "swiglu"), gate=True)
    return build_manifest([_layer(0, routing=routing, output_bias=True),
                           _layer(1, routing=RoutingSpec("topk", 2, scoring="softmax_topk"),
                                  shared=shared, output_bias=True)])


CASES = [case_mixtral, case_qwen2_shared_gate, case_deepseek_v3_fp8, case_deepseek_v2,
         case_expert_choice, case_sparse_mixer, case_soft_moe, case_switch_capacity,
         case_llama4_weight_on_input, case_gpt_oss_mxfp4, case_dbrx_lp, case_ernie_int_group,
         case_aliases, case_expert_subset, case_jetmoe_output_bias]


# --------------------------------------------------------------------------- (a) valid manifests
def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__[5:])
def test_built_manifest_validates(case):
    manifest = case()
    doc = json.loads(manifest.to_json())
    assert schema_errors(doc) == []
    again = Manifest.from_dict(doc)          # the code accepts what the schema accepts
    assert again.to_dict() == doc


def test_every_routing_kind_and_activation_is_exercised():
    docs = [c().to_dict() for c in CASES]
    kinds = {layer["routing"]["kind"] for d in docs for layer in d["layers"]}
    acts = {layer["experts"]["activation"] for d in docs for layer in d["layers"]}
    schemes = {t["quantization"]["scheme"] for d in docs for t in d["tensors"].values()
               if "quantization" in t}
    assert kinds == set(ROUTING_KINDS)
    assert acts == set(ACTIVATIONS)
    assert schemes == set(QUANT_SCHEMES)


def test_appendix_example_is_valid():
    section = SPEC_TEXT.split("## Appendix A", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S).group(1)
    doc = json.loads(block)
    assert schema_errors(doc) == []
    Manifest.from_dict(doc)


# --------------------------------------------------------------------------- (b) names and enums
# dataclass -> where its JSON object lives in the schema
OBJECTS = {
    Manifest: None,
    ModelInfo: "model",
    Layout: "layout",
    LayerSpec: "layer",
    RoutingSpec: "routing",
    Capacity: "capacity",
    Training: "training",
    FFNSpec: "ffn",
    SharedExpertsSpec: "shared_experts",
    TensorEntry: "tensor",
    Quantization: "quantization",
    ShardEntry: "shard",
}


def _schema_obj(key: str | None) -> dict:
    return SCHEMA if key is None else SCHEMA["$defs"][key]


def _emitted_keys() -> dict[str | None, set[str]]:
    """Every key that to_dict emits, per schema object, over all test manifests."""
    seen: dict[str | None, set[str]] = {k: set() for k in OBJECTS.values()}
    for case in CASES:
        d = case().to_dict()
        seen[None] |= set(d)
        seen["model"] |= set(d["model"])
        seen["layout"] |= set(d["layout"])
        for layer in d["layers"]:
            seen["layer"] |= set(layer)
            seen["routing"] |= set(layer["routing"])
            seen["training"] |= set(layer["routing"]["training"])
            if "capacity" in layer["routing"]:
                seen["capacity"] |= set(layer["routing"]["capacity"])
            seen["ffn"] |= set(layer["experts"])
            if layer["shared_experts"]:
                seen["shared_experts"] |= set(layer["shared_experts"])
                seen["ffn"] |= set(layer["shared_experts"]["ffn"])
        for t in d["tensors"].values():
            seen["tensor"] |= set(t)
            if "quantization" in t:
                seen["quantization"] |= set(t["quantization"])
        for s in d["shards"]:
            seen["shard"] |= set(s)
    return seen


@pytest.mark.parametrize("cls", list(OBJECTS), ids=lambda c: c.__name__)
def test_schema_properties_equal_dataclass_fields(cls):
    props = set(_schema_obj(OBJECTS[cls])["properties"])
    fields = {f.name for f in dataclasses.fields(cls)}
    assert props == fields, (f"only in schema: {sorted(props - fields)}; "
                             f"only in code: {sorted(fields - props)}")


def test_schema_properties_equal_emitted_keys():
    seen = _emitted_keys()
    for key, keys in seen.items():
        props = set(_schema_obj(key)["properties"])
        assert keys == props, (f"{key or 'top level'}: emitted but not in schema "
                               f"{sorted(keys - props)}; in schema but never emitted "
                               f"{sorted(props - keys)}")


def test_required_lists_are_properties():
    for key in OBJECTS.values():
        obj = _schema_obj(key)
        assert set(obj["required"]) <= set(obj["properties"])
        assert obj["additionalProperties"] is True, "spec §4.16: unknown fields are allowed"


def _enum(key: str, prop: str) -> list:
    return _schema_obj(key)["properties"][prop]["enum"]


@pytest.mark.parametrize("key,prop,vocabulary", [
    ("routing", "kind", ROUTING_KINDS),
    ("routing", "scoring", SCORINGS),
    ("routing", "normalize", NORMALIZATIONS),
    ("routing", "epsilon_rule", EPSILON_RULES),
    ("routing", "group_score", GROUP_SCORES),
    ("routing", "group_mask", GROUP_MASKS),
    ("routing", "weight_on", WEIGHT_ON),
    ("capacity", "drop_policy", DROP_POLICIES),
    ("ffn", "activation", ACTIVATIONS),
    ("quantization", "scheme", QUANT_SCHEMES),
    ("shard", "role", SHARD_ROLES),
    (None, "checksum_algorithm", CHECKSUM_ALGORITHMS),
    ("tensor", "dtype", tuple(dtypes.DTYPES)),
])
def test_schema_enum_equals_code_vocabulary(key, prop, vocabulary):
    values = _enum(key, prop)
    assert len(values) == len(set(values))
    assert set(values) == set(vocabulary)


def test_feature_enum_equals_known_features():
    assert set(SCHEMA["$defs"]["feature"]["enum"]) == set(KNOWN_FEATURES)


def test_training_noise_enum_matches_parser():
    values = _enum("training", "noise")
    for v in values:
        assert Training.from_dict({"noise": v}, "training").noise == v
    with pytest.raises(FormatError):
        Training.from_dict({"noise": "dropout"}, "training")


def _spec_section(heading: str) -> str:
    """The text of a `### heading` section of the spec, up to the next heading."""
    m = re.search(rf"^### {re.escape(heading)}.*?$(.*?)(?=^#{{2,4}} )", SPEC_TEXT, re.M | re.S)
    assert m, f"spec has no section {heading!r}"
    return m.group(1)


def _first_column(section: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_spec_feature_table_equals_known_features():
    documented = _first_column(_spec_section("7.2"))
    assert len(documented) == len(set(documented))
    assert set(documented) == set(KNOWN_FEATURES)


def test_spec_dtype_table_equals_code():
    assert _first_column(_spec_section("3.2")) == list(dtypes.DTYPES)


def test_spec_activation_table_equals_code():
    assert set(_first_column(_spec_section("5.13"))) == set(ACTIVATIONS)


# --------------------------------------------------------------------------- (c) invalid input
def _valid() -> dict:
    return case_deepseek_v3_fp8().to_dict()


def _routing(d: dict) -> dict:
    return d["layers"][0]["routing"]


def _first_tensor(d: dict) -> dict:
    return next(iter(d["tensors"].values()))


def _set(path_fn, key, value):
    def mutate(d):
        path_fn(d)[key] = value
    return mutate


def _delete(path_fn, key):
    def mutate(d):
        del path_fn(d)[key]
    return mutate


INVALID = {
    "missing seif_version": (_delete(lambda d: d, "seif_version"), FormatError),
    "major 2": (_set(lambda d: d, "seif_version", "2.0"), VersionError),
    "not MAJOR.MINOR": (_set(lambda d: d, "seif_version", "1"), FormatError),
    "unknown feature": (lambda d: d["required_features"].append("routing.hash"), FeatureError),
    "missing shards": (_delete(lambda d: d, "shards"), FormatError),
    "unknown routing kind": (_set(_routing, "kind", "hash"), FeatureError),
    "unknown scoring": (_set(_routing, "scoring", "sqrt_softplus"), FeatureError),
    "top_k zero": (_set(_routing, "top_k", 0), FormatError),
    "top_k boolean": (_set(_routing, "top_k", True), FormatError),
    "group_topk without n_group": (_delete(_routing, "n_group"), FormatError),
    "capacity with tokens and factor": (
        _set(_routing, "capacity", {"tokens": 4, "factor": 1.0, "drop_policy": "zero"}),
        FormatError),
    "unknown activation": (_set(lambda d: d["layers"][0]["experts"], "activation", "swish"),
                           FeatureError),
    "unknown dtype": (_set(_first_tensor, "dtype", "F128"), FormatError),
    "rank 9": (_set(_first_tensor, "shape", [1] * 9), FormatError),
    "stored and alias": (_set(_first_tensor, "alias_of", "layers.3.router.weight"), FormatError),
    "shard path traversal": (_set(lambda d: d["shards"][0], "file", "../evil.safetensors"),
                             SecurityError),
    "fp8-block without block": (
        lambda d: d["tensors"]["layers.3.experts.0.up.weight"]["quantization"].pop("block"),
        FormatError),
    "unknown checksum algorithm": (_set(lambda d: d, "checksum_algorithm", "md5"), FeatureError),
}


def _bias_doc() -> dict:
    return case_jetmoe_output_bias().to_dict()


def test_output_bias_manifest_is_version_1_1_and_others_stay_1_0():
    """Spec §7.1: the version written is the lowest whose rules the checkpoint follows."""
    doc = _bias_doc()
    assert doc["seif_version"] == "1.1"
    assert "layer.output_bias" in doc["required_features"]
    assert doc["layers"][0]["output_bias"] is True
    assert doc["tensors"]["layers.0.output_bias"]["shape"] == [8]
    for case in CASES[:-1]:
        plain = case().to_dict()
        assert plain["seif_version"] == "1.0"
        assert all("output_bias" not in layer for layer in plain["layers"])
    again = Manifest.from_dict(copy.deepcopy(doc))
    assert again.seif_version == "1.1" and again.layers[1].output_bias


OUTPUT_BIAS_INVALID = {
    "feature not declared": (lambda d: d["required_features"].remove("layer.output_bias"),
                             FormatError, False),
    "tensor missing": (lambda d: d["tensors"].pop("layers.1.output_bias"), FormatError, False),
    "wrong shape": (lambda d: d["tensors"]["layers.0.output_bias"].update(shape=[9]),
                    FormatError, False),
    "version 1.0": (lambda d: d.update(seif_version="1.0"), FormatError, False),
    "not a boolean": (lambda d: d["layers"][0].update(output_bias="yes"), FormatError, True),
}


@pytest.mark.parametrize("name", list(OUTPUT_BIAS_INVALID))
def test_output_bias_invalid_is_refused(name):
    """Cross-field rules (§4.1, §7.2) are the reader's; the schema sees only field types."""
    mutate, error, schema_sees = OUTPUT_BIAS_INVALID[name]
    doc = _bias_doc()
    mutate(doc)
    assert bool(schema_errors(doc)) == schema_sees
    with pytest.raises(error):
        Manifest.from_dict(copy.deepcopy(doc))


def test_reader_without_output_bias_refuses_with_feature_error(monkeypatch):
    """What a SEIF 1.0 reader does with a 1.1 output-bias checkpoint: FeatureError (§7.2)."""
    from seif import manifest as mf
    monkeypatch.setattr(mf, "KNOWN_FEATURES", mf.KNOWN_FEATURES - {"layer.output_bias"})
    with pytest.raises(FeatureError, match="layer.output_bias"):
        Manifest.from_dict(_bias_doc())


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_manifest_is_refused(name):
    mutate, error = INVALID[name]
    doc = _valid()
    assert schema_errors(doc) == []
    mutate(doc)
    assert schema_errors(doc), f"schema accepted: {name}"
    with pytest.raises(error):
        Manifest.from_dict(copy.deepcopy(doc))


def test_sparse_mixer_needs_top_k_2():
    doc = case_sparse_mixer().to_dict()
    _routing(doc)["top_k"] = 3
    assert schema_errors(doc)
    with pytest.raises(SeifError):
        Manifest.from_dict(doc)


def test_unknown_optional_fields_are_accepted():
    """Spec §4.16 / §7.1: a 1.x reader ignores fields a later minor adds."""
    doc = _valid()
    doc["seif_version"] = "1.7"
    doc["future_top_level"] = {"x": 1}
    _routing(doc)["future_field"] = 3
    _first_tensor(doc)["future_field"] = "y"
    doc["shards"][0]["future_field"] = []
    assert schema_errors(doc) == []
    Manifest.from_dict(doc)


# --------------------------------------------------------------------------- the writer
def test_writer_output_validates(tmp_path):
    try:
        import seif
        save, seif_open = seif.save, seif.open
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"seif.save / seif.open not available yet: {exc}")
    rng = np.random.default_rng(0)
    layers = [
        _layer(0, routing=RoutingSpec("topk", 2, normalize="sum")),
        _layer(2, E=8, routing=RoutingSpec("group_topk", 2, scoring="sigmoid",
                                           selection_bias=True, normalize="sum", epsilon=1e-20,
                                           scale=2.5, n_group=4, topk_group=2,
                                           group_score="top2_sum"),
               shared=SharedExpertsSpec(1, FFNSpec(4, "swiglu"), gate=True)),
    ]
    tensors = {"model.embed_tokens.weight": rng.standard_normal((10, 8)).astype(np.float32)}
    for layer in layers:
        for name, shape in layer.expected_tensors().items():
            tensors[name] = rng.standard_normal(shape).astype(np.float32)
    path = tmp_path / "m.seif"
    save(path, tensors, layers, model=ModelInfo("transformers", "TestForCausalLM", "test",
                                                {"hidden_size": 8}, "writer-test"))
    with open(path / "seif.json") as fh:
        doc = json.load(fh)
    assert schema_errors(doc) == []
    assert set(doc["required_features"]) == {"routing.group_topk"}
    ckpt = seif_open(path)
    try:
        assert [layer.index for layer in ckpt.manifest.layers] == [0, 2]
    finally:
        close = getattr(ckpt, "close", None)
        if close:
            close()
