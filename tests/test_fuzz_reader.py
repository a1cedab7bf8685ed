"""Structured fuzzing of the reader: any damaged checkpoint loads correctly or raises SeifError.

Bounded here (a few hundred examples) so it runs in the normal suite; the rule it checks is the
spec's §9: no other exception type escapes, whatever the manifest or the shard header says.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
from conftest import make_layers, make_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seif

_BASE: dict = {}


def _base(tmp: Path) -> Path:
    if "path" not in _BASE:
        layers = make_layers(num_experts=4, hidden=8, inter=8)
        _BASE["path"] = seif.save(tmp / "base.seif", make_tensors(layers), layers,
                                  max_shard_bytes=2048)
    return _BASE["path"]


def _exercise(path: Path) -> None:
    """Everything a consumer might do; only SeifError may come out."""
    try:
        seif.validate(path, deep=True)
        with seif.open(path) as ckpt:
            for name in ckpt.tensor_names():
                ckpt.tensor(name, verify=True)
            for layer in ckpt.layers:
                params = ckpt.moe_params(layer.index)
                from seif.moe import moe_forward
                moe_forward(np.ones((2, layer.hidden_size), np.float32), layer, params)
    except seif.SeifError:
        pass


_values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63),
                    st.floats(allow_nan=True), st.text(max_size=12),
                    st.lists(st.integers(-3, 2**41), max_size=4),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_manifest_mutations(tmp_path_factory, data):
    base = _base(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("m")
    target = work / "x.seif"
    shutil.copytree(base, target)
    manifest = json.loads((target / "seif.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(_values)
        except (KeyError, IndexError, TypeError):
            continue
    (target / "seif.json").write_text(json.dumps(manifest))
    _exercise(target)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_shard_byte_mutations(tmp_path_factory, data):
    base = _base(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("s")
    target = work / "x.seif"
    shutil.copytree(base, target)
    shards = sorted(p for p in target.iterdir() if p.suffix == ".safetensors")
    shard = data.draw(st.sampled_from(shards))
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    mode = data.draw(st.sampled_from(["flip_header", "length", "truncate", "append"]))
    if mode == "flip_header":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, 8 + n - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif mode == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif mode == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += bytes(data.draw(st.integers(1, 100)))
    shard.write_bytes(bytes(raw))
    _exercise(target)
