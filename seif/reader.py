"""The lazy, per-expert checkpoint reader (spec §8, §9).

`seif.open(path)` parses only `seif.json`. A shard's header is read and checked against the
manifest the first time one of its tensors is needed, and a tensor read fetches exactly that
tensor's bytes with `pread` (counted in `Checkpoint.bytes_read`), so loading expert `e` of layer
`l` costs that expert's bytes plus one header per shard touched, however big the checkpoint is.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dtypes
from .errors import FormatError, IntegrityError, SecurityError
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, LayerSpec, Manifest, TensorEntry
from .shardfile import ShardHeader, read_header


@dataclass
class _Shard:
    fd: int
    path: str
    header: ShardHeader


def resolve_inside(root: Path, name: str) -> Path:
    """The real path of `root/name`, refusing anything that resolves outside `root` and
    anything that is not a regular file (a FIFO or device would hang or lie)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([real_root, real]) != real_root:
        raise SecurityError("path resolves outside the checkpoint directory (symlink?)",
                            path=str(root / name))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FormatError("file is missing", path=str(root / name)) from None
    if not stat.S_ISREG(st.st_mode):
        raise SecurityError("not a regular file", path=str(root / name))
    return Path(real)


def read_manifest(root: Path) -> Manifest:
    if not root.is_dir():
        if not root.exists():
            raise FormatError("no such checkpoint directory", path=str(root))
        raise FormatError("a SEIF checkpoint is a directory holding seif.json", path=str(root))
    path = resolve_inside(root, MANIFEST_NAME)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise SecurityError(f"manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES}",
                            path=str(root / MANIFEST_NAME))
    return Manifest.from_json(path.read_bytes(), path=str(root / MANIFEST_NAME))


