"""Format cases: checkpoints a reader must accept, and malformed ones it must refuse (§2-§4,
§7-§10).

Each case has a builder ``build(dir) -> checkpoint path`` that writes a small checkpoint with
`seif.save` and, for malformed cases, damages exactly one thing. Accepted cases carry the real
values of every tensor (``expected["t/<name>"]``, float32, dequantized where quantized) so a
reader is also checked for reading the right bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from .. import writer as _writer
from ..manifest import (
    Capacity,
    FFNSpec,
    LayerSpec,
    ModelInfo,
    Quantization,
    RoutingSpec,
    SharedExpertsSpec,
)
from ..quant import dequantize
from .cases import Case

CKPT = "ckpt.seif"


def _layers(E=4, H=8, I=4) -> list[LayerSpec]:
    return [
        LayerSpec(0, E, H, RoutingSpec("topk", 2, normalize="sum"), FFNSpec(I, "swiglu")),
        LayerSpec(3, E, H, RoutingSpec("group_topk", 2, "sigmoid", selection_bias=True,
                                       normalize="sum", epsilon=1e-20, scale=2.0, n_group=2,
                                       topk_group=1, group_score="top2_sum"),
                  FFNSpec(I, "swiglu"), SharedExpertsSpec(1, FFNSpec(I, "swiglu"), True)),
    ]


def _tensors(layers, rng, dtype=np.float32, dense=True) -> dict[str, np.ndarray]:
    out = {}
    if dense:
        out["model.embed_tokens.weight"] = rng.standard_normal((6, layers[0].hidden_size)
                                                               if layers else (6, 8))
    for layer in layers:
        for name, shape in layer.expected_tensors().items():
            out[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
    return {k: v.astype(dtype) for k, v in out.items()}


class _Spec:
    """What a format case's builder writes (before any damage)."""

    def __init__(self, layers=None, tensors=None, quant=None, **save_kw):
        self.layers = _layers() if layers is None else layers
        self.tensors = tensors
        self.quant = quant or {}
        self.save_kw = save_kw

    def materialize(self, rng) -> None:
        if self.tensors is None:
            self.tensors = _tensors(self.layers, rng)

    def save(self, directory: Path) -> Path:
        return _writer.save(directory / CKPT, self.tensors, self.layers,
                            quantization={k: Quantization.from_dict(v, k)
                                          for k, v in self.quant.items()},
                            **self.save_kw)

    def real_values(self) -> dict[str, np.ndarray]:
        out = {}
        for name, a in self.tensors.items():
            if name in self.quant:
                out[name] = dequantize(a, Quantization.from_dict(self.quant[name], name),
                                       self.tensors.__getitem__, name).astype(np.float32)
            else:
                out[name] = a.astype(np.float32)
        return out


# ------------------------------------------------------------------------- damage helpers
def _edit(ckpt: Path, fn: Callable[[dict], None]) -> None:
    m = json.loads((ckpt / "seif.json").read_text())
    fn(m)
    (ckpt / "seif.json").write_text(json.dumps(m, indent=1) + "\n")


def _expert_shard(ckpt: Path) -> str:
    m = json.loads((ckpt / "seif.json").read_text())
    return next(s["file"] for s in m["shards"] if s["role"] == "experts")


def _rewrite_header(ckpt: Path, file: str, fn: Callable[[str], str]) -> None:
    """Replace a shard's JSON header and record the new size, so only the header is wrong."""
    path = ckpt / file
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = fn(data[8:8 + n].decode()).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    size = path.stat().st_size
    _edit(ckpt, lambda m: next(s for s in m["shards"] if s["file"] == file).update(size=size))


def _move_shard(m: dict, new: str) -> None:
    old = m["shards"][0]["file"]
    m["shards"][0]["file"] = new
    for t in m["tensors"].values():
        if t.get("shard") == old:
            t["shard"] = new


def _dup_header_key(text: str) -> str:
    header = json.loads(text)
    name = next(k for k in header if k.endswith("down.weight"))
    entry = json.dumps(header[name], separators=(",", ":"))
    return text.rstrip()[:-1] + f',"{name}":{entry}' + "}"


