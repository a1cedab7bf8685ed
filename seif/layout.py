"""Shard planning: which tensor goes into which file (spec §8.3).

The default policy, "by-expert", serves the two users per-expert addressability is for:
expert-parallel ranks and edge devices own *expert ranges*, so expert tensors are grouped by
expert index (all layers of experts e0..e1 together), size-capped, and split by layer range only
when one expert range is too big. Routers and dense weights go to small files of their own, so a
consumer that needs only some experts downloads only those files plus the dense ones.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from . import dtypes
from .manifest import numel

_EXPERT_RE = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_ROUTER_RE = re.compile(r"^layers\.(\d+)\.router\.")


@dataclass
class TensorSpec:
    """A tensor the writer will receive: known before its bytes are (plan first, stream later)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source_name: str | None = None
    quantization: object | None = None  # manifest.Quantization
    alias_of: str | None = None

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtypes.itemsize(self.dtype)


@dataclass
class PlannedShard:
    file: str
    role: str
    tensors: list[TensorSpec] = field(default_factory=list)
    layers: list[int] | None = None
    experts: list[int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def classify(name: str) -> tuple[str, int | None, int | None]:
    """(role, layer, expert) of a tensor name. Only canonical names are expert/router tensors."""
    m = _EXPERT_RE.match(name)
    if m:
        return "experts", int(m.group(1)), int(m.group(2))
    m = _ROUTER_RE.match(name)
    if m:
        return "router", int(m.group(1)), None
    m = _LAYER_RE.match(name)
    return "dense", (int(m.group(1)) if m else None), None


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[PlannedShard]:
    """Assign every stored tensor to a shard. Deterministic: same specs, same plan."""
    stored = [s for s in specs if s.alias_of is None]
    small: list[TensorSpec] = []
    by_expert: dict[int, dict[int, list[TensorSpec]]] = defaultdict(lambda: defaultdict(list))
    for spec in stored:
        role, layer, expert = classify(spec.name)
        if role == "experts":
            by_expert[expert][layer].append(spec)
        else:
            small.append(spec)

    shards: list[PlannedShard] = []
    current: PlannedShard | None = None
    for spec in small:
        if current is None or (current.tensors and current.nbytes + spec.nbytes > max_shard_bytes):
            current = PlannedShard(f"dense-{len(shards):05d}.safetensors", "dense")
            shards.append(current)
        current.tensors.append(spec)
    for shard in shards:
        roles = {classify(t.name)[0] for t in shard.tensors}
        shard.role = "router" if roles == {"router"} else "dense" if "router" not in roles \
            else "mixed"

    # Group whole experts into ranges whose bytes (all layers) fit the cap; an expert that alone
    # exceeds the cap is split by layer range.
    groups: list[list[int]] = []
    group_bytes = 0
    for expert in sorted(by_expert):
        size = sum(t.nbytes for layer in by_expert[expert].values() for t in layer)
        if groups and group_bytes + size <= max_shard_bytes:
            groups[-1].append(expert)
            group_bytes += size
        else:
            groups.append([expert])
            group_bytes = size
    for group in groups:
        layer_ids = sorted({layer for e in group for layer in by_expert[e]})
        part: PlannedShard | None = None
        for layer in layer_ids:
            specs_here = [t for e in group for t in by_expert[e].get(layer, [])]
            size = sum(t.nbytes for t in specs_here)
            if part is None or (part.tensors and part.nbytes + size > max_shard_bytes):
                part = PlannedShard(
                    f"experts-{group[0]:05d}-{group[-1]:05d}-{len(shards):05d}.safetensors",
                    "experts", experts=[group[0], group[-1]], layers=[layer, layer])
                shards.append(part)
            part.tensors.extend(specs_here)
            part.layers[1] = layer
    # Within a shard, tensors keep the caller's order: a converter that plans in the order it
    # will write gets purely sequential writes (and hashing while writing) in every file.
    order = {id(s): i for i, s in enumerate(specs)}
    for shard in shards:
        shard.tensors.sort(key=lambda t: order[id(t)])
    return shards
