"""Checkpoint validation: structure always, checksums with `deep=True` (spec §8, §9)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import IntegrityError
from .reader import Checkpoint

_CHUNK = 16 * 1024 * 1024


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
    """Hash the whole file and each tensor in it, reading the file once, front to back."""
    tensors = sorted(((t.data_offsets[0], t.data_offsets[1], n, t.checksum)
                      for n, t in ckpt.manifest.tensors.items() if t.shard == file))
    file_hash = hashlib.sha256()
    pos = 0

    def feed(upto: int, tensor_hash=None) -> None:
        nonlocal pos
        while pos < upto:
            chunk = os.pread(shard.fd, min(_CHUNK, upto - pos), pos)
            if not chunk:
                raise IntegrityError("unexpected end of file", path=shard.path)
            file_hash.update(chunk)
            if tensor_hash is not None:
                tensor_hash.update(chunk)
            pos += len(chunk)
            ckpt.bytes_read += len(chunk)
            progress(len(chunk))

    start = shard.header.data_start
    for begin, end, name, expected in tensors:
        feed(start + begin)
        digest = hashlib.sha256()
        feed(start + end, digest)
        if "sha256:" + digest.hexdigest() != expected:
            raise IntegrityError("tensor checksum mismatch", path=shard.path, field=name)
    feed(os.fstat(shard.fd).st_size)
    if "sha256:" + file_hash.hexdigest() != checksum:
        raise IntegrityError("shard checksum mismatch", path=shard.path)
    return len(tensors) + 1