def _overlap(text: str) -> str:
    header = json.loads(text)
    names = [k for k in header if k.endswith(".weight")]
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    return json.dumps(header)


def _header_extra_tensor(text: str) -> str:
    """Add a zero-size entry (it tiles: it covers no bytes) that the manifest does not list."""
    header = json.loads(text)
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["layers.0.experts.0.extra.weight"] = {"dtype": "F32", "shape": [0],
                                                 "data_offsets": [end, end]}
    return json.dumps(header)


def _metadata_not_string(text: str) -> str:
    header = json.loads(text)
    header["__metadata__"] = {"format": "seif", "n": 3}
    return json.dumps(header)


def _not_brace(text: str) -> str:
    return "[" + json.dumps(json.loads(text)) + "]"


def _flip_bit(ckpt: Path, name: str) -> None:
    m = json.loads((ckpt / "seif.json").read_text())
    entry = m["tensors"][name]
    path = ckpt / entry["shard"]
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + entry["data_offsets"][0] + 3] ^= 0x10
    path.write_bytes(bytes(data))


def _chain(*steps):
    def run(ckpt: Path) -> None:
        for step in steps:
            step(ckpt)
    return run


def _m(fn):
    """A damage step that edits the manifest dict."""
    return lambda ckpt: _edit(ckpt, fn)


# --------------------------------------------------------------------------- valid cases
def _q_spec(scheme: str, rng) -> _Spec:
    from .catalogue import _quantize_fp8, _quantize_int, _quantize_mxfp4
    H, I = (32, 32) if scheme == "mxfp4" else (8, 12)
    layers = [LayerSpec(0, 2, H, RoutingSpec("topk", 1), FFNSpec(I, "swiglu"))]
    tensors = _tensors(layers, rng, dense=False)
    quant = {}
    for name in list(tensors):
        if ".experts." not in name:
            continue
        w = tensors[name]
        R, C = w.shape
        desc = {"logical_shape": [R, C], "scale": name + "_scale"}
        if scheme == "fp8-block":
            tensors[name], tensors[name + "_scale"] = _quantize_fp8(w, (8, 8))
            desc.update(scheme="fp8-block", block=[8, 8])
        elif scheme == "mxfp4":
            tensors[name], tensors[name + "_scale"] = _quantize_mxfp4(rng, R, C)
            desc.update(scheme="mxfp4")
        else:
            bits, asym = (4, False) if scheme == "int4" else (8, True)
            q, s, z = _quantize_int(rng, w, bits, 8, asym)
            tensors[name], tensors[name + "_scale"] = q, s
            desc.update(scheme="int-group", bits=bits, group_size=8)
            if z is not None:
                tensors[name + "_zero"] = z
                desc["zero_point"] = name + "_zero"
        quant[name] = desc
    return _Spec(layers, tensors, quant)


def _all_kinds_layers() -> list[LayerSpec]:
    R = RoutingSpec
    return [
        LayerSpec(1, 4, 8, R("topk", 2, "softmax_topk", router_bias=True),
                  FFNSpec(4, "swiglu_oai", bias=True)),
        LayerSpec(2, 4, 8, R("group_topk", 2, n_group=2, topk_group=1), FFNSpec(4, "geglu")),
        LayerSpec(4, 4, 8, R("expert_choice", 1, capacity=Capacity(factor=1.0)),
                  FFNSpec(4, "relu")),
        LayerSpec(5, 4, 8, R("sparse_mixer", 2, jitter_eps=0.01), FFNSpec(4, "swiglu")),
        LayerSpec(6, 4, 8, R("soft_moe", 1, slots_per_expert=2), FFNSpec(4, "gelu_tanh")),
        LayerSpec(7, 4, 8, R("topk", 1, "sigmoid_topk", weight_on="input",
                             capacity=Capacity(tokens=4, drop_policy="passthrough_scaled")),
                  FFNSpec(4, "relu2"), SharedExpertsSpec(2, FFNSpec(4, "silu"))),
        LayerSpec(8, 4, 8, R("topk", 2, normalize="lp", norm_p=2.0), FFNSpec(4, "geglu_tanh")),
    ]


