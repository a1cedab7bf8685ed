"""The streaming, checksumming, atomic checkpoint writer (spec §8).

Plan first, stream later: the writer is told every tensor's name, dtype and shape up front (a
converter knows them from the source headers), lays out all shard headers, then receives tensor
bytes one at a time and writes them straight to their final offsets. Nothing but the tensor in
flight and a bounded chunk is ever held, and each byte is hashed as it is written (per tensor and
per shard). Everything goes into `DST.partial/` (see `seif.staging`: lock, journal, resume),
which is renamed to `DST` only once every file is complete and fsynced: a crash never leaves a
`DST` that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dtypes
from .checksum import CHUNK_BYTES, as_checksum, digest_bytes, shard_checksum, zeros_digest
from .errors import ConversionError, IntegrityError
from .layout import PlannedShard, TensorSpec, plan_shards
from .manifest import (
    MANIFEST_NAME,
    SEIF_VERSION,
    LayerSpec,
    Layout,
    Manifest,
    ModelInfo,
    ShardEntry,
    TensorEntry,
)
from .shardfile import ShardPlan, plan_header
from .staging import JournalEntry, StagingDir

# In-memory tensors handed to the workers but not yet written: at most this many bytes (or one
# tensor, if larger), so that RSS stays within ~2 tensors + this budget whatever `jobs` is.
INFLIGHT_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3


def tensor_bytes(data: object, spec: TensorSpec) -> memoryview:
    """A flat byte view of `data` (ndarray or bytes-like) after checking it matches `spec`."""
    if isinstance(data, np.ndarray):
        if dtypes.from_numpy(data.dtype) != spec.dtype:
            raise ConversionError(f"got dtype {dtypes.from_numpy(data.dtype)}, planned "
                                  f"{spec.dtype}", field=spec.name)
        if tuple(data.shape) != tuple(spec.shape):
            raise ConversionError(f"got shape {list(data.shape)}, planned {list(spec.shape)}",
                                  field=spec.name)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(data)
        view = memoryview(data.reshape(-1).view(np.uint8))
    else:
        view = memoryview(data).cast("B")
    if view.nbytes != spec.nbytes:
        raise ConversionError(f"got {view.nbytes} bytes, planned {spec.nbytes}", field=spec.name)
    return view


def content_digest(view: memoryview) -> str:
    return as_checksum(digest_bytes(view))


def default_jobs() -> int:
    """Worker threads for copying and hashing. With direct I/O a worker spends much of its
    time waiting for the disk, so four per core (at most 8) keep both the cores hashing and
    the disk busy (on 2 cores: 8 workers ran 1.3x faster than 2); with buffered writes, one
    per core (at most 4): more only contend for the file's lock."""
    cores = os.cpu_count() or 1
    return max(1, min(8, 4 * cores)) if _DIRECT else max(1, min(4, cores))


@dataclass(frozen=True)
class FileRange:
    """Tensor bytes that already lie in a file: read into a small reused buffer, hashed there
    and written from it straight to the disk (O_DIRECT, page-aligned part), or copied by the
    kernel (`copy_file_range`) where direct I/O is off or refused; never whole in memory.

    `source` is a path (opened once per writer) or a file descriptor the caller keeps open
    until the writer is done. `expect`: the checksum the bytes must have (e.g. the source
    checkpoint's own); a mismatch aborts the conversion with an IntegrityError, so corruption
    is never copied into a checkpoint with fresh, matching checksums."""
    source: Path | int
    offset: int
    expect: str | None = None


