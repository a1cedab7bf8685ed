"""Reading and writing safetensors shard headers, with the checks safetensors itself skips.

A SEIF shard is a plain safetensors file, so any safetensors reader can open it. SEIF adds two
things on top: tensor data aligned to `alignment` bytes from the start of the file (mmap users
want it; safetensors forbids gaps, so alignment padding is spelled as `__seif_pad_<n>__` U8
entries), and a strict parser: duplicate keys, overlaps, gaps, trailing bytes and absurd sizes
are refused before any tensor byte is read (spec §9).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from . import dtypes
from .checksum import Region, sorted_regions
from .errors import FormatError, SecurityError
from .manifest import numel

MAX_HEADER_BYTES = 100_000_000  # the cap safetensors uses
PAD_PREFIX = "__seif_pad_"
_PAD_RE = re.compile(r"^__seif_pad_\d+__$")


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data section, as in safetensors
    end: int


@dataclass(frozen=True)
class ShardHeader:
    entries: dict[str, HeaderEntry]  # padding entries excluded
    data_start: int                  # absolute file offset of the data section
    metadata: dict[str, str]
    regions: tuple[Region, ...] = ()  # every entry, padding included, in file order (§8.1)


def is_padding(name: str) -> bool:
    return bool(_PAD_RE.match(name))


@dataclass(frozen=True)
class ShardPlan:
    header: bytes                          # the 8-byte length + padded JSON header
    offsets: dict[str, tuple[int, int]]    # name -> relative [begin, end) in the data section
    data_start: int                        # absolute file offset of the data section
    size: int                              # total file size
    regions: tuple[Region, ...] = ()       # every entry, padding included, in file order

    def absolute(self, name: str) -> tuple[int, int]:
        begin, end = self.offsets[name]
        return self.data_start + begin, self.data_start + end


def plan_header(tensors: list[tuple[str, str, tuple[int, ...]]], alignment: int,
                metadata: dict[str, str]) -> ShardPlan:
    """Lay out one shard file; tensors keep the given order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    relative: dict[str, tuple[int, int]] = {}
    regions: list[Region] = []
    cursor = 0
    for n, (name, dtype, shape) in enumerate(tensors):
        gap = (-cursor) % alignment
        if gap:
            header[f"{PAD_PREFIX}{n}__"] = {"dtype": "U8", "shape": [gap],
                                            "data_offsets": [cursor, cursor + gap]}
            regions.append((cursor, cursor + gap, f"{PAD_PREFIX}{n}__"))
            cursor += gap
        size = numel(shape) * dtypes.itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [cursor, cursor + size]}
        relative[name] = (cursor, cursor + size)
        regions.append((cursor, cursor + size, name))
        cursor += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % alignment)
    data_start = 8 + len(text)
    return ShardPlan(struct.pack("<Q", len(text)) + text, relative, data_start,
                     data_start + cursor, tuple(sorted_regions(regions)))


def read_header(fh, file_size: int, path: str) -> ShardHeader:
    """Parse and check a shard header from an open binary file."""
    if file_size < 8:
        raise FormatError(f"file is {file_size} bytes, too short for a safetensors header",
                          path=path)
    fh.seek(0)
    (length,) = struct.unpack("<Q", fh.read(8))
    if length > MAX_HEADER_BYTES:
        raise SecurityError(f"header claims {length} bytes; the limit is {MAX_HEADER_BYTES}",
                            path=path)
    if 8 + length > file_size:
        raise FormatError(f"header claims {length} bytes but the file has {file_size}",
                          path=path)
    raw = fh.read(length)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise FormatError("header does not start with '{'", path=path)
    try:
        parsed = json.loads(raw, object_pairs_hook=_pairs_no_duplicates)
    except FormatError as exc:
        exc.path = path
        exc.args = (exc.one_line(),)
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"header is not valid JSON: {exc}", path=path) from None
    if not isinstance(parsed, dict):
        raise FormatError("header is not a JSON object", path=path)
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("__metadata__ must map strings to strings", path=path)
    data_start = 8 + length
    data_size = file_size - data_start
    spans = []
    entries: dict[str, HeaderEntry] = {}
    for name, info in parsed.items():
        entry = _entry(name, info, path)
        if entry.end > data_size:
            raise FormatError(f"tensor ends at byte {entry.end} of a {data_size}-byte data "
                              f"section (truncated shard?)", path=path, field=name)
        spans.append((entry.begin, entry.end, name))
        if not is_padding(name):
            entries[name] = entry
    spans = sorted_regions(spans)
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else "leaves a gap"
            raise FormatError(f"tensor data {kind} (offset {begin}, expected {cursor})",
                              path=path, field=name)
        cursor = end
    if cursor != data_size:
        raise FormatError(f"{data_size - cursor} bytes after the last tensor (extended or "
                          f"corrupt shard)", path=path)
    return ShardHeader(entries, data_start, metadata, tuple(spans))


def _entry(name: str, info: object, path: str) -> HeaderEntry:
    if not isinstance(info, dict):
        raise FormatError("header entry is not an object", path=path, field=name)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes.DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}", path=path, field=name)
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise FormatError(f"bad shape {str(shape)[:80]}", path=path, field=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**62 for o in offsets)):
        raise FormatError("bad data_offsets", path=path, field=name)
    begin, end = offsets
    nbytes = numel(shape) * dtypes.itemsize(dtype)
    if end < begin or end - begin != nbytes:
        raise FormatError(f"data_offsets span {end - begin} bytes but shape {shape} of {dtype} "
                          f"needs {nbytes}", path=path, field=name)
    return HeaderEntry(dtype, tuple(shape), begin, end)


def _pairs_no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise FormatError("duplicate tensor key in shard header", field=str(key)[:80])
        out[key] = value
    return out
