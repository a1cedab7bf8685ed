"""Every class of malformed checkpoint gives its own SeifError, and the CLI its exit code.

Each test damages a copy of a valid checkpoint, and checks that (a) `seif.validate` (and, where
relevant, the lazy reader) raises the specific error class, (b) `seif validate` exits with that
class's code and a one-line message, and (c) the valid checkpoint beside it is untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import seif
from seif.cli import main


def _tree_digest(path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode())
        h.update((path / name).read_bytes())
    return h.hexdigest()


@pytest.fixture
def pair(tiny, tmp_path):
    """(valid, damaged copy, digest of valid) — the damaged one is edited by the test."""
    valid = tiny[0]
    bad = tmp_path / "bad.seif"
    shutil.copytree(valid, bad)
    return valid, bad, _tree_digest(valid)


def _edit_manifest(path, fn):
    m = json.loads((path / "seif.json").read_text())
    fn(m)
    (path / "seif.json").write_text(json.dumps(m))
    return m


def _expert_shard(path) -> str:
    m = json.loads((path / "seif.json").read_text())
    return next(s["file"] for s in m["shards"] if s["role"] == "experts")


def _check(pair, error, match, deep=False):
    valid, bad, digest = pair
    with pytest.raises(error, match=match):
        seif.validate(bad, deep=deep)
    result = CliRunner().invoke(main, ["validate", str(bad)] + (["--deep"] if deep else []))
    assert result.exit_code == error.exit_code, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert _tree_digest(valid) == digest
    assert seif.validate(valid, deep=True)


def test_unknown_major_version(pair):
    _edit_manifest(pair[1], lambda m: m.update(seif_version="2.0"))
    _check(pair, seif.VersionError, r"SEIF 2\.0.*SEIF 1\.1")


@pytest.fixture
def bias_pair(tmp_path):
    """(valid, damaged copy, digest) of a SEIF 1.1 checkpoint whose layer 0 has an output bias
    (JetMoE's block bias, spec §5.16)."""
    from conftest import make_layers, make_tensors
    layers = make_layers()
    layers[0].output_bias = True
    tensors = make_tensors(layers)
    tensors["layers.0.output_bias"] = np.linspace(-1, 1, layers[0].hidden_size,
                                                  dtype=np.float32)
    valid = seif.save(tmp_path / "bias.seif", tensors, layers)
    bad = tmp_path / "bad.seif"
    shutil.copytree(valid, bad)
    return valid, bad, _tree_digest(valid)


def test_output_bias_checkpoint_loads_as_1_1(bias_pair):
    m = json.loads((bias_pair[0] / "seif.json").read_text())
    assert m["seif_version"] == "1.1" and "layer.output_bias" in m["required_features"]
    assert seif.validate(bias_pair[0], deep=True)


def test_output_bias_shows_in_inspect(bias_pair):
    from seif.inspect import summarize
    with seif.open(bias_pair[0]) as ckpt:
        s = summarize(ckpt)
    assert s["seif_version"] == "1.1" and "layer.output_bias" in s["required_features"]
    assert [x["output_bias"] for x in s["layers"]] == [True, False]
    from seif.layout import classify
    with seif.open(bias_pair[0]) as ckpt:      # the bias is the layer's, not a dense tensor
        dense = [n for n in ckpt.tensor_names() if classify(n)[0] == "dense"]
    assert "layers.0.output_bias" in dense and s["dense"]["tensors"] == len(dense) - 1
    result = CliRunner().invoke(main, ["inspect", str(bias_pair[0])])
    assert result.exit_code == 0 and "out bias" in result.output


@pytest.mark.parametrize("damage, match", [
    (lambda m: m["required_features"].remove("layer.output_bias"), "layer.output_bias"),
    (lambda m: m["tensors"].pop("layers.0.output_bias"), "output_bias"),
    (lambda m: m["tensors"]["layers.0.output_bias"].update(shape=[4, 4]), "output_bias"),
    (lambda m: m.update(seif_version="1.0"), "1.1 feature"),
], ids=["feature-not-declared", "tensor-missing", "wrong-shape", "version-1.0"])
def test_output_bias_damage_is_refused(bias_pair, damage, match):
    _edit_manifest(bias_pair[1], damage)
    _check(bias_pair, seif.FormatError, match)


def test_newer_minor_with_unknown_optional_fields_loads(pair):
    def newer(m):
        m["seif_version"] = "1.7"
        m["some_future_field"] = {"x": 1}
        m["optional_features"] = ["future.thing"]
        m["layers"][0]["routing"]["future_knob"] = 3
    _edit_manifest(pair[1], newer)
    assert seif.validate(pair[1], deep=True).seif_version == "1.7"


def test_unknown_required_feature(pair):
    _edit_manifest(pair[1], lambda m: m["required_features"].append("routing.hash"))
    _check(pair, seif.FeatureError, "routing.hash")


def test_unknown_routing_kind(pair):
    _edit_manifest(pair[1], lambda m: m["layers"][0]["routing"].update(kind="hash"))
    _check(pair, seif.FeatureError, "hash")


@pytest.mark.parametrize("file", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors",
                                  "..", ".hidden.safetensors"])
