"""Checkpoint validation: structure always, checksums with `deep=True` (spec §8, §9)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .checksum import as_checksum, region_digests, shard_checksum
from .errors import IntegrityError
from .reader import Checkpoint


@dataclass
class ValidationReport:
    path: str
    seif_version: str
    layers: int
    tensors: int
    shards: int
    bytes: int
    deep: bool
    checksums_verified: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def validate(path: str | os.PathLike, deep: bool = False,
             progress: Callable[[int], None] | None = None) -> ValidationReport:
    """Check a checkpoint; return a report or raise the first problem as a SeifError.

    Always: manifest schema and cross-references, versions and required features, every shard
    present, inside the directory, of the recorded size, with a header that agrees with the
    manifest. With `deep`: every shard checksum and every tensor checksum, in one sequential
    pass per shard.
    """
    progress = progress or (lambda n: None)
    with Checkpoint(path) as ckpt:
        verified = 0
        for entry in ckpt.manifest.shards:
            shard = ckpt.shard(entry.file)
            if deep:
                verified += _verify_shard(ckpt, entry.file, entry.checksum, shard, progress)
        m = ckpt.manifest
        return ValidationReport(str(ckpt.path), m.seif_version, len(m.layers), len(m.tensors),
                                len(m.shards), sum(s.size for s in m.shards), deep, verified)


def _verify_shard(ckpt: Checkpoint, file: str, checksum: str, shard,
                  progress: Callable[[int], None]) -> int:
    """Hash each data region of the file once, front to back: tensor regions are checked
    against their own checksums, and all region digests (padding included) combine into the
    shard checksum (spec §8.1)."""
    expected = {n: t.checksum for n, t in ckpt.manifest.tensors.items() if t.shard == file}
    start = shard.header.data_start
    header = os.pread(shard.fd, start, 0)
    digests = []
    try:
        for begin, end, name, digest in region_digests(shard.fd, start, shard.header.regions,
                                                        progress):
            ckpt.bytes_read += end - begin
            if name in expected and as_checksum(digest) != expected[name]:
                raise IntegrityError("tensor checksum mismatch", path=shard.path, field=name)
            digests.append(digest)
    except EOFError:
        raise IntegrityError("unexpected end of file", path=shard.path) from None
    ckpt.bytes_read += start
    if shard_checksum(header, digests) != checksum:
        raise IntegrityError("shard checksum mismatch", path=shard.path)
    return len(expected) + 1