class _OpenShard:
    """A shard file being written: preallocated to its final size (padding reads as zeros),
    header first, each tensor written at its final offset by whichever worker gets it."""

    def __init__(self, directory: Path, plan: PlannedShard, layout: ShardPlan):
        self.plan = plan
        self.layout = layout
        self.size = layout.size
        self.path = directory / plan.file
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, layout.size)
        _pwrite_all(self.fd, memoryview(layout.header), 0)
        self.direct_fd = _open_direct(self.path)
        if self.direct_fd >= 0:
            _allocate(self.fd, layout.size)
        self.deferred = _PartialPages(self.fd)
        self.digests: dict[str, bytes] = {}
        self.unsubmitted = {t.name for t in plan.tensors}
        self.futures: list[tuple[str, Future]] = []

    def close(self) -> str:
        """fsync the file and return its checksum (spec §8.1: header + region digests)."""
        self._close_direct()
        self.deferred.flush()      # every direct write of this shard has returned by now
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return shard_checksum(self.layout.header, (
            self.digests[name] if name in self.digests else zeros_digest(end - begin)
            for begin, end, name in self.layout.regions))

    def _close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1

    def discard(self) -> None:
        self._close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # unfinished: never reused


def _libc_call(name: str, *argtypes: str) -> Callable[..., int] | None:
    """libc's `name` via ctypes, taking the ctypes types named in `argtypes` and returning an
    int (Python's os module lacks sync_file_range and fallocate), or None where there is no
    such function (not Linux, no libc)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [getattr(ctypes, t) for t in argtypes]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = (_libc_call("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")
                    if os.environ.get("SEIF_WRITEBACK", "1") == "1" else None)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these pages to disk now (SYNC_FILE_RANGE_WRITE: it
    does not wait). By default Linux lets dirty pages pile up to 10% of RAM before writing any,
    so the final fsync would do all of the disk's work after all of the hashing; started
    early, the two overlap. Linux only; elsewhere a no-op."""
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, 2)


# Direct I/O (O_DIRECT) for the block-aligned interior of copied tensors: the bytes go from the
# hash buffer to the disk without a second copy into the page cache, and without the kernel's
# per-page bookkeeping of a buffered write (page allocation, buffer heads, dirty tracking), which
# was a third of the conversion's CPU time. Offsets, lengths and the buffer are kept multiples of
# DIRECT_ALIGN (the page size: at least any disk's logical block, and what keeps the buffered
# head and tail pages of each tensor apart from the directly written ones). SEIF_DIRECT=0 turns
# it off (everything buffered, as before), for comparison or for a file system that wants it.
DIRECT_ALIGN = max(4096, mmap.PAGESIZE)
# Read/hash/write unit of a copied tensor: small enough to stay in L2 between the read and the
# hash, and to keep many direct writes in flight (measured: 1 MiB with 8 workers beat 2-16 MiB
# and fewer workers on a 2-core machine).
COPY_CHUNK_BYTES: int | str = os.environ.get("SEIF_COPY_CHUNK", 1024 * 1024)


def _copy_chunk_bytes() -> int:
    """COPY_CHUNK_BYTES as a checked size: a positive multiple of DIRECT_ALIGN (a smaller or
    unaligned buffer could never carry an aligned direct write)."""
    try:
        size = int(COPY_CHUNK_BYTES)
    except ValueError:
        size = 0
    if size <= 0 or size % DIRECT_ALIGN:
        raise ConversionError(f"SEIF_COPY_CHUNK must be a positive multiple of {DIRECT_ALIGN} "
                              f"bytes, got {COPY_CHUNK_BYTES!r}")
    return size


DEFERRED_BYTES = 8 * 1024 * 1024
_DIRECT = hasattr(os, "O_DIRECT") and os.environ.get("SEIF_DIRECT", "1") == "1"


_FALLOCATE = (_libc_call("fallocate", "c_int", "c_int", "c_int64", "c_int64")
              if os.environ.get("SEIF_FALLOCATE", "1") == "1" else None)


def _allocate(fd: int, size: int) -> None:
    """Reserve the shard's blocks up front (fallocate, mode 0: unwritten extents, reads as
    zeros). Then an aligned O_DIRECT write is an overwrite of allocated blocks, which ext4 lets
    two workers do at once (a write that allocates holds the inode lock until the disk has
    finished). Where fallocate is not supported nothing changes."""
    if _FALLOCATE is not None and size:
        _FALLOCATE(fd, 0, 0, size)


