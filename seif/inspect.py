"""A summary of a checkpoint, from its manifest alone (no tensor bytes are read).

`summarize()` is what `seif inspect --json` prints; its keys are documented in the README and
scripts rely on them, so add keys freely but never rename or remove one within SEIF 1.x.
"""

from __future__ import annotations

from collections import Counter

from .layout import classify
from .reader import Checkpoint


def summarize(ckpt: Checkpoint) -> dict:
    m = ckpt.manifest
    per_expert_bytes: Counter = Counter()
    expert_dtypes: dict[int, set] = {}
    tensors_per_shard: Counter = Counter()
    dense_bytes = dense_count = 0
    # SEIF 1.1 layer output biases are MoE tensors, not dense ones, though layout files them
    # with the small (router/dense) tensors.
    layer_tensors = {layer.output_bias_name() for layer in m.layers if layer.output_bias}
    for name, t in m.tensors.items():
        stored = m.resolve(name)
        tensors_per_shard[stored.shard] += 0 if t.alias_of else 1
        role, layer, expert = classify(name)
        if role == "experts":
            if not t.alias_of:
                per_expert_bytes[(layer, expert)] += t.nbytes
            expert_dtypes.setdefault(layer, set()).add(t.dtype)
        elif role == "dense" and name not in layer_tensors:
            dense_count += 1
            dense_bytes += 0 if t.alias_of else t.nbytes
    layers = []
    for layer in m.layers:
        sizes = [per_expert_bytes[(layer.index, e)] for e in range(layer.num_experts)]
        r = layer.routing
        layers.append({
            "index": layer.index,
            "num_experts": layer.num_experts,
            "top_k": r.top_k,
            "routing_kind": r.kind,
            "scoring": r.scoring,
            "normalize": r.normalize,
            "scale": r.scale,
            "activation": layer.experts.activation,
            "hidden_size": layer.hidden_size,
            "intermediate_size": layer.experts.intermediate_size,
            "shared_experts": layer.shared_experts.count if layer.shared_experts else 0,
            "expert_dtypes": sorted(expert_dtypes.get(layer.index, ())),
            "router_dtype": m.tensors[layer.router_name()].dtype,
            "bytes_per_expert": max(sizes) if sizes else 0,
            "expert_ids": layer.expert_ids,
            "output_bias": layer.output_bias,
        })
    return {
        "path": str(ckpt.path),
        "seif_version": m.seif_version,
        "required_features": sorted(m.required_features),
        "model": {k: v for k, v in m.model.to_dict().items() if k != "source_config"},
        "num_tensors": len(m.tensors),
        "total_bytes": sum(s.size for s in m.shards),
        "dense": {"tensors": dense_count, "bytes": dense_bytes},
        "layers": layers,
        "layout": m.layout.to_dict(),
        "shards": [{"file": s.file, "role": s.role, "size": s.size, "layers": s.layers,
                    "experts": s.experts, "tensors": tensors_per_shard[s.file]}
                   for s in m.shards],
    }


def make_console():
    """A rich console for stdout; when piped (logs, CI) it is 140 columns wide instead of
    rich's 80, so the tables stay readable."""
    import sys

    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 140)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(s: dict, console=None) -> None:
    """Render `summarize()` output as rich tables."""
    from rich.table import Table

    console = console or make_console()
    model = s["model"]
    console.print(f"[bold]{s['path']}[/]  SEIF {s['seif_version']}  "
                  f"{model.get('architecture') or model.get('source_framework')}  "
                  f"{s['num_tensors']} tensors, {human_bytes(s['total_bytes'])}  "
                  f"features: {', '.join(s['required_features']) or 'none'}")
    table = Table(title="MoE layers")
    for col in ("layer", "experts", "top-k", "routing", "scoring", "normalize", "activation",
                "H x I", "shared", "out bias", "dtypes", "bytes/expert"):
        table.add_column(col)
    for x in s["layers"]:
        table.add_row(str(x["index"]), str(x["num_experts"]), str(x["top_k"]),
                      x["routing_kind"], x["scoring"], x["normalize"], x["activation"],
                      f"{x['hidden_size']}x{x['intermediate_size']}", str(x["shared_experts"]),
                      "yes" if x["output_bias"] else "-", ",".join(x["expert_dtypes"]),
                      human_bytes(x["bytes_per_expert"]))
    console.print(table)
    shards = Table(title=f"Shards (policy {s['layout']['policy']})")
    for col in ("file", "role", "layers", "experts", "tensors", "size"):
        shards.add_column(col)
    for sh in s["shards"]:
        rng = lambda r: "-" if r is None else f"{r[0]}..{r[1]}"  # noqa: E731
        shards.add_row(sh["file"], sh["role"], rng(sh["layers"]), rng(sh["experts"]),
                       str(sh["tensors"]), human_bytes(sh["size"]))
    console.print(shards)
    console.print(f"dense tensors: {s['dense']['tensors']} ({human_bytes(s['dense']['bytes'])})")
