"""The parallel writer: shard checksums per spec §8.1, computed here independently from the
file bytes; the same bytes whatever `jobs` is; tensors copied from files (`FileRange`) with and
without the kernel's copy_file_range, and with direct I/O (taken, refused, short, off)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

import seif
from seif.convert_seif import convert_seif_to_seif
from seif.layout import TensorSpec
from seif.writer import FileRange


def _spec_shard_checksum(path) -> str:
    """Spec §8.1 from scratch: SHA-256 over the header bytes, then the raw SHA-256 of every
    header entry's bytes (padding included) in order of offset."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n:]
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k.encode())
                   for k, v in header.items())
    h = hashlib.sha256(data[:8 + n])
    for begin, end, _ in spans:
        h.update(hashlib.sha256(body[begin:end]).digest())
    return "sha256:" + h.hexdigest()


def _tensors(rng):
    # odd sizes force alignment padding between tensors
    return {f"t{i}": rng.standard_normal((i + 3, 7 + 2 * i)).astype(np.float32)
            for i in range(12)} | {"empty": np.zeros((0, 4), np.float32)}


def _write(path, tensors, jobs, max_shard=2000):
    specs = [TensorSpec(k, "F32", v.shape) for k, v in tensors.items()]
    with seif.CheckpointWriter(path, [], max_shard_bytes=max_shard, jobs=jobs) as w:
        w.plan(specs)
        for k in reversed(list(tensors)):          # out of plan order on purpose
            w.write(k, tensors[k])
    return path


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_shard_checksum_is_the_spec_definition(tmp_path, jobs):
    tensors = _tensors(np.random.default_rng(0))
    path = _write(tmp_path / "a.seif", tensors, jobs)
    manifest = json.loads((path / "seif.json").read_text())
    assert len(manifest["shards"]) > 2
    for shard in manifest["shards"]:
        assert shard["checksum"] == _spec_shard_checksum(path / shard["file"])
    for name, entry in manifest["tensors"].items():
        assert entry["checksum"] == "sha256:" + hashlib.sha256(tensors[name].tobytes()).hexdigest()
    with seif.open(path) as ckpt:
        for name, array in tensors.items():
            assert np.array_equal(ckpt.tensor(name), array)
    assert seif.validate(path, deep=True)


def test_jobs_do_not_change_a_byte(tmp_path):
    tensors = _tensors(np.random.default_rng(1))
    one = _write(tmp_path / "one.seif", tensors, 1)
    many = _write(tmp_path / "many.seif", tensors, 3)
    assert sorted(os.listdir(one)) == sorted(os.listdir(many))
    for f in os.listdir(one):
        assert (one / f).read_bytes() == (many / f).read_bytes(), f


def test_a_flipped_padding_byte_fails_the_shard_checksum(tmp_path):
    path = _write(tmp_path / "a.seif", _tensors(np.random.default_rng(2)), 2)
    manifest = json.loads((path / "seif.json").read_text())
    shard = path / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    pad = next(v for k, v in header.items() if k.startswith("__seif_pad_"))
    data[8 + n + pad["data_offsets"][0]] ^= 1
    shard.write_bytes(bytes(data))
    seif.validate(path)                                    # structure is still fine
    with pytest.raises(seif.IntegrityError, match="shard checksum"):
        seif.validate(path, deep=True)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_file_ranges_are_copied_exactly(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:
        def refuse(*args, **kwargs):
            raise OSError(38, "copy_file_range refused (test)")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    rng = np.random.default_rng(3)
    tensors = _tensors(rng)
    blob = tmp_path / "source.bin"
    offsets, parts, at = {}, [], 5                 # unaligned offsets in the source
    parts.append(b"\x01" * at)
    for name, array in tensors.items():
        offsets[name] = at
        parts.append(array.tobytes())
        at += array.nbytes
    blob.write_bytes(b"".join(parts))
    specs = [TensorSpec(k, "F32", v.shape) for k, v in tensors.items()]
    with seif.CheckpointWriter(tmp_path / "r.seif", [], max_shard_bytes=2000, jobs=2) as w:
        w.plan(specs)
        for name in tensors:
            w.write(name, FileRange(blob, offsets[name]))
    reference = _write(tmp_path / "m.seif", tensors, 1)
    for f in os.listdir(reference):
        assert (reference / f).read_bytes() == (tmp_path / "r.seif" / f).read_bytes(), f


def test_a_file_range_past_the_end_is_refused_and_nothing_is_left(tmp_path):
    blob = tmp_path / "short.bin"
    blob.write_bytes(bytes(100))
    with pytest.raises(seif.ConversionError, match="ends before"):
        with seif.CheckpointWriter(tmp_path / "x.seif", [], jobs=2) as w:
            w.plan([TensorSpec("a", "F32", (64,))])
            w.write("a", FileRange(blob, 0))
    assert not (tmp_path / "x.seif").exists()
    assert not (tmp_path / "x.seif.partial").exists()


def test_a_worker_failure_aborts_cleanly(tmp_path, monkeypatch):
    calls = []

    def failing_pwrite(fd, data, offset, _real=os.pwrite):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(28, "No space left on device (test)")
        return _real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(OSError, match="No space"):
        _write(tmp_path / "full.seif", _tensors(np.random.default_rng(4)), 2)
    assert not (tmp_path / "full.seif").exists()
    assert not (tmp_path / "full.seif.partial").exists()


def test_seif_to_seif_copies_files_and_refuses_a_corrupt_source(tiny, tmp_path):
    src = tiny[0]
    out = tmp_path / "copy.seif"
    convert_seif_to_seif(src, out, jobs=2, max_shard_bytes=1 << 14)
    with seif.open(src) as a, seif.open(out) as b:
        assert a.tensor_names() == b.tensor_names()
        for name in a.tensor_names():
            assert a.info(name).checksum == b.info(name).checksum
            assert np.array_equal(a.tensor(name), b.tensor(name))
    # one flipped bit inside a tensor of the source: the copy stops, nothing is left behind
    bad = tmp_path / "bad.seif"
    shutil.copytree(src, bad)
    manifest = json.loads((bad / "seif.json").read_text())
    name, entry = next((n, t) for n, t in manifest["tensors"].items() if "experts" in n
                       and t.get("shard"))
    shard = bad / entry["shard"]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + entry["data_offsets"][0]] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(seif.IntegrityError, match="do not match their checksum"):
        convert_seif_to_seif(bad, tmp_path / "from-bad.seif", keep_partial=False)
    assert not (tmp_path / "from-bad.seif").exists()
    assert not (tmp_path / "from-bad.seif.partial").exists()