class Checkpoint:
    """An open SEIF checkpoint. Cheap to open; reads happen per tensor.

    Example::

        with seif.open("mixtral.seif") as ckpt:
            print([layer.index for layer in ckpt.layers])
            w = ckpt.expert(3, 17)["gate"]        # reads only expert 17 of layer 3
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.bytes_read = 0
        self._shards: dict[str, _Shard] = {}
        self._shard_entries = {s.file: s for s in self.manifest.shards}

    # -- lifecycle
    def close(self) -> None:
        for shard in self._shards.values():
            os.close(shard.fd)
        self._shards.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- descriptors
    @property
    def layers(self) -> list[LayerSpec]:
        return self.manifest.layers

    def layer(self, index: int) -> LayerSpec:
        return self.manifest.layer(index)

    def tensor_names(self) -> list[str]:
        return list(self.manifest.tensors)

    def info(self, name: str) -> TensorEntry:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    # -- shard access
    def shard(self, file: str) -> _Shard:
        """Open a shard and check its header against the manifest (once)."""
        if file in self._shards:
            return self._shards[file]
        entry = self._shard_entries[file]
        path = resolve_inside(self.path, file)
        shown = str(self.path / file)
        size = path.stat().st_size
        if size != entry.size:
            raise FormatError(f"shard is {size} bytes, the manifest says {entry.size} "
                              f"({'truncated' if size < entry.size else 'extended'})",
                              path=shown)
        fd = os.open(path, os.O_RDONLY)
        try:
            with os.fdopen(os.dup(fd), "rb") as fh:
                header = read_header(fh, size, shown)
            self.bytes_read += header.data_start
            _check_header_agrees(self.manifest, file, header, shown)
        except BaseException:
            os.close(fd)
            raise
        shard = self._shards[file] = _Shard(fd, shown, header)
        return shard

    def stored_bytes(self, name: str) -> tuple[_Shard, int, int]:
        """(shard, absolute offset, length) of the bytes behind `name` (aliases resolved)."""
        self.info(name)
        entry = self.manifest.resolve(name)
        shard = self.shard(entry.shard)
        begin, end = entry.data_offsets
        return shard, shard.header.data_start + begin, end - begin

    def tensor(self, name: str, *, verify: bool = False) -> np.ndarray:
        """The stored tensor as a NumPy array (its stored dtype; bf16/fp8 via ml_dtypes).

        `verify=True` checks its checksum (spec §8.1) and raises IntegrityError on mismatch.
        """
        shard, offset, length = self.stored_bytes(name)
        entry = self.manifest.resolve(name)
        buf = np.empty(length, dtype=np.uint8)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(shard.fd, [view[got:]], offset + got)
            if n <= 0:
                raise FormatError("unexpected end of file", path=shard.path, field=name)
            got += n
        self.bytes_read += length
        if verify:
            digest = "sha256:" + hashlib.sha256(view).hexdigest()
            if digest != entry.checksum:
                raise IntegrityError("tensor checksum mismatch", path=shard.path, field=name)
        return buf.view(dtypes.to_numpy(entry.dtype)).reshape(entry.shape)

    def dequantized(self, name: str, dtype: np.dtype = np.float32, *,
                    verify: bool = False) -> np.ndarray:
        """Real values of a tensor, dequantizing it if it carries a quantization descriptor."""
        entry = self.info(name)
        stored = self.tensor(name, verify=verify)
        if entry.quantization is None:
            return stored.astype(dtype)
        from .quant import dequantize
        return dequantize(stored, entry.quantization,
                          lambda n: self.tensor(n, verify=verify), name).astype(dtype)

    # -- MoE views
    def expert(self, layer: int, e: int, *, verify: bool = False,
               dequantize: bool = False) -> dict[str, np.ndarray]:
        """One expert's tensors: keys `gate`, `up`, `down` (+ `gate_bias` ... with biases)."""
        spec = self.layer(layer)
        if not 0 <= e < spec.num_experts:
            raise KeyError(f"layer {layer} has experts 0..{spec.num_experts - 1}, not {e}")
        get = (lambda n: self.dequantized(n, verify=verify)) if dequantize \
            else (lambda n: self.tensor(n, verify=verify))
        out = {}
        for proj in spec.experts.projections:
            out[proj] = get(spec.expert_name(e, proj))
            if spec.experts.bias:
                out[f"{proj}_bias"] = get(spec.expert_name(e, proj, "bias"))
        return out

    def router(self, layer: int) -> dict[str, np.ndarray]:
        spec = self.layer(layer)
        out = {"weight": self.tensor(spec.router_name())}
        if spec.routing.router_bias:
            out["bias"] = self.tensor(spec.router_name("bias"))
        if spec.routing.selection_bias:
            out["selection_bias"] = self.tensor(spec.router_name("selection_bias"))
        return out

    def moe_params(self, layer: int, *, verify: bool = False):
        """All tensors of one MoE layer as `seif.moe.MoEParams` (dequantized to float32)."""
        from .moe import MoEParams
        return MoEParams.from_tensors(self.layer(layer),
                                      lambda n: self.dequantized(n, verify=verify))


def _check_header_agrees(manifest: Manifest, file: str, header: ShardHeader, shown: str) -> None:
    expected = {n: t for n, t in manifest.tensors.items() if t.shard == file}
    for name, t in expected.items():
        h = header.entries.get(name)
        if h is None:
            raise FormatError("tensor listed in the manifest is not in the shard header",
                              path=shown, field=name)
        if h.dtype != t.dtype or list(h.shape) != t.shape:
            raise FormatError(f"shard header says {h.dtype}{list(h.shape)}, the manifest says "
                              f"{t.dtype}{t.shape}", path=shown, field=name)
        if [h.begin, h.end] != t.data_offsets:
            raise FormatError(f"shard header offsets {[h.begin, h.end]} differ from the "
                              f"manifest's {t.data_offsets}", path=shown, field=name)
    extra = set(header.entries) - set(expected)
    if extra:
        raise FormatError(f"shard holds {len(extra)} tensor(s) the manifest does not list",
                          path=shown, field=sorted(extra)[0])


def open(path: str | os.PathLike) -> Checkpoint:  # noqa: A001 - mirrors builtins.open on purpose
    """Open a SEIF checkpoint directory lazily. Raises a SeifError subclass on bad input."""
    return Checkpoint(path)
