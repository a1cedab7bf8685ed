"""Hostile inputs beyond the malformed-file classes: resource claims, special files, aliasing
tricks. Each must end in a SeifError quickly, without allocating what the input claims."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest
from test_malformed import _edit_manifest, _expert_shard, _rewrite_header

import seif


@pytest.fixture
def bad(tiny, tmp_path):
    target = tmp_path / "bad.seif"
    shutil.copytree(tiny[0], target)
    return target


def test_huge_manifest_is_refused_before_reading(bad):
    os.truncate(bad / "seif.json", 300 * 1024 * 1024)  # sparse: costs no disk
    start = time.monotonic()
    with pytest.raises(seif.SecurityError, match="limit"):
        seif.open(bad)
    assert time.monotonic() - start < 1.0


def test_manifest_symlinked_outside(bad, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(bad / "seif.json", outside)
    os.symlink(outside, bad / "seif.json")
    with pytest.raises(seif.SecurityError, match="outside"):
        seif.open(bad)


def test_fifo_shard_does_not_hang(bad):
    shard = _expert_shard(bad)
    os.remove(bad / shard)
    os.mkfifo(bad / shard)
    with pytest.raises(seif.SecurityError, match="regular file"):
        seif.validate(bad)


def test_shape_product_overflow_claim_in_header(bad):
    """A header claiming 2^39^8 elements: refused by checked arithmetic, nothing allocated."""
    def claim(text):
        header = json.loads(text)
        name = next(k for k in header if k.endswith(".weight"))
        header[name]["shape"] = [2**39] * 8
        return json.dumps(header)
    _rewrite_header(bad, _expert_shard(bad), claim)
    with pytest.raises(seif.FormatError, match="needs"):
        seif.validate(bad)


def test_dimension_too_large_in_manifest(bad):
    _edit_manifest(bad, lambda m: m["tensors"]["model.embed_tokens.weight"]
                   .update(shape=[2**62]))
    with pytest.raises(seif.FormatError, match="bad dimension"):
        seif.open(bad)


def test_zero_size_entry_inside_another_tensor_is_an_overlap(bad):
    def alias(text):
        header = json.loads(text)
        name = next(k for k in header if k.endswith(".weight"))
        begin, end = header[name]["data_offsets"]
        header["sneaky"] = {"dtype": "F32", "shape": [0],
                            "data_offsets": [begin + 4, begin + 4]}
        return json.dumps(header)
    _rewrite_header(bad, _expert_shard(bad), alias)
    with pytest.raises(seif.FormatError, match="overlaps"):
        seif.validate(bad)


def test_unlisted_tensor_in_shard(bad):
    def extra(text):
        header = json.loads(text)
        header["smuggled"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        return json.dumps(header)
    _rewrite_header(bad, _expert_shard(bad), extra)
    with pytest.raises(seif.FormatError, match="does not list"):
        seif.validate(bad)


def test_alias_chain_is_refused(bad):
    def chain(m):
        t = m["tensors"]["model.embed_tokens.weight"]
        m["required_features"].append("alias")
        m["tensors"]["a1"] = {"dtype": t["dtype"], "shape": t["shape"],
                              "alias_of": "model.embed_tokens.weight"}
        m["tensors"]["a2"] = {"dtype": t["dtype"], "shape": t["shape"], "alias_of": "a1"}
    _edit_manifest(bad, chain)
    with pytest.raises(seif.FormatError, match="alias_of"):
        seif.open(bad)


def test_header_length_pointing_past_end(bad):
    path = bad / _expert_shard(bad)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    with pytest.raises(seif.FormatError, match="header claims"):
        seif.validate(bad)


def test_non_utf8_header(bad):
    path = bad / _expert_shard(bad)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    body = b'{"\xff\xfe": {}}'
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    size = path.stat().st_size
    _edit_manifest(bad, lambda m: next(s for s in m["shards"] if s["file"] == path.name)
                   .update(size=size))
    with pytest.raises(seif.FormatError):
        seif.validate(bad)


def test_fuzz_harness_runs_clean():
    """The long-run fuzzer (make fuzz) on a short budget: it runs, and finds nothing."""
    import subprocess
    import sys
    from pathlib import Path

    harness = Path(__file__).parent / "fuzz" / "fuzz_reader.py"
    result = subprocess.run([sys.executable, str(harness), "--count", "400", "--seed", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "400 inputs" in result.stdout and "0 crashes, 0 hangs" in result.stdout


def test_huge_expert_count_is_refused_fast(bad):
    """Found by the fuzzer: num_experts = 2^63 made listing the expected tensors endless."""
    _edit_manifest(bad, lambda m: m["layers"][0].update(num_experts=2**63))
    start = time.monotonic()
    with pytest.raises(seif.FormatError, match="num_experts"):
        seif.open(bad)
    assert time.monotonic() - start < 1.0


def test_expert_count_beyond_listed_tensors_is_refused_fast(bad):
    _edit_manifest(bad, lambda m: m["layers"][0].update(num_experts=2**20))
    start = time.monotonic()
    with pytest.raises(seif.FormatError, match="need"):
        seif.open(bad)
    assert time.monotonic() - start < 1.0


def test_huge_quantization_block_claim_allocates_nothing_big():
    import ml_dtypes
    import numpy as np

    from seif.manifest import Quantization
    from seif.quant import dequantize
    q = Quantization("fp8-block", [2, 2], "s", block=[2**39, 2**39])
    w = np.ones((2, 2), ml_dtypes.float8_e4m3fn)
    out = dequantize(w, q, {"s": np.full((1, 1), 3.0, np.float32)}.__getitem__)
    assert out.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    qi = Quantization("int-group", [1, 2], "s", group_size=2**39, bits=8)
    scales = {"s": np.ones((1, 1), np.float32)}
    got = dequantize(np.array([[1, 2]], np.int8), qi, scales.__getitem__)
    assert got.tolist() == [[1.0, 2.0]]
