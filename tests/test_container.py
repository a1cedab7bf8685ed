"""Writer and reader: round trips, layout, alignment, atomicity, aliasing, bounded I/O."""

from __future__ import annotations

import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from conftest import make_layers, make_tensors
from safetensors import safe_open

import seif
from seif.layout import TensorSpec
from seif.manifest import FFNSpec, LayerSpec, RoutingSpec


def test_round_trip_exact(tiny):
    path, layers, tensors = tiny
    with seif.open(path) as ckpt:
        assert ckpt.tensor_names() == list(tensors)
        for name, array in tensors.items():
            got = ckpt.tensor(name, verify=True)
            assert got.dtype == array.dtype and np.array_equal(got, array), name
        assert [layer.to_dict() for layer in ckpt.layers] == [x.to_dict() for x in layers]
        e = ckpt.expert(3, 5)
        assert set(e) == {"gate", "up", "down"}
        assert np.array_equal(e["down"], tensors["layers.3.experts.5.down.weight"])
        r = ckpt.router(3)
        assert set(r) == {"weight", "selection_bias"}


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                   ml_dtypes.float8_e5m2, np.int8, np.uint8, np.float64])
def test_dtypes_keep_exact_bits(tmp_path, dtype):
    rng = np.random.default_rng(1)
    array = rng.standard_normal((7, 5)).astype(np.float32).astype(dtype)
    path = seif.save(tmp_path / "d.seif", {"w": array})
    got = seif.open(path).tensor("w")
    assert got.dtype == np.dtype(dtype)
    assert got.tobytes() == array.tobytes()


def test_every_tensor_is_aligned_and_shards_open_with_safetensors(tiny):
    path, _, tensors = tiny
    manifest = json.loads((path / "seif.json").read_text())
    ckpt = seif.open(path)
    for name in tensors:
        shard, offset, _ = ckpt.stored_bytes(name)
        assert offset % manifest["layout"]["alignment"] == 0, name
    for shard in manifest["shards"]:
        with safe_open(str(path / shard["file"]), framework="numpy") as f:
            for name in f.keys():
                if not name.startswith("__seif_pad_"):
                    assert np.array_equal(f.get_tensor(name), tensors[name])


def test_layout_groups_experts_by_index_and_caps_size(tiny):
    path, _, tensors = tiny
    m = seif.open(path).manifest
    cap = m.layout.max_shard_bytes
    for shard in m.shards:
        names = [n for n, t in m.tensors.items() if t.shard == shard.file]
        if shard.role == "experts":
            experts = {int(n.split(".")[3]) for n in names}
            assert min(experts) == shard.experts[0] and max(experts) == shard.experts[1]
            assert all(".experts." in n for n in names)
            assert sum(m.tensors[n].nbytes for n in names) <= cap
        else:
            assert not any(".experts." in n for n in names)
    expert_shards = [s for s in m.shards if s.role == "experts"]
    ranges = sorted(tuple(s.experts) for s in expert_shards)
    assert len(expert_shards) > 1 and ranges[0][0] == 0


def test_one_expert_reads_only_its_bytes(tmp_path):
    """64 experts, one shard: reading expert e of layer l moves that expert's bytes plus the
    shard header, measured both by the reader's counter and by the kernel (/proc rchar)."""
    layer = LayerSpec(0, 64, 64, RoutingSpec("topk", 6, "softmax"), FFNSpec(128, "swiglu"))
    tensors = make_tensors([layer], dtype=ml_dtypes.bfloat16)
    path = seif.save(tmp_path / "e64.seif", tensors, [layer])
    total = sum(s.size for s in seif.open(path).manifest.shards)
    expert_bytes = 3 * 128 * 64 * 2

    def rchar() -> int:
        with open("/proc/self/io") as fh:
            return int(next(line for line in fh if line.startswith("rchar")).split()[1])

    ckpt = seif.open(path)
    before = rchar()
    got = ckpt.expert(0, 37)
    kernel = rchar() - before
    header = ckpt.bytes_read - expert_bytes
    assert np.array_equal(got["up"], tensors["layers.0.experts.37.up.weight"])
    assert 0 < header < 64 * 1024
    assert ckpt.bytes_read == expert_bytes + header
    assert kernel <= ckpt.bytes_read + 4096, (kernel, ckpt.bytes_read)
    assert kernel < total / 20