def _newer_minor(m: dict) -> None:
    m["seif_version"] = "1.7"
    m["some_future_field"] = {"x": [1, 2]}
    m["optional_features"] = ["future.hint"]
    m["model"]["future"] = True
    m["layout"]["future"] = 1
    m["layers"][0]["routing"]["future_knob"] = 3
    m["layers"][0]["experts"]["future_knob"] = "a"
    m["layers"][0]["future"] = None
    m["shards"][0]["future"] = "x"
    next(iter(m["tensors"].values()))["future"] = [None]


def _required_fields_only(m: dict) -> None:
    """Drop every optional field (a minimal 1.0 manifest, as an older writer could emit)."""
    for key in ("required_features", "optional_features", "generator", "model", "layout",
                "checksum_algorithm", "metadata"):
        if key == "required_features" and m.get(key):
            continue
        m.pop(key, None)
    for layer in m["layers"]:
        layer.pop("source_prefix", None)
        if layer.get("shared_experts") is None:
            layer.pop("shared_experts", None)
        r = layer["routing"]
        for key, default in (("scoring", "softmax"), ("router_bias", False),
                             ("selection_bias", False), ("normalize", "none"),
                             ("epsilon", 0.0), ("epsilon_rule", "add"), ("scale", 1.0),
                             ("weight_on", "output"), ("training", None)):
            if key == "training" or r.get(key) == default:
                r.pop(key, None)
        layer["experts"].pop("bias", None) if not layer["experts"].get("bias") else None
    for s in m["shards"]:
        if s.get("role") == "mixed":
            s.pop("role")
    for t in m["tensors"].values():
        t.pop("source_name", None)


def _extra_files(ckpt: Path) -> None:
    (ckpt / "README.md").write_text("unlisted files are ignored (§2.5)\n")
    (ckpt / "notes").mkdir()
    (ckpt / "notes" / "x.txt").write_text("x")


def _symlink_inside(ckpt: Path) -> None:
    shard = _expert_shard(ckpt)
    os.rename(ckpt / shard, ckpt / "real.bin")
    os.symlink("real.bin", ckpt / shard)


