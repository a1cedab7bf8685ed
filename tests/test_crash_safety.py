"""Crash safety, resume and locking of conversions (spec §8.4).

A conversion is killed with SIGKILL at many points; after each kill the destination either does
not exist or is complete and passes `validate --deep`. `--resume` then finishes the job reusing
the shards already finished (same inode, untouched), and the result is byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import seif
from seif.layout import TensorSpec
from seif.manifest import FFNSpec, LayerSpec, RoutingSpec
from seif.staging import JOURNAL

SHARD_CAP = "1500000"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "seif.cli", *args]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """~25 MB, 32 experts x 2 layers: about 20 shards at the cap used below."""
    layers = [LayerSpec(l, 32, 128, RoutingSpec("topk", 2, normalize="sum"),
                        FFNSpec(256, "swiglu")) for l in (0, 1)]
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32)
               for layer in layers for n, s in layer.expected_tensors().items()}
    return seif.save(tmp_path_factory.mktemp("src") / "src.seif", tensors, layers)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _journalled(partial: Path) -> list[str]:
    files = []
    if (partial / JOURNAL).exists():
        for line in (partial / JOURNAL).read_text().splitlines():
            try:
                files.append(json.loads(line)["file"])
            except ValueError:
                pass  # a torn last line
    return files


def _kill_after_shards(source: Path, dst: Path, shards: int, *extra: str) -> None:
    """Start a conversion and SIGKILL it once `shards` shards are journalled."""
    partial = dst.parent / f"{dst.name}.partial"
    proc = subprocess.Popen(_cli("convert", str(source), str(dst), "--max-shard-size", SHARD_CAP,
                                 *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_journalled(partial)) < shards:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_random_points_then_resume(source, tmp_path):
    reference = tmp_path / "reference.seif"
    start = time.monotonic()
    subprocess.run(_cli("convert", str(source), str(reference), "--max-shard-size", SHARD_CAP),
                   check=True, capture_output=True)
    duration = time.monotonic() - start
    assert len(seif.open(reference).manifest.shards) >= 15
    # The same command up to its first check (the destination exists): interpreter start,
    # imports, reading the source. Kills are spread over the rest, where the writing happens
    # (a fraction of the run: random points over the whole run often all land before it).
    start = time.monotonic()
    refused = subprocess.run(_cli("convert", str(source), str(reference), "--max-shard-size",
                                  SHARD_CAP), capture_output=True)
    startup = time.monotonic() - start
    assert refused.returncode == seif.ConversionError.exit_code

    dst = tmp_path / "dst.seif"
    partial = tmp_path / "dst.seif.partial"
    rng = random.Random(1234)
    kills = completed = 0
    progress_seen = 0
    # Runs until 12 kills landed mid-conversion (at most 60): with --resume each run has
    # less left to write, so on a fast machine many kills come after the finish.
    while kills - completed < 12 and kills < 60:
        proc = subprocess.Popen(_cli("convert", str(source), str(dst), "--resume",
                                     "--max-shard-size", SHARD_CAP),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.8 * startup, max(duration, startup) * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if dst.exists():  # finished before the kill: must be complete and correct
            assert seif.validate(dst, deep=True)
            assert _tree(dst) == _tree(reference)
            completed += 1
            shutil.rmtree(dst)
        else:
            assert not (tmp_path / "dst.seif" / "seif.json").exists()
            progress_seen = max(progress_seen, len(_journalled(partial)))
    mid = kills - completed
    assert mid >= 10, f"only {mid} of {kills} kills landed mid-conversion"
    assert progress_seen > 0

    # One more kill after a known amount of progress, then finish with --resume: journalled
    # shards are verified and kept (same inode and mtime), not rewritten.
    _kill_after_shards(source, dst, 5, "--resume")
    assert not dst.exists()
    before = {name: ((partial / name).stat().st_ino, (partial / name).stat().st_mtime_ns)
              for name in _journalled(partial)}
    assert len(before) >= 5
    result = subprocess.run(_cli("convert", str(source), str(dst), "--resume",
                                 "--max-shard-size", SHARD_CAP), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not partial.exists()
    assert _tree(dst) == _tree(reference)
    assert seif.validate(dst, deep=True)
    for name, identity in before.items():
        st = (dst / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == identity, f"{name} was rewritten"


def test_resume_rewrites_a_damaged_journalled_shard(source, tmp_path):
    dst = tmp_path / "d.seif"
    partial = tmp_path / "d.seif.partial"
    _kill_after_shards(source, dst, 3)
    assert not dst.exists()
    first = _journalled(partial)[0]
    with open(partial / first, "r+b") as fh:  # flip one byte of a finished shard
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    # Without --resume the stale staging directory is refused, not silently discarded.
    refused = subprocess.run(_cli("convert", str(source), str(dst)), capture_output=True, text=True)
    assert refused.returncode == seif.ConversionError.exit_code
    assert "--resume" in refused.stderr
    subprocess.run(_cli("convert", str(source), str(dst), "--resume", "--max-shard-size",
                        SHARD_CAP), check=True, capture_output=True)
    assert seif.validate(dst, deep=True)


def test_second_writer_to_same_destination_is_refused(tmp_path, source):
    dst = tmp_path / "x.seif"
    first = seif.CheckpointWriter(dst, [])
    first.plan([TensorSpec("a", "F32", (4,))])  # holds the lock
    try:
        second = seif.CheckpointWriter(dst, [], resume=True)
        with pytest.raises(seif.ConversionError, match="another conversion"):
            second.plan([TensorSpec("a", "F32", (4,))])
        other = subprocess.run(_cli("convert", str(source), str(dst), "--resume"),
                               capture_output=True, text=True)
        assert other.returncode == seif.ConversionError.exit_code
        assert "another conversion" in other.stderr
        first.write("a", np.arange(4, dtype=np.float32))
        first.commit()
    finally:
        first.staging.release()
    assert seif.open(dst).tensor("a").tolist() == [0, 1, 2, 3]
    assert not (tmp_path / "x.seif.partial").exists()


def test_exception_keeps_partial_only_when_asked(tmp_path):
    specs = [TensorSpec(f"layers.0.experts.{e}.up.weight", "F32", (64, 64)) for e in range(4)]
    for keep in (False, True):
        dst = tmp_path / f"k{keep}.seif"
        with pytest.raises(RuntimeError):
            with seif.CheckpointWriter(dst, [], max_shard_bytes=20000, keep_partial=keep) as w:
                w.plan(specs)
                w.write(specs[0].name, np.zeros((64, 64), np.float32))
                w.write(specs[1].name, np.zeros((64, 64), np.float32))
                raise RuntimeError("source went away")
        assert (tmp_path / f"k{keep}.seif.partial").exists() == keep
        assert not dst.exists()
    with seif.CheckpointWriter(tmp_path / "kTrue.seif", [], max_shard_bytes=20000,
                               resume=True) as w:
        w.plan(specs)
        assert [w.needs(s.name) for s in specs] == [False, False, True, True]
        for s in specs[2:]:
            w.write(s.name, np.ones((64, 64), np.float32))
    ckpt = seif.open(tmp_path / "kTrue.seif")
    assert ckpt.tensor(specs[0].name).sum() == 0 and ckpt.tensor(specs[3].name).sum() == 4096
    assert seif.validate(tmp_path / "kTrue.seif", deep=True)