def _open_direct(path: Path) -> int:
    """A second, O_DIRECT descriptor of a shard file, or -1 where the file system refuses one
    (then every write is buffered)."""
    if not _DIRECT:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset` of `fd`; a file that ends first was changed under us."""
    got = 0
    while got < view.nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ConversionError("source file ended early (changed during conversion?)")
        got += n


class _PartialPages:
    """The partial pages at the ends of directly written tensors, written buffered once the
    shard's direct writes are done: a buffered write takes the file's lock exclusively and
    would wait for every direct write in flight, and each tensor has up to two such pieces.
    Held up to DEFERRED_BYTES per shard (a shard of many tiny tensors); beyond, written now."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pieces: list[tuple[int, bytes]] = []
        self.nbytes = 0
        self.lock = threading.Lock()

    def add(self, offset: int, data: memoryview) -> None:
        with self.lock:
            if self.nbytes + data.nbytes <= DEFERRED_BYTES:
                self.pieces.append((offset, bytes(data)))
                self.nbytes += data.nbytes
                return
        _pwrite_all(self.fd, data, offset)

    def flush(self) -> None:
        with self.lock:
            for offset, data in self.pieces:
                _pwrite_all(self.fd, memoryview(data), offset)
            self.pieces.clear()
            self.nbytes = 0


class _Copier:
    """Moves one tensor's bytes into its shard and hashes them; runs in worker threads (the
    syscalls and hashlib release the GIL, so copies and hashes of different tensors overlap)."""

    def __init__(self, progress: Callable[[int], None]):
        self.progress = progress
        self.lock = threading.Lock()
        self.local = threading.local()
        self.sources: dict[Path, int] = {}
        self.copy_file_range = hasattr(os, "copy_file_range")
        self.direct = True                  # cleared for good by a direct write the FS refuses

    def _report(self, n: int) -> None:
        with self.lock:
            self.progress(n)

    def _buffer(self) -> memoryview:
        """This thread's read buffer: page-aligned anonymous memory (an O_DIRECT write needs
        an aligned source), reused for every chunk."""
        buf = getattr(self.local, "buffer", None)
        if buf is None:
            buf = self.local.buffer = memoryview(mmap.mmap(-1, _copy_chunk_bytes()))
        return buf

    def source_fd(self, source: Path | int, name: str, end: int) -> int:
        if isinstance(source, int):
            fd = source
        else:
            with self.lock:
                fd = self.sources.get(source)
                if fd is None:
                    fd = self.sources[source] = os.open(source, os.O_RDONLY)
        if os.fstat(fd).st_size < end:
            raise ConversionError(f"source file ends before byte {end}", path=str(source),
                                  field=name)
        return fd

    def from_memory(self, fd: int, offset: int, view: memoryview) -> bytes:
        digest = hashlib.sha256()
        for start in range(0, view.nbytes, CHUNK_BYTES):
            chunk = view[start:start + CHUNK_BYTES]
            digest.update(chunk)
            _pwrite_all(fd, chunk, offset + start)
            start_writeback(fd, offset + start, chunk.nbytes)
            self._report(chunk.nbytes)
        return digest.digest()

    def from_file(self, fd: int, offset: int, src: int, src_offset: int, length: int,
                  expect: str | None = None, name: str = "", direct_fd: int = -1,
                  deferred: _PartialPages | None = None) -> bytes:
        """Read each chunk into the buffer and hash it, then write it: the page-aligned
        interior straight from the buffer to the disk (`direct_fd`, O_DIRECT), the partial
        pages at either end handed to `deferred` (written once no direct write is in
        flight); without `direct_fd`, everything by the kernel's copy of the same
        range (it is in the page cache now), or from the buffer without copy_file_range."""
        buffer = self._buffer()
        digest = hashlib.sha256()
        done = 0
        while done < length:
            at = offset + done
            direct = direct_fd >= 0 and self.direct
            if direct and at % DIRECT_ALIGN == 0 and length - done >= DIRECT_ALIGN:
                n = min(buffer.nbytes, (length - done) // DIRECT_ALIGN * DIRECT_ALIGN)
            elif direct:     # up to the next aligned offset (head) or the end (tail)
                n = min(length - done, -at % DIRECT_ALIGN or length - done)
            else:
                n = min(buffer.nbytes, length - done)
            chunk = buffer[:n]
            _pread_exact(src, chunk, src_offset + done)
            digest.update(chunk)
            if direct and n % DIRECT_ALIGN == 0 and at % DIRECT_ALIGN == 0:
                self._write_direct(direct_fd, fd, chunk, at)
            elif direct and deferred is not None:
                deferred.add(at, chunk)
            elif direct:
                _pwrite_all(fd, chunk, at)
            else:
                self._copy(fd, at, src, src_offset + done, chunk)
                start_writeback(fd, at, n)
            done += n
            self._report(n)
        if expect is not None and as_checksum(digest.digest()) != expect:
            raise IntegrityError("source bytes do not match their checksum (corrupt source?)",
                                 field=name)
        return digest.digest()

    def _write_direct(self, direct_fd: int, fd: int, chunk: memoryview, offset: int) -> None:
        """O_DIRECT write of an aligned chunk; whatever it does not take (a refusal, EINVAL on
        a file system without direct I/O, or a short write) is written buffered."""
        written = 0
        try:
            while written < chunk.nbytes:
                n = os.pwrite(direct_fd, chunk[written:], offset + written)
                if n <= 0 or n % DIRECT_ALIGN:
                    written += max(n, 0)
                    break
                written += n
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            self.direct = False
        if written < chunk.nbytes:
            _pwrite_all(fd, chunk[written:], offset + written)

    def _copy(self, fd: int, offset: int, src: int, src_offset: int, chunk: memoryview) -> None:
        if self.copy_file_range:
            copied = 0
            try:
                while copied < chunk.nbytes:
                    n = os.copy_file_range(src, fd, chunk.nbytes - copied,
                                           src_offset + copied, offset + copied)
                    if n <= 0:
                        break
                    copied += n
            except OSError:      # EXDEV, ENOSYS, EINVAL on some filesystems: plain writes
                self.copy_file_range = False
            if copied == chunk.nbytes:
                return
            chunk, offset = chunk[copied:], offset + copied
        _pwrite_all(fd, chunk, offset)

    def close(self) -> None:
        for fd in self.sources.values():
            os.close(fd)
        self.sources.clear()


class CheckpointWriter:
    """Write a SEIF checkpoint tensor by tensor.

    Example::

        with CheckpointWriter("out.seif", layers, model=ModelInfo(...)) as w:
            w.plan([TensorSpec(name, "BF16", shape) for ...])
            for name, array in source:          # in planned order for sequential writes
                w.write(name, array)
        # committed atomically on a clean exit, removed on an exception

    Args:
        path: destination directory (conventionally `NAME.seif`).
        layers: the MoE layer descriptors; their canonical tensors must all be planned.
        overwrite: replace an existing `path` (only after the new one is complete).
        progress: called with the number of bytes written after each chunk.
        resume: continue an interrupted conversion: shards a previous run finished (and that
            still match the plan and their checksums) are kept; `needs(name)` tells which
            tensors still have to be written.
        keep_partial: on an exception, keep `PATH.partial/` (when at least one shard is
            finished) so that a later `resume=True` run can continue.
        jobs: worker threads that copy and hash tensors (1: everything in the caller's thread;
            default: `default_jobs()`, 4 per core up to 8 with direct I/O). `write` returns
            as soon as a worker has the tensor; `commit` waits for all.
        max_inflight_bytes: in-memory tensors handed to workers and not yet written are held
            up to this many bytes (or one tensor, if larger); `write` waits beyond it. Tensors
            given as `FileRange` cost no memory.
    """

    def __init__(self, path: str | os.PathLike, layers: Iterable[LayerSpec], *,
                 model: ModelInfo | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 alignment: int = 64, overwrite: bool = False,
                 progress: Callable[[int], None] | None = None,
                 metadata: Mapping[str, str] | None = None, resume: bool = False,
                 keep_partial: bool = False, jobs: int | None = None,
                 max_inflight_bytes: int = INFLIGHT_BYTES):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ConversionError("destination exists (pass overwrite=True / --overwrite)",
                                  path=str(self.path))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ConversionError(f"alignment {alignment} is not a power of two")
        self.layers = list(layers)
        self.model = model or ModelInfo()
        self.layout = Layout("by-expert", max_shard_bytes, alignment)
        self.overwrite = overwrite
        self.progress = progress or (lambda n: None)
        self.metadata = dict(metadata or {})
        self.staging = StagingDir(self.path, resume)
        self.tmp = self.staging.path
        self.keep_partial = keep_partial
        self.reused: set[str] = set()
        self.specs: dict[str, TensorSpec] = {}
        self.shards: list[PlannedShard] = []
        self.shard_of: dict[str, PlannedShard] = {}
        self.shard_layouts: dict[str, ShardPlan] = {}
        self.open: dict[str, _OpenShard] = {}
        self.checksums: dict[str, str] = {}
        self.shard_checksums: dict[str, str] = {}
        self.done = False
        self.jobs = default_jobs() if jobs is None else int(jobs)
        if self.jobs < 1:
            raise ConversionError(f"jobs must be at least 1, got {jobs}")
        self.copier = _Copier(self.progress)
        self.pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="seif-write") \
            if self.jobs > 1 else None
        self.max_inflight = max_inflight_bytes
        self.inflight = 0                       # bytes of in-memory tensors not yet written
        self.inflight_cv = threading.Condition()

    # -- context manager: commit on success, clean up on any failure
    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def plan(self, specs: Iterable[TensorSpec]) -> None:
        """Declare every tensor (once, before any write) and lay out the shards."""
        if self.specs:
            raise ConversionError("plan() was already called")
        for spec in specs:
            if spec.name in self.specs:
                raise ConversionError("tensor planned twice", field=spec.name)
            dtypes.to_numpy(spec.dtype)
            self.specs[spec.name] = spec
        for spec in self.specs.values():
            if spec.alias_of is not None:
                target = self.specs.get(spec.alias_of)
                if target is None or target.alias_of is not None:
                    raise ConversionError(f"alias target {spec.alias_of!r} is not a stored tensor",
                                          field=spec.name)
        self._check_layers()
        self.shards = plan_shards(list(self.specs.values()), self.layout.max_shard_bytes)
        for shard in self.shards:
            self.shard_layouts[shard.file] = plan_header(
                [(t.name, t.dtype, t.shape) for t in shard.tensors], self.layout.alignment,
                {"format": "seif", "seif_version": SEIF_VERSION})
            for t in shard.tensors:
                self.shard_of[t.name] = shard
        journal = self.staging.acquire()
        if journal:
            planned = {f: (p.header, p.size, p.regions) for f, p in self.shard_layouts.items()}
            for file, entry in self.staging.reuse(journal, planned).items():
                self.reused.add(file)
                self.shard_checksums[file] = entry.checksum
                self.checksums.update(entry.tensors)

    def needs(self, name: str) -> bool:
        """Whether `name` still has to be written (False for aliases, for tensors already
        written, and for tensors in shards reused by `resume`)."""
        if self.specs[name].alias_of is not None or name in self.checksums:
            return False
        shard = self.open.get(self.shard_of[name].file)
        return shard is None or name in shard.unsubmitted

    def _check_layers(self) -> None:
        for layer in self.layers:
            for name, shape in layer.expected_tensors().items():
                spec = self.specs.get(name)
                if spec is None:
                    raise ConversionError("the layer descriptor needs this tensor; it was not "
                                          "planned", field=name)
                logical = tuple(spec.quantization.logical_shape) if spec.quantization \
                    else tuple(spec.shape)
                if logical != shape:
                    raise ConversionError(f"planned shape {list(logical)}, the layer descriptor "
                                          f"needs {list(shape)}", field=name)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values() if s.alias_of is None)

    def write(self, name: str, data: object) -> None:
        """Write one planned tensor: an ndarray of the planned dtype/shape, its raw bytes, or a
        `FileRange` saying where in a file its bytes already lie (copied without a round trip
        through Python). Tensors may come in any order. With `jobs > 1` the writer keeps a
        reference to `data` until a worker has written it: do not modify it afterwards."""
        spec = self.specs.get(name)
        if spec is None:
            raise ConversionError("tensor was not planned", field=name)
        if spec.alias_of is not None:
            raise ConversionError(f"tensor is an alias of {spec.alias_of!r}; nothing to write",
                                  field=name)
        plan = self.shard_of[name]
        if plan.file in self.reused:
            return  # finished by an earlier run and verified on resume
        shard = self.open.get(plan.file)
        if name in self.checksums or (shard is not None and name not in shard.unsubmitted):
            raise ConversionError("tensor written twice", field=name)
        if isinstance(data, FileRange):
            src = self.copier.source_fd(data.source, name, data.offset + spec.nbytes)
            view, nbytes = None, 0
        else:
            view = tensor_bytes(data, spec)
            nbytes = view.nbytes
        if shard is None:
            shard = self.open[plan.file] = _OpenShard(self.tmp, plan,
                                                      self.shard_layouts[plan.file])
        begin, _ = shard.layout.absolute(name)
        shard.unsubmitted.discard(name)
        if view is None:
            job = (self.copier.from_file, shard.fd, begin, src, data.offset, spec.nbytes,
                   data.expect, name, shard.direct_fd, shard.deferred)
        else:
            job = (self.copier.from_memory, shard.fd, begin, view)
        if self.pool is None:
            shard.digests[name] = job[0](*job[1:])
        else:
            self._reserve(nbytes)
            shard.futures.append((name, self.pool.submit(self._run, nbytes, job)))
        self._finish_shards(wait=False)

    def _reserve(self, nbytes: int) -> None:
        """Wait until an in-memory tensor of `nbytes` fits the in-flight budget."""
        if not nbytes:
            return
        with self.inflight_cv:
            while self.inflight and self.inflight + nbytes > self.max_inflight:
                self.inflight_cv.wait()
            self.inflight += nbytes

    def _run(self, nbytes: int, job) -> bytes:
        try:
            return job[0](*job[1:])
        finally:
            if nbytes:
                with self.inflight_cv:
                    self.inflight -= nbytes
                    self.inflight_cv.notify_all()

    def _finish_shards(self, wait: bool, salvage: bool = False) -> None:
        """Close, fsync, checksum and journal every shard whose tensors are all written (with
        `wait`, wait for the workers first). A worker's exception is raised here, or, when
        salvaging what an aborted run finished, leaves that shard unfinished."""
        for file, shard in list(self.open.items()):
            if shard.unsubmitted:
                continue
            if not wait and not all(f.done() for _, f in shard.futures):
                continue
            try:
                for tensor, future in shard.futures:
                    shard.digests[tensor] = future.result()
            except BaseException:
                if salvage:
                    continue
                raise
            for t in shard.plan.tensors:
                self.checksums[t.name] = as_checksum(shard.digests[t.name])
            checksum = self.shard_checksums[file] = shard.close()
            del self.open[file]
            self.staging.record(JournalEntry(
                file, shard.size, checksum, hashlib.sha256(shard.layout.header).hexdigest(),
                {t.name: self.checksums[t.name] for t in shard.plan.tensors}))

    def manifest(self) -> Manifest:
        """The manifest of the finished checkpoint (valid once every tensor is written)."""
        features: set[str] = set()
        for layer in self.layers:
            features |= layer.features()
        tensors: dict[str, TensorEntry] = {}
        for name, spec in self.specs.items():
            if spec.alias_of is not None:
                features.add("alias")
                entry = TensorEntry(spec.dtype, list(spec.shape), alias_of=spec.alias_of)
            else:
                file = self.shard_of[name].file
                entry = TensorEntry(spec.dtype, list(spec.shape), shard=file,
                                    data_offsets=list(self.shard_layouts[file].offsets[name]),
                                    checksum=self.checksums[name])
            entry.source_name = spec.source_name
            if spec.quantization is not None:
                features.add(f"quant.{spec.quantization.scheme}")
                entry.quantization = spec.quantization
            tensors[name] = entry
        shards = []
        for shard in self.shards:
            shards.append(ShardEntry(shard.file, self.shard_layouts[shard.file].size,
                                     self.shard_checksums[shard.file],
                                     shard.role, shard.layers, shard.experts))
        from . import __version__
        return Manifest(required_features=sorted(features), model=self.model,
                        layers=self.layers, tensors=tensors, shards=shards,
                        layout=self.layout, generator=f"seif {__version__}",
                        metadata=self.metadata)

    def commit(self) -> Path:
        """Check completeness, write seif.json last, fsync, and rename into place."""
        if self.done:
            return self.path
        try:
            self._finish_shards(wait=True)
            self._shutdown()
            missing = [n for n, s in self.specs.items()
                       if s.alias_of is None and n not in self.checksums]
            if missing:
                raise ConversionError(f"{len(missing)} planned tensors were never written "
                                      f"(first: {missing[0]})")
            manifest = self.manifest()
            text = manifest.to_json()
            Manifest.from_json(text)  # what we write must be what a reader accepts
            self.staging.finish()
            manifest_path = self.tmp / MANIFEST_NAME
            with open(manifest_path, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self.tmp)
            old = None
            if self.path.exists():
                if not self.overwrite:
                    raise ConversionError("destination appeared while writing",
                                          path=str(self.path))
                old = self.path.parent / f"{self.path.name}.old-{secrets.token_hex(4)}"
                os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            _fsync_dir(self.path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self.staging.release()
        self.done = True
        return self.path

    def abort(self) -> None:
        """Stop; the destination is left as it was. The staging directory is removed, or kept
        for `resume` when `keep_partial` is set and some shard is finished."""
        if self.keep_partial and self.staging.fd is not None:
            try:  # keep every shard whose tensors were all handed over: resume reuses them
                self._finish_shards(wait=True, salvage=True)
            except Exception:
                pass
        self._shutdown()
        for shard in self.open.values():
            shard.discard()
        self.open.clear()
        if self.staging.fd is None:
            pass  # plan() never acquired the staging directory: nothing of ours to remove
        elif self.keep_partial and (self.staging.recorded or self.reused):
            self.staging.release()
        else:
            self.staging.discard()
        self.done = True


    def _shutdown(self) -> None:
        """Stop the workers (waiting for running copies: their files are about to be closed)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.copier.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
         layers: Iterable[LayerSpec] = (), *, model: ModelInfo | None = None,
         source_names: Mapping[str, str] | None = None,
         quantization: Mapping[str, object] | None = None, dedupe: bool = False,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, alignment: int = 64,
         overwrite: bool = False, progress: Callable[[int], None] | None = None,
         metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` (canonical name -> array) as a SEIF checkpoint at `path`.

    With `dedupe=True`, byte-identical tensors of the same dtype and shape are stored once and
    the others recorded as aliases (cross-layer expert sharing, tied weights).

    Example::

        seif.save("tiny.seif", {"layers.0.router.weight": w, ...}, [layer_spec])
    """
    source_names = source_names or {}
    quantization = quantization or {}
    specs: list[TensorSpec] = []
    first_with: dict[tuple, str] = {}
    for name, array in tensors.items():
        if not isinstance(array, np.ndarray):
            raise ConversionError(f"expected a NumPy array, got {type(array).__name__}",
                                  field=name)
        spec = TensorSpec(name, dtypes.from_numpy(array.dtype), tuple(array.shape),
                          source_names.get(name), quantization.get(name))
        if dedupe:
            key = (spec.dtype, spec.shape, content_digest(tensor_bytes(array, spec)))
            spec.alias_of = first_with.setdefault(key, name)
            if spec.alias_of == name:
                spec.alias_of = None
        specs.append(spec)
    with CheckpointWriter(path, layers, model=model, max_shard_bytes=max_shard_bytes,
                          alignment=alignment, overwrite=overwrite, progress=progress,
                          metadata=metadata) as writer:
        writer.plan(specs)
        for spec in specs:
            if spec.alias_of is None:
                writer.write(spec.name, tensors[spec.name])
    return Path(path)

