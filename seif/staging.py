"""The staging directory a checkpoint is built in: `DST.partial/`, its lock and its journal.

A conversion writes into `DST.partial/` and renames it to `DST` only when complete (spec §8.4),
so a killed conversion never leaves a `DST` that looks complete. Three things make that safe
and resumable:

- a lock (`flock` on the staging directory itself): two conversions to the same destination
  cannot interleave; the second fails at once with a clear message;
- a journal (`.seif-journal.jsonl`): one line per finished shard, appended only after the shard
  is fsynced, giving its size, checksum, header digest and per-tensor checksums;
- resume: a later run with the same plan re-hashes each journalled shard, and reuses it only if
  header, size and checksum all match; anything else is written again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .checksum import region_digests, shard_checksum
from .errors import ConversionError

JOURNAL = ".seif-journal.jsonl"


@dataclass
class JournalEntry:
    file: str
    size: int
    checksum: str
    header_sha256: str
    tensors: dict[str, str]


def planned_shard_checksum(path: Path, header: bytes, regions) -> str | None:
    """The checksum (spec §8.1) of a shard file written to the plan (`header`, `regions`),
    or None if its header is not that plan's."""
    with open(path, "rb") as fh:
        if fh.read(len(header)) != header:
            return None
        return shard_checksum(header, (
            digest for *_, digest in region_digests(fh.fileno(), len(header), regions)))


class StagingDir:
    def __init__(self, destination: Path, resume: bool):
        self.path = destination.parent / f"{destination.name}.partial"
        self.resume = resume
        self.fd: int | None = None
        self.recorded = 0

    def acquire(self) -> dict[str, JournalEntry]:
        """Create (or, with resume, reopen) and lock the staging directory; return the
        journal entries of shards a previous run finished."""
        existed = self.path.exists()
        if not existed:
            self.path.mkdir(parents=True)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise ConversionError("another conversion is writing this destination right now "
                                  "(its staging directory is locked)",
                                  path=str(self.path)) from None
        if not existed:
            return {}
        entries = self._read_journal()
        if not self.resume:
            self.release()
            raise ConversionError(f"an interrupted conversion left this staging directory "
                                  f"({len(entries)} shards finished): rerun with --resume to "
                                  f"continue it, or delete it to start over", path=str(self.path))
        return entries

    def _read_journal(self) -> dict[str, JournalEntry]:
        entries: dict[str, JournalEntry] = {}
        try:
            lines = (self.path / JOURNAL).read_text().splitlines()
        except FileNotFoundError:
            return entries
        for line in lines:
            try:  # a torn last line from a crash is simply not a finished shard
                entry = JournalEntry(**json.loads(line))
            except (ValueError, TypeError):
                continue
            entries[entry.file] = entry
        return entries

    def reuse(self, entries: dict[str, JournalEntry], planned: dict[str, tuple[bytes, int, tuple]]
              ) -> dict[str, JournalEntry]:
        """The journalled shards that still match the plan byte for byte (verified by
        re-hashing); the journal is rewritten to hold only those."""
        kept: dict[str, JournalEntry] = {}
        for file, entry in entries.items():
            plan = planned.get(file)
            path = self.path / file
            if plan is None or not path.is_file():
                continue
            header, size, regions = plan
            if entry.header_sha256 != hashlib.sha256(header).hexdigest() or entry.size != size \
                    or path.stat().st_size != size:
                continue
            try:
                if planned_shard_checksum(path, header, regions) != entry.checksum:
                    continue
            except (OSError, EOFError):
                continue
            kept[file] = entry
        for child in self.path.iterdir():
            if child.name not in kept and child.name != JOURNAL:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self._write_journal(kept.values())
        return kept

    def _write_journal(self, entries) -> None:
        tmp = self.path / (JOURNAL + ".tmp")
        with open(tmp, "w") as fh:
            for entry in entries:
                fh.write(json.dumps(entry.__dict__) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / JOURNAL)

    def record(self, entry: JournalEntry) -> None:
        """Append a finished (already fsynced) shard to the journal, durably."""
        with open(self.path / JOURNAL, "a") as fh:
            fh.write(json.dumps(entry.__dict__) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.recorded += 1

    def finish(self) -> None:
        """Drop the journal: what remains is exactly the checkpoint."""
        for name in (JOURNAL, JOURNAL + ".tmp"):
            try:
                os.unlink(self.path / name)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()
