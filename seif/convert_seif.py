"""SEIF -> SEIF: re-layout, dtype cast, and cutting a checkpoint down to an expert subset.

The expert subset is what serving teams use to put only some experts on a device. The router
rows (weight, bias, selection bias) are cut to the same subset and renumbered with the experts,
and `expert_ids` records the original ids, so routing on the subset is routing restricted to
those experts: every other expert simply does not exist.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import dtypes
from .errors import ConversionError
from .layout import TensorSpec
from .manifest import LayerSpec
from .progress import byte_progress
from .reader import Checkpoint
from .writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter, FileRange

_EXPERT_TENSOR = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.(.+)$")
_ROUTER_ROWS = ("weight", "bias", "selection_bias")
_CASTABLE = {"F64", "F32", "F16", "BF16"}


def parse_expert_subset(text: str) -> list[int]:
    """`"0-3,7"` -> [0, 1, 2, 3, 7]. Sorted, distinct."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConversionError(f"bad expert subset {text!r}: use ids and ranges like 0-3,7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConversionError(f"bad range {part!r} in expert subset")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def subset_layer(layer: LayerSpec, keep: list[int]) -> LayerSpec:
    """The descriptor of `layer` restricted to experts `keep` (renumbered 0..len-1)."""
    r = layer.routing
    where = f"layer {layer.index}"
    if keep[-1] >= layer.num_experts:
        raise ConversionError(f"{where} has experts 0..{layer.num_experts - 1}; "
                              f"subset asks for {keep[-1]}")
    if r.kind == "soft_moe":
        raise ConversionError(f"{where}: soft_moe mixes every expert's slots; it has no "
                              "meaningful expert subset")
    routing = dataclasses.replace(r)
    if r.kind in ("topk", "group_topk", "sparse_mixer") and r.top_k > len(keep):
        raise ConversionError(f"{where} routes each token to {r.top_k} experts; a subset of "
                              f"{len(keep)} cannot serve it")
    if r.kind == "group_topk":
        size = layer.num_experts // r.n_group
        groups = sorted({e // size for e in keep})
        whole = sorted(e for g in groups for e in range(g * size, (g + 1) * size))
        if whole != keep:
            raise ConversionError(f"{where} routes by expert groups of {size}; the subset must "
                                  f"be whole groups (e.g. {groups[0] * size}-"
                                  f"{groups[0] * size + size - 1})")
        routing.n_group = len(groups)
        routing.topk_group = min(r.topk_group, len(groups))
    ids = [layer.expert_ids[e] for e in keep] if layer.expert_ids else list(keep)
    return dataclasses.replace(layer, num_experts=len(keep), routing=routing, expert_ids=ids)


def convert_seif_to_seif(src: str | os.PathLike, dst: str | os.PathLike, *,
                         dtype: str | None = None, experts: str | list[int] | None = None,
                         max_shard_bytes: int | None = None, overwrite: bool = False,
                         show_progress: bool | None = None, resume: bool = False,
                         keep_partial: bool = True, jobs: int | None = None,
                         **unused) -> Path:
    """Rewrite `src` as `dst`: new shard layout, optional float cast, optional expert subset.

    With `resume`, shards finished by an interrupted run into the same destination are
    verified and reused.

    Router tensors keep their stored dtype under `dtype` (routing is computed in fp32, and a
    cast router can choose different experts than the source); quantized tensors are
    dequantized to `dtype` when one is given and passed through byte for byte otherwise.
    """
    if unused:
        raise ConversionError(f"options not supported for seif -> seif: {', '.join(unused)}")
    target = dtypes.normalize_name(dtype) if dtype else None
    if target is not None and target not in _CASTABLE:
        raise ConversionError(f"--dtype must be a float type ({', '.join(sorted(_CASTABLE))})")
    if Path(src).resolve() == Path(dst).resolve():
        raise ConversionError("source and destination are the same directory")
    with Checkpoint(src) as ckpt:
        m = ckpt.manifest
        keep = parse_expert_subset(experts) if isinstance(experts, str) else experts
        layers = [subset_layer(layer, keep) if keep else layer for layer in m.layers]
        plan = _plan(ckpt, target, keep)
        total = sum(s.nbytes for s, _ in plan if s.alias_of is None)
        with byte_progress(total, "converting", show_progress) as advance:
            writer = CheckpointWriter(dst, layers, model=m.model, overwrite=overwrite,
                                      max_shard_bytes=max_shard_bytes or m.layout.max_shard_bytes
                                      or DEFAULT_MAX_SHARD_BYTES,
                                      alignment=m.layout.alignment, progress=advance,
                                      metadata=m.metadata, resume=resume,
                                      keep_partial=keep_partial, jobs=jobs)
            with writer:
                writer.plan([spec for spec, _ in plan])
                for spec, read in plan:
                    if writer.needs(spec.name):
                        writer.write(spec.name, read())
    return Path(dst)


def _plan(ckpt: Checkpoint, target: str | None, keep: list[int] | None
          ) -> list[tuple[TensorSpec, Callable[[], object]]]:
    """(spec, reader) for every output tensor, in source order."""
    m = ckpt.manifest
    moe_layers = {layer.index for layer in m.layers}
    renumber = {old: new for new, old in enumerate(keep)} if keep else None
    companions = {c for t in m.tensors.values() if t.quantization
                  for c in (t.quantization.scale, t.quantization.zero_point) if c}
    out: list[tuple[TensorSpec, Callable[[], object]]] = []
    names: dict[str, str] = {}  # source name -> output name
    for name, entry in m.tensors.items():
        new_name = name
        rows = None
        match = _EXPERT_TENSOR.match(name)
        if renumber is not None and match and int(match.group(1)) in moe_layers:
            e = int(match.group(2))
            if e not in renumber:
                continue
            new_name = f"layers.{match.group(1)}.experts.{renumber[e]}.{match.group(3)}"
        elif renumber is not None and any(name in {layer.router_name(p) for p in _ROUTER_ROWS}
                                          for layer in m.layers):
            rows = keep
        if target is not None and name in companions:
            continue  # scales are folded into the dequantized weight
        names[name] = new_name
        out.append(_tensor_plan(ckpt, name, new_name, entry, target, rows))
    # Aliases whose target was cut away are stored instead; the rest are renamed.
    for spec, _ in out:
        if spec.alias_of is not None:
            spec.alias_of = names.get(spec.alias_of)  # None: read through the alias, store
    return out


def _tensor_plan(ckpt: Checkpoint, name: str, new_name: str, entry, target: str | None,
                 rows: list[int] | None) -> tuple[TensorSpec, Callable[[], object]]:
    is_router = rows is not None or ".router." in name
    shape = list(entry.shape)
    dtype = entry.dtype
    quant = entry.quantization
    dequantize = target is not None and quant is not None
    cast = target is not None and not is_router and (dequantize or dtype in _CASTABLE)
    if dequantize:
        shape = list(quant.logical_shape)
        quant = None
    if cast:
        dtype = target
    if rows is not None:
        shape[0] = len(rows)
    # Aliases survive renames and casts (target and alias are cast alike); cut rows and
    # dequantization store the tensor again.
    alias = entry.alias_of if entry.alias_of and rows is None and not dequantize else None

    def read() -> object:
        if not (dequantize or cast or rows is not None):
            # the same bytes: copied file to file by the writer, checked against the source's
            # own checksum on the way
            shard, offset, _ = ckpt.stored_bytes(name)
            return FileRange(shard.fd, offset, expect=ckpt.manifest.resolve(name).checksum)
        if dequantize:
            array = ckpt.dequantized(name)
        else:
            array = ckpt.tensor(name)
        if rows is not None:
            array = array[rows]
        if cast:
            array = array.astype(dtypes.to_numpy(target))
        return np.ascontiguousarray(array)

    spec = TensorSpec(new_name, dtype, tuple(shape), entry.source_name, quant, alias)
    return spec, read


def register() -> None:
    from .convert import register as add
    add("seif", "seif", convert_seif_to_seif)
