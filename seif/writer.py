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

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from . import dtypes
from .errors import ConversionError
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
from .staging import JournalEntry, StagingDir, file_sha256

CHUNK_BYTES = 64 * 1024 * 1024
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
    digest = hashlib.sha256()
    for start in range(0, view.nbytes, CHUNK_BYTES):
        digest.update(view[start:start + CHUNK_BYTES])
    return "sha256:" + digest.hexdigest()


class _OpenShard:
    """A shard file being written: sequential when tensors arrive in plan order."""

    def __init__(self, directory: Path, plan: PlannedShard, layout: ShardPlan):
        self.plan = plan
        self.layout = layout
        self.size = layout.size
        self.path = directory / plan.file
        self.fh = open(self.path, "wb")
        self.fh.write(layout.header)
        self.hasher = hashlib.sha256(layout.header)
        self.cursor = len(layout.header)
        self.order = [t.name for t in plan.tensors]
        self.next = 0
        self.pending = set(self.order)
        self.in_order = True

    def write(self, name: str, view: memoryview, digest: hashlib._Hash,
              progress: Callable[[int], None]) -> None:
        begin, _ = self.layout.absolute(name)
        sequential = self.in_order and self.order[self.next] == name
        if sequential:
            if begin > self.cursor:
                pad = bytes(begin - self.cursor)
                self.fh.write(pad)
                self.hasher.update(pad)
        else:
            self.in_order = False
            self.fh.seek(begin)
        for start in range(0, view.nbytes, CHUNK_BYTES):
            chunk = view[start:start + CHUNK_BYTES]
            self.fh.write(chunk)
            digest.update(chunk)
            if sequential:
                self.hasher.update(chunk)
            progress(chunk.nbytes)
        self.cursor = begin + view.nbytes
        self.pending.discard(name)
        while self.next < len(self.order) and self.order[self.next] not in self.pending:
            self.next += 1

    def close(self) -> str:
        """Finish the file, fsync it, and return its checksum."""
        if self.in_order and self.cursor < self.size:
            self.fh.write(bytes(self.size - self.cursor))
            self.hasher.update(bytes(self.size - self.cursor))
        self.fh.truncate(self.size)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self.in_order:
            return "sha256:" + self.hasher.hexdigest()
        return file_sha256(self.path)  # out-of-order writes: hash the finished file once


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
    """

    def __init__(self, path: str | os.PathLike, layers: Iterable[LayerSpec], *,
                 model: ModelInfo | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 alignment: int = 64, overwrite: bool = False,
                 progress: Callable[[int], None] | None = None,
                 metadata: Mapping[str, str] | None = None, resume: bool = False,
                 keep_partial: bool = False):
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
            planned = {f: (p.header, p.size) for f, p in self.shard_layouts.items()}
            for file, entry in self.staging.reuse(journal, planned).items():
                self.reused.add(file)
                self.shard_checksums[file] = entry.checksum
                self.checksums.update(entry.tensors)

    def needs(self, name: str) -> bool:
        """Whether `name` still has to be written (False for aliases, for tensors already
        written, and for tensors in shards reused by `resume`)."""
        spec = self.specs[name]
        return spec.alias_of is None and name not in self.checksums

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
        """Write one planned tensor (ndarray of the planned dtype/shape, or its raw bytes)."""
        spec = self.specs.get(name)
        if spec is None:
            raise ConversionError("tensor was not planned", field=name)
        if spec.alias_of is not None:
            raise ConversionError(f"tensor is an alias of {spec.alias_of!r}; nothing to write",
                                  field=name)
        plan = self.shard_of[name]
        if plan.file in self.reused:
            return  # finished by an earlier run and verified on resume
        if name in self.checksums:
            raise ConversionError("tensor written twice", field=name)
        view = tensor_bytes(data, spec)
        shard = self.open.get(plan.file)
        if shard is None:
            shard = self.open[plan.file] = _OpenShard(self.tmp, plan,
                                                      self.shard_layouts[plan.file])
        digest = hashlib.sha256()
        shard.write(name, view, digest, self.progress)
        self.checksums[name] = "sha256:" + digest.hexdigest()
        if not shard.pending:
            checksum = self.shard_checksums[plan.file] = shard.close()
            del self.open[plan.file]
            self.staging.record(JournalEntry(
                plan.file, shard.size, checksum, hashlib.sha256(shard.layout.header).hexdigest(),
                {t.name: self.checksums[t.name] for t in plan.tensors}))

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
        for shard in self.open.values():
            shard.fh.close()
            os.unlink(shard.path)  # unfinished: never reused
        self.open.clear()
        if self.staging.fd is None:
            pass  # plan() never acquired the staging directory: nothing of ours to remove
        elif self.keep_partial and (self.staging.recorded or self.reused):
            self.staging.release()
        else:
            self.staging.discard()
        self.done = True


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