def _direct_fd(fd: int) -> bool:
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def big_source(tmp_path):
    """Tensors whose sizes straddle the page and chunk sizes, at unaligned source offsets,
    so that direct-I/O copies have heads, tails, whole-page tensors and sub-page tensors."""
    rng = np.random.default_rng(5)
    sizes = [1, 1023, 1024, 1025, 3 * 1024 + 7, 5000, 12 * 1024, 20_000, 3]  # float32 elements
    tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    blob = tmp_path / "source.bin"
    offsets, parts, at = {}, [b"\x07" * 13], 13
    for name, array in tensors.items():
        offsets[name] = at
        parts.append(array.tobytes())
        at += array.nbytes
    blob.write_bytes(b"".join(parts))
    return tensors, blob, offsets


def _copy_ranges(path, tensors, blob, offsets, jobs=3, alignment=64):
    specs = [TensorSpec(k, "F32", v.shape) for k, v in tensors.items()]
    with seif.CheckpointWriter(path, [], max_shard_bytes=90_000, jobs=jobs,
                               alignment=alignment) as w:
        w.plan(specs)
        for name in reversed(list(tensors)):
            w.write(name, FileRange(blob, offsets[name]))
    return path


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")
@pytest.mark.parametrize("case", ["direct", "no-deferral", "refused", "short", "buffered"])
def test_direct_io_copies_are_byte_exact(tmp_path, monkeypatch, big_source, case):
    """Direct-I/O copies (page-aligned interior O_DIRECT, partial pages buffered) give the
    bytes and the §8.1 checksums of plain buffered writes, whatever happens to the direct
    writes: refused (EINVAL, as on a file system without O_DIRECT), short, or not tried."""
    import seif.writer as writer

    tensors, blob, offsets = big_source
    monkeypatch.setattr(writer, "COPY_CHUNK_BYTES", 3 * writer.DIRECT_ALIGN)  # several chunks
    real_pwrite, direct_calls = os.pwrite, []

    def pwrite(fd, data, offset):
        if _direct_fd(fd):
            direct_calls.append(offset)
            assert offset % writer.DIRECT_ALIGN == 0 and len(data) % writer.DIRECT_ALIGN == 0
            if case == "refused":
                raise OSError(22, "Invalid argument (test)")
            if case == "short":
                return 0
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    if case == "no-deferral":
        monkeypatch.setattr(writer, "DEFERRED_BYTES", 0)
    if case == "buffered":
        monkeypatch.setattr(writer, "_DIRECT", False)
    out = _copy_ranges(tmp_path / "d.seif", tensors, blob, offsets)
    monkeypatch.setattr(writer, "_DIRECT", False)
    reference = _write(tmp_path / "m.seif", tensors, 1, max_shard=90_000)
    manifest = json.loads((out / "seif.json").read_text())
    assert len(manifest["shards"]) > 1
    for f in os.listdir(reference):
        assert (reference / f).read_bytes() == (out / f).read_bytes(), f
    for shard in manifest["shards"]:
        assert shard["checksum"] == _spec_shard_checksum(out / shard["file"])
    for name, entry in manifest["tensors"].items():
        assert entry["checksum"] == "sha256:" + hashlib.sha256(tensors[name].tobytes()).hexdigest()
    probe = writer._open_direct(tmp_path / "m.seif" / manifest["shards"][0]["file"])
    if case == "buffered":
        assert direct_calls == []
    elif probe >= 0:                       # the file system takes O_DIRECT: it was used
        os.close(probe)
        assert direct_calls
    if case == "refused" and probe >= 0:   # the first refusal turns direct I/O off for good
        assert len(direct_calls) <= 3      # (at most one per worker already under way)


@pytest.mark.parametrize("chunk", ["100", "abc", "0", "6000"])
def test_bad_copy_chunk_is_refused_and_leaves_nothing(tmp_path, monkeypatch, big_source, chunk):
    """SEIF_COPY_CHUNK must be a positive multiple of the direct-I/O alignment: a smaller or
    unaligned read buffer could never carry an aligned direct write."""
    import seif.writer as writer

    tensors, blob, offsets = big_source
    monkeypatch.setattr(writer, "COPY_CHUNK_BYTES", chunk)
    with pytest.raises(seif.ConversionError, match="SEIF_COPY_CHUNK must be a positive multiple"):
        _copy_ranges(tmp_path / "d.seif", tensors, blob, offsets)
    assert not (tmp_path / "d.seif").exists() and not (tmp_path / "d.seif.partial").exists()