VALID: list[tuple[str, str, str, Callable]] = [
    # (name, spec_ref, description, spec factory(rng) -> (_Spec, post-step or None))
    ("default-two-layers", "§2, §4, §8.3", "two MoE layers (topk; group_topk with a gated "
     "shared expert) and a dense tensor, default by-expert layout",
     lambda rng: (_Spec(), None)),
    ("many-shards", "§8.3", "by-expert layout split into many small shards",
     lambda rng: (_Spec(max_shard_bytes=512), None)),
    ("single-shard", "§8.3", "everything in one mixed shard",
     lambda rng: (_Spec(max_shard_bytes=1 << 40), None)),
    ("tensor-per-shard", "§8.3", "one tensor per shard (cap below every tensor)",
     lambda rng: (_Spec(max_shard_bytes=1), None)),
    ("alignment-4096", "§8.2", "tensors aligned to 4096 bytes with padding entries",
     lambda rng: (_Spec(alignment=4096), None)),
    ("alignment-8", "§8.2", "tensors aligned to 8 bytes", lambda rng: (_Spec(alignment=8), None)),
    ("bf16-weights", "§3.2", "bfloat16 weights", lambda rng: (_Spec(
        tensors=_tensors(_layers(), rng, ml_dtypes.bfloat16)), None)),
    ("fp16-weights", "§3.2", "float16 weights", lambda rng: (_Spec(
        tensors=_tensors(_layers(), rng, np.float16)), None)),
    ("aliases", "§4.15", "byte-identical experts of two layers stored once (alias feature)",
     lambda rng: (_aliased(rng), None)),
    ("quant-fp8-block", "§3.3.2", "FP8 E4M3 experts with [8, 8] block scales (partial blocks)",
     lambda rng: (_q_spec("fp8-block", rng), None)),
    ("quant-mxfp4", "§3.3.3", "MXFP4 experts: U8 blocks [R, G, 16] and E8M0 scales",
     lambda rng: (_q_spec("mxfp4", rng), None)),
    ("quant-int4-sym", "§3.3.4", "int4 symmetric, two per byte, group 8 (partial group)",
     lambda rng: (_q_spec("int4", rng), None)),
    ("quant-int8-asym", "§3.3.4", "int8 asymmetric with zero points",
     lambda rng: (_q_spec("int8", rng), None)),
    ("all-routing-kinds", "§4.5, §7.2", "one layer of every routing kind and option (features "
     "declared), non-contiguous layer indices", lambda rng: (_Spec(_all_kinds_layers()), None)),
    ("expert-subset", "§4.2", "expert_ids: a checkpoint cut to experts [5, 9, 2]",
     lambda rng: (_subset(rng), None)),
    ("dense-only", "§4.8", "no MoE layers at all", lambda rng: (_Spec(layers=[]), None)),
    ("zero-size-tensor", "§3.1", "a tensor with a zero dimension",
     lambda rng: (_zero_size(rng), None)),
    ("metadata-and-source", "§4.9, §4.14", "metadata, model info and source names",
     lambda rng: (_Spec(model=ModelInfo("transformers", "MixtralForCausalLM", "mixtral",
                                        {"num_local_experts": 4, "nested": {"a": [1]}}, "tiny"),
                        metadata={"license": "apache-2.0"},
                        source_names={"layers.0.router.weight": "model.layers.0.gate.weight"}),
                  None)),
    ("newer-minor-unknown-fields", "§4.16, §7.1, §7.3", "SEIF 1.7 with unknown fields in "
     "every object and an unknown optional feature: must load",
     lambda rng: (_Spec(), _m(_newer_minor))),
    ("v1.0-required-fields-only", "§4, §7.1", "a 1.0 manifest with every optional field "
     "omitted (defaults apply), as an older or minimal writer emits",
     lambda rng: (_Spec(), _m(_required_fields_only))),
    ("unlisted-files", "§2.5", "unlisted files and directories are ignored",
     lambda rng: (_Spec(), _extra_files)),
    ("symlink-inside", "§9.3", "a shard that is a symlink to a file inside the checkpoint",
     lambda rng: (_Spec(), _symlink_inside)),
    ("output-bias", "§4.1, §4.2, §5.16, §7.2", "SEIF 1.1: a layer with output_bias, "
     "layer.output_bias declared, seif_version 1.1",
     lambda rng: (_Spec(_output_bias_layers()), None)),
]


def _output_bias_layers() -> list[LayerSpec]:
    """The default two layers, the first with a SEIF 1.1 output bias (JetMoE)."""
    layers = _layers()
    layers[0].output_bias = True
    return layers


def _aliased(rng) -> _Spec:
    layers = [LayerSpec(0, 2, 8, RoutingSpec("topk", 1), FFNSpec(4, "relu")),
              LayerSpec(1, 2, 8, RoutingSpec("topk", 1), FFNSpec(4, "relu"))]
    t = _tensors(layers, rng)
    for e in range(2):
        for proj in ("up", "down"):
            t[layers[1].expert_name(e, proj)] = t[layers[0].expert_name(e, proj)].copy()
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    return _Spec(layers, t, dedupe=True)


def _subset(rng) -> _Spec:
    layer = LayerSpec(0, 3, 8, RoutingSpec("topk", 2), FFNSpec(4, "swiglu"),
                      expert_ids=[5, 9, 2])
    return _Spec([layer], _tensors([layer], rng))


def _zero_size(rng) -> _Spec:
    s = _Spec()
    s.materialize(rng)
    s.tensors["empty.weight"] = np.zeros((0, 8), np.float32)
    return s


# ----------------------------------------------------------------------- malformed cases
def _outside_shard(ckpt: Path) -> None:
    shard = _expert_shard(ckpt)
    os.rename(ckpt / shard, ckpt.parent / "outside.safetensors")
    os.symlink("../outside.safetensors", ckpt / shard)


