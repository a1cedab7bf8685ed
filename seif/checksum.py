"""Checksums (spec §8.1): one SHA-256 per tensor, and a shard checksum built from those.

A tensor's checksum is the SHA-256 of its bytes, so a partial load can verify exactly what it
read. A shard's checksum is the SHA-256 of the shard header followed by the raw digests of
every data region (every header entry, alignment padding included) in file order. Since the
regions tile the data section, every byte of the file is covered, yet each byte is hashed only
once: the writer hashes tensors (in parallel, in any order) and combines their digests at the
end, instead of running a second whole-file hash beside the per-tensor ones. That second pass
was the single largest cost of conversion after the copy itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache

PREFIX = "sha256:"
CHUNK_BYTES = 16 * 1024 * 1024

Region = tuple[int, int, str]   # [begin, end) relative to the data section, header entry name


def as_checksum(digest: bytes) -> str:
    """The manifest's spelling of a raw 32-byte digest."""
    return PREFIX + digest.hex()


def digest_bytes(view: memoryview | bytes) -> bytes:
    """SHA-256 of a byte buffer, fed in chunks (hashlib releases the GIL for each)."""
    view = memoryview(view).cast("B")
    digest = hashlib.sha256()
    for start in range(0, view.nbytes, CHUNK_BYTES):
        digest.update(view[start:start + CHUNK_BYTES])
    return digest.digest()


@lru_cache(maxsize=256)
def zeros_digest(nbytes: int) -> bytes:
    """Digest of `nbytes` zero bytes (alignment padding is always zeros when written by us)."""
    return digest_bytes(bytes(nbytes))


def digest_file_range(fd: int, offset: int, length: int, buffer: memoryview | None = None,
                      progress: Callable[[int], None] | None = None) -> bytes:
    """SHA-256 of `length` bytes at `offset` of an open file, read with pread into `buffer`
    (anonymous memory, reused: no mapping of the file, so RSS stays small)."""
    buffer = buffer if buffer is not None else memoryview(bytearray(CHUNK_BYTES))
    digest = hashlib.sha256()
    done = 0
    while done < length:
        n = os.preadv(fd, [buffer[:min(buffer.nbytes, length - done)]], offset + done)
        if n <= 0:
            raise EOFError(f"file ends {length - done} bytes early")
        digest.update(buffer[:n])
        done += n
        if progress is not None:
            progress(n)
    return digest.digest()


def region_digests(fd: int, data_start: int, regions: Iterable[Region],
                   progress: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[int, int, str, bytes]]:
    """(begin, end, name, digest) of each data region of an open shard file, in the given
    (file) order, read front to back through one reused buffer. What validation and resume
    both need to recompute a shard checksum."""
    buffer = memoryview(bytearray(CHUNK_BYTES))
    for begin, end, name in regions:
        yield begin, end, name, digest_file_range(fd, data_start + begin, end - begin, buffer,
                                                  progress)


def sorted_regions(spans: Iterable[Region]) -> list[Region]:
    """File order; zero-size entries at the same offset are ordered by name (bytewise)."""
    return sorted(spans, key=lambda r: (r[0], r[1], r[2].encode()))


def shard_checksum(header: bytes, region_digests: Iterable[bytes]) -> str:
    """The shard checksum from its header bytes (the 8-byte length and the JSON, exactly as
    stored) and the digests of its data regions in file order."""
    digest = hashlib.sha256(header)
    for d in region_digests:
        digest.update(d)
    return as_checksum(digest.digest())