@pytest.mark.parametrize("jobs,held", [(1, 1), (2, 2), (3, 3)])
def test_writer_memory_is_bounded(tmp_path, jobs, held):
    """The caller's tensor plus at most `max_inflight_bytes` in the workers' hands (here
    `held - 1` tensors; with one job, the writer holds nothing after `write` returns)."""
    n, shape = 24, (512, 1024)  # 2 MiB each, 48 MiB in all
    one = 512 * 1024 * 4
    layer_free = [TensorSpec(f"w{i}", "F32", shape) for i in range(n)]
    tracemalloc.start()
    try:
        with seif.CheckpointWriter(tmp_path / "big.seif", [], max_shard_bytes=8 << 20,
                                   jobs=jobs, max_inflight_bytes=(held - 1) * one) as w:
            w.plan(layer_free)
            for i in range(n):
                w.write(f"w{i}", np.full(shape, i, dtype=np.float32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (held + 1) * one + (1 << 20), peak
    assert seif.validate(tmp_path / "big.seif", deep=True).tensors == n


def test_failed_write_leaves_nothing(tmp_path):
    dst = tmp_path / "x.seif"
    with pytest.raises(RuntimeError):
        with seif.CheckpointWriter(dst, []) as w:
            w.plan([TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,))])
            w.write("a", np.zeros(4, np.float32))
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_incomplete_write_is_refused_and_cleaned(tmp_path):
    dst = tmp_path / "x.seif"
    with pytest.raises(seif.ConversionError, match="never written"):
        with seif.CheckpointWriter(dst, []) as w:
            w.plan([TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,))])
            w.write("a", np.zeros(4, np.float32))
    assert os.listdir(tmp_path) == []


def test_wrong_shape_or_dtype_is_refused(tmp_path):
    with seif.CheckpointWriter(tmp_path / "x.seif", []) as w:
        w.plan([TensorSpec("a", "F32", (4,))])
        with pytest.raises(seif.ConversionError, match="shape"):
            w.write("a", np.zeros(5, np.float32))
        with pytest.raises(seif.ConversionError, match="dtype"):
            w.write("a", np.zeros(4, np.float16))
        w.write("a", np.zeros(4, np.float32))


def test_layer_tensors_must_be_planned(tmp_path):
    layers = make_layers()
    tensors = make_tensors(layers)
    del tensors["layers.3.experts.2.up.weight"]
    with pytest.raises(seif.ConversionError, match="experts.2.up"):
        seif.save(tmp_path / "x.seif", tensors, layers)
    assert os.listdir(tmp_path) == []


def test_existing_destination_needs_overwrite(tiny):
    path, layers, tensors = tiny
    before = (path / "seif.json").read_bytes()
    with pytest.raises(seif.ConversionError, match="exists"):
        seif.save(path, tensors, layers)
    assert (path / "seif.json").read_bytes() == before
    tensors = dict(tensors, **{"model.embed_tokens.weight": np.ones((10, 16), np.float32)})
    seif.save(path, tensors, layers, overwrite=True)
    assert seif.open(path).tensor("model.embed_tokens.weight").sum() == 160
    assert sorted(os.listdir(path.parent)) == ["tiny.seif"]


def test_out_of_order_writes_still_checksum(tmp_path):
    specs = [TensorSpec(f"t{i}", "F32", (3, 5)) for i in range(5)]
    with seif.CheckpointWriter(tmp_path / "o.seif", []) as w:
        w.plan(specs)
        for i in (3, 0, 4, 1, 2):
            w.write(f"t{i}", np.full((3, 5), i, np.float32))
    assert seif.validate(tmp_path / "o.seif", deep=True).checksums_verified == 6
    assert seif.open(tmp_path / "o.seif").tensor("t4")[0, 0] == 4


def test_dedupe_stores_shared_experts_once(tmp_path):
    """Cross-layer expert sharing: layer 1's experts are layer 0's; stored once, read alike."""
    layers = [LayerSpec(i, 4, 8, RoutingSpec("topk", 1), FFNSpec(16, "swiglu")) for i in (0, 1)]
    tensors = make_tensors(layers)
    for name in list(tensors):
        if name.startswith("layers.1.experts."):
            tensors[name] = tensors[name.replace("layers.1.", "layers.0.")]
    path = seif.save(tmp_path / "s.seif", tensors, layers, dedupe=True)
    ckpt = seif.open(path)
    m = ckpt.manifest
    assert "alias" in m.required_features
    aliases = [n for n, t in m.tensors.items() if t.alias_of]
    assert len(aliases) == 12
    assert m.tensors["layers.1.experts.2.up.weight"].alias_of == "layers.0.experts.2.up.weight"
    for name in aliases:
        assert np.array_equal(ckpt.tensor(name, verify=True), tensors[name])
    plain = seif.save(tmp_path / "p.seif", tensors, layers)
    size = lambda p: sum(s.size for s in seif.open(p).manifest.shards)  # noqa: E731
    assert size(path) < size(plain)
    assert seif.validate(path, deep=True)