def test_shard_path_escapes(pair, file):
    def move(m):
        old = m["shards"][0]["file"]
        m["shards"][0]["file"] = file
        for t in m["tensors"].values():
            if t.get("shard") == old:
                t["shard"] = file
    _edit_manifest(pair[1], move)
    _check(pair, seif.SecurityError, "leaves the checkpoint")


def test_symlinked_shard_outside(pair, tmp_path):
    bad = pair[1]
    shard = _expert_shard(bad)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(bad / shard, outside)
    os.symlink(outside, bad / shard)
    _check(pair, seif.SecurityError, "outside the checkpoint")


def test_symlink_inside_is_fine(pair):
    bad = pair[1]
    shard = _expert_shard(bad)
    os.rename(bad / shard, bad / "real.bin")
    os.symlink("real.bin", bad / shard)
    assert seif.validate(bad, deep=True)


def test_missing_shard(pair):
    os.remove(pair[1] / _expert_shard(pair[1]))
    _check(pair, seif.FormatError, "missing")


def test_truncated_shard(pair):
    path = pair[1] / _expert_shard(pair[1])
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _check(pair, seif.FormatError, "truncated")


def test_extended_shard(pair):
    with open(pair[1] / _expert_shard(pair[1]), "ab") as fh:
        fh.write(b"\0" * 64)
    _check(pair, seif.FormatError, "extended")


def _rewrite_header(checkpoint, file, fn):
    """Replace a shard's JSON header (data offsets are relative, so the data stays valid) and
    record the new file size in the manifest, so only the header edit is wrong."""
    path = checkpoint / file
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = fn(data[8:8 + n].decode()).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    size = path.stat().st_size
    _edit_manifest(checkpoint, lambda m: next(s for s in m["shards"] if s["file"] == file)
                   .update(size=size))


def test_duplicate_tensor_names_in_shard_header(pair):
    def dup(text):
        header = json.loads(text)
        name = next(k for k in header if k.endswith("down.weight"))
        entry = json.dumps(header[name], separators=(",", ":"))
        return text.rstrip()[:-1] + f',"{name}":{entry}' + "}"  # the same key twice
    _rewrite_header(pair[1], _expert_shard(pair[1]), dup)
    _check(pair, seif.FormatError, "duplicate")


def test_overlapping_tensors_in_shard_header(pair):
    def overlap(text):
        header = json.loads(text)
        names = [k for k in header if k.endswith(".weight")]
        a, b = header[names[0]], header[names[1]]
        b["data_offsets"] = list(a["data_offsets"])  # b now claims a's bytes
        return json.dumps(header)
    _rewrite_header(pair[1], _expert_shard(pair[1]), overlap)
    _check(pair, seif.FormatError, "overlaps|gap|offsets")