def _outside_manifest(ckpt: Path) -> None:
    os.rename(ckpt / "seif.json", ckpt.parent / "outside.json")
    os.symlink("../outside.json", ckpt / "seif.json")


def _truncate(ckpt: Path) -> None:
    p = ckpt / _expert_shard(ckpt)
    p.write_bytes(p.read_bytes()[:-100])


def _extend(ckpt: Path) -> None:
    with open(ckpt / _expert_shard(ckpt), "ab") as fh:
        fh.write(b"\0" * 64)


def _header_len(value: int) -> Callable[[Path], None]:
    def run(ckpt: Path) -> None:
        p = ckpt / _expert_shard(ckpt)
        data = p.read_bytes()
        p.write_bytes(struct.pack("<Q", value) + data[8:])
    return run


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_bytes(data)


def _not_a_dir(directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / CKPT
    p.write_bytes(b"SEIF? no: a checkpoint is a directory\n")
    return p


def _dup_manifest_key(ckpt: Path) -> None:
    p = ckpt / "seif.json"
    text = p.read_text()
    p.write_text(text.replace('"seif_version": "1.0"',
                              '"seif_version": "1.0", "seif_version": "1.0"', 1))


def _routing(field, value, layer=0):
    return _m(lambda m: m["layers"][layer]["routing"].update({field: value}))


def _tensor(name, **kw):
    return _m(lambda m: m["tensors"][name].update(kw))


def _swap_shape(m):
    t = m["tensors"]["model.embed_tokens.weight"]
    t["shape"] = [t["shape"][1], t["shape"][0]]


def _alias(target, **kw):
    def fn(m):
        t = m["tensors"].get(target, {"dtype": "F32", "shape": [6, 8]})
        m["tensors"]["lm_head.weight"] = {"dtype": t["dtype"], "shape": t["shape"],
                                          "alias_of": target, **kw}
    return fn


def _alias_chain(m):
    t = m["tensors"]["model.embed_tokens.weight"]
    m["required_features"].append("alias")
    m["tensors"]["a1"] = {"dtype": t["dtype"], "shape": t["shape"],
                          "alias_of": "model.embed_tokens.weight"}
    m["tensors"]["a2"] = {"dtype": t["dtype"], "shape": t["shape"], "alias_of": "a1"}


def _drop_tensor(m):
    name = "layers.0.experts.1.up.weight"
    del m["tensors"][name]


def _quant_missing_feature(m):
    m["required_features"] = [f for f in m["required_features"] if not f.startswith("quant.")]


def _quant_missing_companion(m):
    name = next(n for n, t in m["tensors"].items() if t.get("quantization"))
    del m["tensors"][m["tensors"][name]["quantization"]["scale"]]


def _drop_feature(feature):
    return _m(lambda m: m.update(required_features=[f for f in m["required_features"]
                                                    if f != feature]))


def _fake_checksum(m):
    m["shards"][0]["checksum"] = "sha256:" + "0" * 64


def _dup_shard(m):
    m["shards"].append(dict(m["shards"][0]))


def _dup_layer(m):
    m["layers"][1]["index"] = m["layers"][0]["index"]


def _nan_scale(ckpt: Path) -> None:
    p = ckpt / "seif.json"
    m = json.loads(p.read_text())
    m["layers"][0]["routing"]["scale"] = float("nan")
    p.write_text(json.dumps(m))   # Python writes the non-JSON token NaN


MALFORMED: list[tuple[str, str, str, str, Callable | None]] = [
    # (name, error class, spec_ref, description, damage(ckpt) or None)
    ("version/major-2", "VersionError", "§7.1", "seif_version 2.0",
     _m(lambda m: m.update(seif_version="2.0"))),
    ("version/not-major-minor", "FormatError", "§7.1", "seif_version '1'",
     _m(lambda m: m.update(seif_version="1"))),
    ("feature/unknown-required", "FeatureError", "§7.2", "required feature routing.hash",
     _m(lambda m: m["required_features"].append("routing.hash"))),
    ("feature/unknown-routing-kind", "FeatureError", "§4.5, §10", "routing.kind 'hash'",
     _routing("kind", "hash")),
    ("feature/unknown-scoring", "FeatureError", "§4.5, §10", "scoring 'sparsemax'",
     _routing("scoring", "sparsemax")),
    ("feature/unknown-activation", "FeatureError", "§4.3, §10", "activation 'swish2'",
     _m(lambda m: m["layers"][0]["experts"].update(activation="swish2"))),
    ("feature/unknown-checksum-algorithm", "FeatureError", "§8.1", "checksum_algorithm md5",
     _m(lambda m: m.update(checksum_algorithm="md5"))),
    ("feature/unknown-drop-policy", "FeatureError", "§4.6", "capacity.drop_policy 'reroute'",
     _m(lambda m: (m["layers"][0]["routing"].update(capacity={"tokens": 2,
                                                              "drop_policy": "reroute"}),
                   m["required_features"].append("routing.capacity")))),
    ("path/parent-dir", "SecurityError", "§9.2", "shard file '../outside.safetensors'",
     _m(lambda m: _move_shard(m, "../outside.safetensors"))),
    ("path/absolute", "SecurityError", "§9.2", "shard file '/etc/passwd'",
     _m(lambda m: _move_shard(m, "/etc/passwd"))),
    ("path/subdirectory", "SecurityError", "§9.2", "shard file 'sub/x.safetensors'",
     _m(lambda m: _move_shard(m, "sub/x.safetensors"))),
    ("path/dot-dot", "SecurityError", "§9.2", "shard file '..'",
     _m(lambda m: _move_shard(m, ".."))),
    ("path/hidden", "SecurityError", "§9.2", "shard file '.hidden.safetensors'",
     _m(lambda m: _move_shard(m, ".hidden.safetensors"))),
    ("path/backslash", "SecurityError", "§9.2", "shard file 'a\\b.safetensors'",
     _m(lambda m: _move_shard(m, "a\\b.safetensors"))),
    ("path/drive-letter", "SecurityError", "§9.2", "shard file 'C:x.safetensors'",
     _m(lambda m: _move_shard(m, "C:x.safetensors"))),
    ("path/bad-characters", "FormatError", "§9.2", "shard file 'a b.safetensors' (space)",
     _m(lambda m: _move_shard(m, "a b.safetensors"))),
    ("symlink/shard-outside", "SecurityError", "§9.3", "a shard symlinked outside the "
     "checkpoint", _outside_shard),
    ("symlink/manifest-outside", "SecurityError", "§9.3", "seif.json symlinked outside the "
     "checkpoint", _outside_manifest),
    ("files/missing-shard", "FormatError", "§9.7", "a listed shard does not exist",
     lambda c: os.remove(c / _expert_shard(c))),
    ("files/truncated-shard", "FormatError", "§9.7", "a shard 100 bytes short", _truncate),
    ("files/extended-shard", "FormatError", "§9.7, §9.6", "64 bytes appended to a shard",
     _extend),
    ("files/manifest-missing", "FormatError", "§2.2", "no seif.json",
     lambda c: os.remove(c / "seif.json")),
    ("files/not-a-directory", "FormatError", "§2.1", "the checkpoint path is a file", None),
    ("json/not-json", "FormatError", "§4, §9.4", "seif.json is not JSON",
     _write("seif.json", b"{ this is not json")),
    ("json/not-utf8", "FormatError", "§9.4", "seif.json is not UTF-8",
     _write("seif.json", b'{"seif_version": "1.0\xff\xfe"}')),
    ("json/not-object", "FormatError", "§4", "seif.json is a JSON array",
     _write("seif.json", b"[]")),
    ("json/duplicate-keys", "FormatError", "§9.4", "a key twice in seif.json",
     _dup_manifest_key),
    ("json/deeply-nested", "FormatError", "§9.1", "nesting depth 100000",
     _write("seif.json", b"[" * 100_000 + b"]" * 100_000)),
    ("json/nan-number", "FormatError", "§4", "routing.scale is NaN (not a JSON number)",
     _nan_scale),
    ("header/duplicate-keys", "FormatError", "§9.4", "a tensor twice in a shard header",
     lambda c: _rewrite_header(c, _expert_shard(c), _dup_header_key)),
    ("header/overlapping-tensors", "FormatError", "§9.6", "two header entries claim the same "
     "bytes", lambda c: _rewrite_header(c, _expert_shard(c), _overlap)),
    ("header/extra-tensor", "FormatError", "§8.2, §9.5", "the header lists a tensor the "
     "manifest does not", lambda c: _rewrite_header(c, _expert_shard(c), _header_extra_tensor)),
    ("header/metadata-not-strings", "FormatError", "§9.4", "__metadata__ holds a number",
     lambda c: _rewrite_header(c, _expert_shard(c), _metadata_not_string)),
    ("header/not-an-object", "FormatError", "§9.4", "the header does not begin with '{'",
     lambda c: _rewrite_header(c, _expert_shard(c), _not_brace)),
    ("header/length-beyond-file", "FormatError", "§9.1", "header length larger than the file",
     _header_len(1 << 20)),
    ("header/absurd-length", "SecurityError", "§9.1", "header length 2^60",
     _header_len(1 << 60)),
    ("agree/shape", "FormatError", "§9.5", "manifest shape differs from the shard header",
     _m(_swap_shape)),
    ("agree/dtype", "FormatError", "§9.5", "manifest dtype differs from the shard header",
     _tensor("model.embed_tokens.weight", dtype="I32")),
    ("agree/offsets", "FormatError", "§9.5", "manifest data_offsets differ from the header",
     _m(lambda m: m["tensors"]["layers.0.router.weight"].update(
         data_offsets=[o + 64 for o in m["tensors"]["layers.0.router.weight"]["data_offsets"]]))),
    ("manifest/huge-shape", "FormatError", "§9.6", "shape [2^31, 2^31] over a small tensor",
     _tensor("model.embed_tokens.weight", shape=[2**31, 2**31])),
    ("manifest/unknown-dtype", "FormatError", "§3.2", "dtype 'F12'",
     _tensor("model.embed_tokens.weight", dtype="F12")),
    ("manifest/bad-checksum-string", "FormatError", "§8.1", "checksum 'sha256:XYZ'",
     _tensor("model.embed_tokens.weight", checksum="sha256:XYZ")),
    ("manifest/missing-canonical-tensor", "FormatError", "§4.1, §9.9", "an expert's up "
     "projection is missing", _m(_drop_tensor)),
    ("manifest/unlisted-shard", "FormatError", "§9.9", "a tensor names a shard not in 'shards'",
     _tensor("model.embed_tokens.weight", shard="nope.safetensors")),
    ("manifest/duplicate-shard", "FormatError", "§4.13", "a shard listed twice", _m(_dup_shard)),
    ("manifest/duplicate-layer-index", "FormatError", "§4.2", "two layers with index 0",
     _m(_dup_layer)),
    ("manifest/top_k-exceeds-experts", "FormatError", "§4.5", "top_k 5 of 4 experts",
     _routing("top_k", 5)),
    ("manifest/topk_group-exceeds-n_group", "FormatError", "§4.5", "topk_group 3 > n_group 2",
     _routing("topk_group", 3, layer=1)),
    ("manifest/feature-not-declared", "FormatError", "§7.2", "group_topk used without "
     "routing.group_topk", _drop_feature("routing.group_topk")),
    ("manifest/metadata-not-strings", "FormatError", "§4.8", "metadata value is a number",
     _m(lambda m: m.update(metadata={"n": 1}))),
    ("manifest/negative-epsilon", "FormatError", "§4.5", "epsilon -1", _routing("epsilon", -1.0)),
    ("alias/without-feature", "FormatError", "§4.15, §7.2", "an alias without the alias "
     "feature", _m(_alias("model.embed_tokens.weight"))),
    ("alias/missing-target", "FormatError", "§4.15", "an alias to a missing tensor",
     _m(lambda m: (_alias("nope")(m), m["required_features"].append("alias")))),
    ("alias/chain", "FormatError", "§4.15", "an alias of an alias", _m(_alias_chain)),
    ("alias/shape-mismatch", "FormatError", "§4.15", "an alias with another shape",
     _m(lambda m: (_alias("model.embed_tokens.weight")(m),
                   m["tensors"]["lm_head.weight"].update(shape=[8, 6]),
                   m["required_features"].append("alias")))),
    ("integrity/tensor-bit-flip", "IntegrityError", "§8.1, §9.8", "one bit of an expert "
     "tensor flipped (deep check)", lambda c: _flip_bit(c, "layers.0.experts.1.gate.weight")),
    ("integrity/shard-checksum", "IntegrityError", "§8.1, §9.8", "a shard's recorded "
     "checksum is wrong (deep check)", _m(_fake_checksum)),
]

def _reshape_output_bias(m):
    """[8] -> [2, 4]: same bytes (so offsets and header agree), the wrong shape for §4.1."""
    m["tensors"]["layers.0.output_bias"]["shape"] = [2, 4]


# SEIF 1.1 output bias, damaged one way each (a _Spec with _output_bias_layers()).
OUTPUT_BIAS_MALFORMED = [
    ("output-bias/feature-not-declared", "FormatError", "§4.2, §7.2", "output_bias used "
     "without layer.output_bias in required_features", _drop_feature("layer.output_bias")),
    ("output-bias/tensor-missing", "FormatError", "§4.1, §9.9", "output_bias declared but "
     "tensor layers.0.output_bias is missing",
     _m(lambda m: m["tensors"].pop("layers.0.output_bias"))),
    ("output-bias/wrong-shape", "FormatError", "§4.1", "layers.0.output_bias has shape "
     "[2, 4] instead of [H] = [8]", _m(_reshape_output_bias)),
    ("output-bias/version-1.0", "FormatError", "§7.1, §7.2", "layer.output_bias in a "
     "manifest that says seif_version 1.0", _m(lambda m: m.update(seif_version="1.0"))),
    ("output-bias/not-boolean", "FormatError", "§4.2", "output_bias is the number 1",
     _m(lambda m: m["layers"][0].update(output_bias=1))),
]

QUANT_MALFORMED = [
    ("quant/feature-not-declared", "FormatError", "§3.3.1, §7.2", "a quantized tensor "
     "without quant.fp8-block declared", _m(_quant_missing_feature)),
    ("quant/missing-companion", "FormatError", "§3.3.1", "the scale tensor is missing",
     _m(_quant_missing_companion)),
    ("quant/unknown-scheme", "FeatureError", "§4.12, §10", "quantization.scheme 'nf4'",
     _m(lambda m: next(t for t in m["tensors"].values() if t.get("quantization"))
        ["quantization"].update(scheme="nf4"))),
]


def format_cases(seed: int) -> list[Case]:
    from .catalogue import case_rng
    out = []
    for name, ref, desc, factory in VALID:
        cid = f"format/valid/{name}"
        spec, post = factory(case_rng(seed, cid))
        spec.materialize(case_rng(seed, cid, 1))
        expected = {f"t/{k}": v for k, v in spec.real_values().items()}
        out.append(Case(cid, "format", desc + " (must load)", ref, "exact", expected=expected,
                        build=_builder(spec, post), tags=("accept",)))
    for name, error, ref, desc, damage in MALFORMED + QUANT_MALFORMED + OUTPUT_BIAS_MALFORMED:
        cid = f"format/malformed/{name}"
        if name.startswith("quant/"):
            spec = _q_spec("fp8-block", case_rng(seed, cid))
        elif name.startswith("output-bias/"):
            spec = _Spec(_output_bias_layers())
        else:
            spec = _Spec()
        spec.materialize(case_rng(seed, cid, 1))
        build = _not_a_dir if damage is None else _builder(spec, damage)
        tags = ["refuse"] + (["deep"] if error == "IntegrityError" else [])
        out.append(Case(cid, "format", f"{desc}: must be refused with {error}", ref, "exact",
                        expect_error=error, build=build, tags=tuple(tags)))
    return out


def _builder(spec: _Spec, post: Callable[[Path], None] | None) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ckpt = spec.save(directory)
        if post is not None:
            post(ckpt)
        return ckpt
    return build