def test_duplicate_keys_in_manifest(pair):
    path = pair[1] / "seif.json"
    text = path.read_text()
    path.write_text(text.replace('"seif_version": "1.0"', '"seif_version": "1.0", '
                                 '"seif_version": "1.0"', 1))
    _check(pair, seif.FormatError, "duplicate JSON key")


def test_manifest_shape_disagrees_with_shard(pair):
    def lie(m):
        t = m["tensors"]["model.embed_tokens.weight"]
        t["shape"] = [t["shape"][1], t["shape"][0]]
    _edit_manifest(pair[1], lie)
    _check(pair, seif.FormatError, "shard header says")


def test_manifest_dtype_disagrees_with_shard(pair):
    def lie(m):
        t = m["tensors"]["model.embed_tokens.weight"]
        t["dtype"] = "I32"
    _edit_manifest(pair[1], lie)
    _check(pair, seif.FormatError, "shard header says")


def test_checksum_mismatch_needs_deep(pair):
    bad = pair[1]
    m = json.loads((bad / "seif.json").read_text())
    entry = m["tensors"]["layers.0.experts.1.gate.weight"]
    path = bad / entry["shard"]
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + entry["data_offsets"][0] + 3] ^= 0x10  # one bit inside the tensor
    path.write_bytes(bytes(data))
    assert seif.validate(bad)  # structure is fine
    _check(pair, seif.IntegrityError, "checksum", deep=True)
    ckpt = seif.open(bad)
    ckpt.tensor("layers.0.experts.1.gate.weight")  # unverified read succeeds
    with pytest.raises(seif.IntegrityError):
        ckpt.tensor("layers.0.experts.1.gate.weight", verify=True)


def test_manifest_not_json(pair):
    (pair[1] / "seif.json").write_text("{ this is not json")
    _check(pair, seif.FormatError, "not valid JSON")


def test_manifest_missing(pair):
    os.remove(pair[1] / "seif.json")
    _check(pair, seif.FormatError, "missing")


def test_manifest_deeply_nested(pair):
    (pair[1] / "seif.json").write_text("[" * 100_000 + "]" * 100_000)
    _check(pair, seif.FormatError, "nested")


def test_huge_shape_claim(pair):
    def huge(m):
        m["tensors"]["model.embed_tokens.weight"]["shape"] = [2**31, 2**31]
    _edit_manifest(pair[1], huge)
    _check(pair, seif.FormatError, "data_offsets span")


def test_absurd_header_length(pair):
    path = pair[1] / _expert_shard(pair[1])
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    _check(pair, seif.SecurityError, "header claims")


def test_alias_without_feature(pair):
    def alias(m):
        t = m["tensors"]["model.embed_tokens.weight"]
        m["tensors"]["lm_head.weight"] = {"dtype": t["dtype"], "shape": t["shape"],
                                          "alias_of": "model.embed_tokens.weight"}
    _edit_manifest(pair[1], alias)
    _check(pair, seif.FormatError, "alias")


def test_not_a_directory(tmp_path):
    f = tmp_path / "file.seif"
    f.write_bytes(b"x")
    with pytest.raises(seif.FormatError, match="directory"):
        seif.open(f)
    with pytest.raises(seif.FormatError, match="no such"):
        seif.open(tmp_path / "nope.seif")


def test_debug_flag_shows_traceback(pair):
    (pair[1] / "seif.json").write_text("nope")
    result = CliRunner().invoke(main, ["--debug", "validate", str(pair[1])])
    assert isinstance(result.exception, seif.FormatError)


def test_reading_unknown_tensor_is_a_keyerror(tiny):
    with pytest.raises(KeyError, match="no tensor"):
        seif.open(tiny[0]).tensor("nope")
    assert np.isfinite(seif.open(tiny[0]).tensor("model.embed_tokens.weight")).all()
