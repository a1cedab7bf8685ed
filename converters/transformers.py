"""transformers checkpoints <-> SEIF, family by family, exact.

A transformers checkpoint is a directory with `config.json` and safetensors file(s)
(`model.safetensors`, or shards listed in `model.safetensors.index.json`). This module reads the
files, never the live model: `save_pretrained` in transformers 5.x writes the *published*
per-expert names (e.g. Mixtral `block_sparse_moe.experts.{e}.w1.weight`), not the stacked
in-memory `gate_up_proj`, and the files are what users have.

Families are described declaratively in :data:`FAMILIES`: where a layer's MoE block lives, the
source names of its router / expert / shared-expert tensors, which decoder layers are MoE, and a
function of the config giving the routing descriptor. Every routing fact was read off the
installed transformers modeling code (5.24) and is checked by `tests/test_transformers.py`
against transformers' own MoE block forward.

Tensors are streamed as raw bytes (each file's safetensors header parsed with
`seif.shardfile.read_header`, bytes read with `os.pread`), so bf16 / fp8 pass through bit for bit
and the model is never materialised. Importing this module needs neither torch nor transformers;
transformers is imported (for `AutoConfig`, which applies each family's defaults and attribute
maps) only when a conversion runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seif import dtypes
from seif.errors import ConversionError, FormatError, SeifError
from seif.layout import TensorSpec
from seif.manifest import FFNSpec, LayerSpec, ModelInfo, RoutingSpec, SharedExpertsSpec, Training
from seif.progress import byte_progress
from seif.shardfile import read_header

__all__ = ["FAMILIES", "Family", "from_seif", "register", "supported_families", "to_seif"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3   # what save_pretrained uses (5GB)
COPY_CHUNK = 64 * 1024 * 1024           # bounded memory when copying a large tensor


# --------------------------------------------------------------------------- config helpers
def _activation(cfg: Any) -> str:
    """transformers' `hidden_act` -> the SEIF gated activation (experts are act(gate) * up)."""
    act = getattr(cfg, "hidden_act", "silu")
    table = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu",
             "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh"}
    if act not in table:
        raise ConversionError(f"hidden_act {act!r} has no SEIF activation yet "
                              f"(supported: {', '.join(table)})")
    return table[act]


def _training(cfg: Any) -> Training:
    jitter = float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0)
    return Training(noise="jitter" if jitter > 0 else "none", noise_std=jitter,
                    aux_loss_coef=float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0))


def _softmax_topk(cfg: Any, *, renormalize: bool | None = None) -> RoutingSpec:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax (fp32) over all experts, top-k, the k
    probabilities renormalized to sum 1 when `norm_topk_prob` (Mixtral: always), no epsilon."""
    norm = bool(cfg.norm_topk_prob) if renormalize is None else renormalize
    return RoutingSpec(kind="topk", top_k=int(cfg.num_experts_per_tok), scoring="softmax",
                       normalize="sum" if norm else "none", training=_training(cfg))


def _deepseek_v3_routing(cfg: Any) -> RoutingSpec:
    """DeepseekV3TopkRouter: fp32 logits, sigmoid scores; choice = scores +
    e_score_correction_bias; group score = sum of the top-2 choice scores per group; keep
    `topk_group` groups, the rest masked to -inf; top-k of the choice; weights = unbiased scores
    at the chosen experts; if norm_topk_prob: / (sum + 1e-20); then x routed_scaling_factor
    (applied whether or not norm_topk_prob)."""
    norm = bool(cfg.norm_topk_prob)
    return RoutingSpec(kind="group_topk", top_k=int(cfg.num_experts_per_tok), scoring="sigmoid",
                       selection_bias=True, normalize="sum" if norm else "none",
                       epsilon=1e-20 if norm else 0.0, epsilon_rule="add",
                       scale=float(cfg.routed_scaling_factor), n_group=int(cfg.n_group),
                       topk_group=int(cfg.topk_group), group_score="top2_sum",
                       group_mask="neg_inf", training=_training(cfg))


def _deepseek_v2_routing(cfg: Any) -> RoutingSpec:
    """DeepseekV2TopkRouter: fp32 logits, softmax scores; topk_method "greedy": plain top-k;
    "group_limited_greedy": group score = max score in the group, keep `topk_group` groups, the
    rest masked to 0.0; weights = the scores, never renormalized (norm_topk_prob is ignored by
    the installed code), x routed_scaling_factor."""
    method = cfg.topk_method
    common = dict(top_k=int(cfg.num_experts_per_tok), scoring="softmax", normalize="none",
                  scale=float(cfg.routed_scaling_factor), training=_training(cfg))
    if method == "greedy":
        return RoutingSpec(kind="topk", **common)
    if method == "group_limited_greedy":
        return RoutingSpec(kind="group_topk", n_group=int(cfg.n_group),
                           topk_group=int(cfg.topk_group), group_score="max", group_mask="zero",
                           **common)
    raise ConversionError(f"deepseek_v2 topk_method {method!r} is not supported yet (the "
                          "installed transformers defines greedy and group_limited_greedy)")


def _no_mlp_bias(cfg: Any) -> None:
    if getattr(cfg, "mlp_bias", False):
        raise ConversionError("mlp_bias=True is not supported yet: the shared expert would carry "
                              "biases the routed experts do not")


def _qwen_sparse_layer(cfg: Any, layer: int) -> bool:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: MoE iff not in mlp_only_layers and
    num_experts > 0 and (layer + 1) % decoder_sparse_step == 0."""
    return (layer not in (cfg.mlp_only_layers or [])) and cfg.num_experts > 0 \
        and (layer + 1) % cfg.decoder_sparse_step == 0


_GATE_UP_DOWN = {"gate": "experts.{e}.gate_proj", "up": "experts.{e}.up_proj",
                 "down": "experts.{e}.down_proj"}
_SHARED_GATE_UP_DOWN = {"gate": "{p}.gate_proj", "up": "{p}.up_proj", "down": "{p}.down_proj"}


@dataclass(frozen=True)
class Family:
    """How one transformers model_type lays out and routes its MoE layers.

    Source names are `{block}.{pattern}.{weight|bias}`, `block` being `block.format(l=layer)`.
    `experts` maps SEIF projections to patterns with `{e}`; `shared` to patterns with `{p}`
    (= shared_module). The callables take the transformers config object (AutoConfig).
    """

    model_type: str
    block: str
    num_experts: Callable[[Any], int]
    routing: Callable[[Any], RoutingSpec]
    expert_ffn: Callable[[Any], FFNSpec]
    is_moe_layer: Callable[[Any, int], bool] = lambda cfg, layer: True
    router: str = "gate"
    experts: dict[str, str] = field(default_factory=lambda: dict(_GATE_UP_DOWN))
    router_bias: str | None = None            # full tensor suffix, e.g. "gate.bias"
    selection_bias: str | None = None         # e.g. "gate.e_score_correction_bias"
    shared_module: str | None = None
    shared: dict[str, str] = field(default_factory=lambda: dict(_SHARED_GATE_UP_DOWN))
    shared_ffn: Callable[[Any], FFNSpec] | None = None
    shared_gate: str | None = None            # full tensor suffix, [1, H]
    notes: str = ""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(
        model_type="mixtral",
        block="model.layers.{l}.block_sparse_moe",
        num_experts=lambda c: c.num_local_experts,
        routing=lambda c: _softmax_topk(c, renormalize=True),
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        experts={"gate": "experts.{e}.w1", "up": "experts.{e}.w3", "down": "experts.{e}.w2"},
        notes="softmax, top-k, always renormalized",
    ),
    Family(
        model_type="qwen2_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_qwen_sparse_layer,
        shared_module="shared_expert",
        shared_ffn=lambda c: FFNSpec(c.shared_expert_intermediate_size, _activation(c)),
        shared_gate="shared_expert_gate.weight",
        notes="softmax, top-k, norm_topk_prob; shared expert x sigmoid(shared gate); "
              "decoder_sparse_step, mlp_only_layers",
    ),
    Family(
        model_type="qwen3_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=_qwen_sparse_layer,
        notes="softmax, top-k, norm_topk_prob; decoder_sparse_step, mlp_only_layers",
    ),
    Family(
        model_type="olmoe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.num_experts,
        routing=_softmax_topk,
        expert_ffn=lambda c: FFNSpec(c.intermediate_size, _activation(c)),
        notes="softmax, top-k, norm_topk_prob (default off)",
    ),
    Family(
        model_type="deepseek_v3",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.n_routed_experts,
        routing=_deepseek_v3_routing,
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: layer >= c.first_k_dense_replace,
        selection_bias="gate.e_score_correction_bias",
        shared_module="shared_experts",
        shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts,
                                     _activation(c)),
        notes="sigmoid, group-limited top-k (top-2 sum, -inf mask), selection bias, "
              "norm_topk_prob (+1e-20), routed_scaling_factor; first_k_dense_replace; "
              "n_shared_experts as one MLP of moe_intermediate_size * n_shared_experts",
    ),
    Family(
        model_type="glm4_moe",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.n_routed_experts,
        routing=_deepseek_v3_routing,      # Glm4MoeTopkRouter is DeepseekV3TopkRouter verbatim
        expert_ffn=lambda c: FFNSpec(c.moe_intermediate_size, _activation(c)),
        is_moe_layer=lambda c, layer: layer >= c.first_k_dense_replace,
        selection_bias="gate.e_score_correction_bias",
        shared_module="shared_experts",
        shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts,
                                     _activation(c)),
        notes="as deepseek_v3",
    ),
    Family(
        model_type="deepseek_v2",
        block="model.layers.{l}.mlp",
        num_experts=lambda c: c.n_routed_experts,
        routing=_deepseek_v2_routing,
        expert_ffn=lambda c: (_no_mlp_bias(c), FFNSpec(c.moe_intermediate_size,
                                                       _activation(c)))[1],
        is_moe_layer=lambda c, layer: layer >= c.first_k_dense_replace,
        shared_module="shared_experts",
        shared_ffn=lambda c: FFNSpec(c.moe_intermediate_size * c.n_shared_experts,
                                     _activation(c)),
        notes="softmax; greedy top-k or group-limited (group max, masked to 0); never "
              "renormalized; routed_scaling_factor; first_k_dense_replace; shared experts",
    ),
)}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def _family(config: dict, where: str) -> Family:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConversionError("config.json has no model_type", path=where)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConversionError(
            f"family {model_type!r} is not supported yet: no verified SEIF mapping of its MoE "
            f"layout and routing (supported: {', '.join(supported_families())})", path=where)
    return family


# --------------------------------------------------------------------------- source files
@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int     # absolute file offset
    nbytes: int


def _source_files(root: Path) -> list[Path]:
    index = root / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"bad safetensors index: {exc}", path=str(index)) from None
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith("."):
                raise FormatError(f"index names an unsafe shard file {f!r}", path=str(index))
        return [root / f for f in files]
    single = root / SAFETENSORS_SINGLE
    if single.exists():
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise ConversionError("only safetensors checkpoints are read (pickle files can run code); "
                              "re-save with save_pretrained(safe_serialization=True)",
                              path=str(root))
    raise ConversionError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}", path=str(root))


def _read_sources(root: Path) -> dict[str, _Source]:
    """Every tensor of the checkpoint, in file order then offset order."""
    out: dict[str, _Source] = {}
    for path in _source_files(root):
        if not path.is_file():
            raise ConversionError("shard listed in the index is missing", path=str(path))
        with open(path, "rb") as fh:
            header = read_header(fh, os.fstat(fh.fileno()).st_size, str(path))
        for name, e in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
            if name in out:
                raise FormatError("tensor appears in two shards", path=str(path), field=name)
            out[name] = _Source(name, path, e.dtype, tuple(e.shape), header.data_start + e.begin,
                                e.end - e.begin)
    return out


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise FormatError("unexpected end of file", field=what)
        got += n
    return buf


# --------------------------------------------------------------------------- transformers -> SEIF
def _layer_map(family: Family, cfg: Any, sources: dict[str, _Source], root: Path
               ) -> tuple[list[LayerSpec], dict[str, str]]:
    """The MoE layer descriptors and source name -> canonical name for their tensors."""
    H = int(cfg.hidden_size)
    layers: list[LayerSpec] = []
    rename: dict[str, str] = {}
    n_layers = int(cfg.num_hidden_layers)
    for li in range(n_layers):
        block = family.block.format(l=li)
        router = f"{block}.{family.router}.weight"
        if not family.is_moe_layer(cfg, li):
            if router in sources or any(n.startswith(f"{block}.experts.") for n in sources):
                raise ConversionError(f"layer {li} should be dense per the config, but the "
                                      f"checkpoint has MoE tensors under {block}", path=str(root))
            continue
        E = int(family.num_experts(cfg))
        routing = family.routing(cfg)
        routing.router_bias = family.router_bias is not None
        ffn = family.expert_ffn(cfg)
        shared = None
        if family.shared_module is not None:
            shared = SharedExpertsSpec(1, family.shared_ffn(cfg), family.shared_gate is not None)
        layer = LayerSpec(li, E, H, routing, ffn, shared, source_prefix=block)
        try:
            routing.check(f"layer {li} routing", E)
        except SeifError as exc:
            raise ConversionError(f"config gives an invalid routing for layer {li}: "
                                  f"{exc.one_line()}", path=str(root)) from None
        mapping = {router: layer.router_name()}
        if family.router_bias:
            mapping[f"{block}.{family.router_bias}"] = layer.router_name("bias")
        if family.selection_bias:
            mapping[f"{block}.{family.selection_bias}"] = layer.router_name("selection_bias")
        parts = ("weight", "bias") if ffn.bias else ("weight",)
        for e in range(E):
            for proj in ffn.projections:
                for part in parts:
                    src = f"{block}.{family.experts[proj].format(e=e)}.{part}"
                    mapping[src] = layer.expert_name(e, proj, part)
        if shared is not None:
            sparts = ("weight", "bias") if shared.ffn.bias else ("weight",)
            for proj in shared.ffn.projections:
                for part in sparts:
                    src = f"{block}.{family.shared[proj].format(p=family.shared_module)}.{part}"
                    mapping[src] = layer.shared_name(0, proj, part)
            if shared.gate:
                mapping[f"{block}.{family.shared_gate}"] = layer.shared_gate_name()
        missing = [s for s in mapping if s not in sources]
        if missing:
            stacked = [n for n in sources if n.startswith(f"{block}.experts.")
                       and n.endswith(("gate_up_proj", "down_proj"))]
            hint = " (stacked expert tensors are not read yet)" if stacked else ""
            raise ConversionError(f"layer {li} lacks {len(missing)} MoE tensors the "
                                  f"{family.model_type} layout needs, e.g. {missing[0]}{hint}",
                                  path=str(root))
        # Any other tensor under the experts' prefix (quantization scales, ...) is unexplained.
        extra = [n for n in sources if n.startswith(f"{block}.experts.") and n not in mapping]
        if extra:
            raise ConversionError(f"layer {li} has expert tensors this converter does not map "
                                  f"yet, e.g. {extra[0]}", path=str(root))
        layers.append(layer)
        rename.update(mapping)
    return layers, rename


def to_seif(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            dtype: str | None = None, show_progress: bool | None = None,
            max_shard_bytes: int | None = None, resume: bool = False, keep_partial: bool = True,
            **options) -> Path:
    """Convert a transformers checkpoint directory `src` into the SEIF checkpoint `dst`.

    With `resume`, shards an interrupted run finished are verified and reused (their source
    bytes are not even read)."""
    from seif.writer import CheckpointWriter

    if options:
        raise ConversionError(f"options not supported for transformers -> seif: "
                              f"{', '.join(options)}")
    if dtype is not None:
        raise ConversionError("--dtype is not supported for transformers -> seif yet; convert, "
                              "then cast with seif -> seif --dtype")
    root = Path(src)
    config_path = root / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read config.json: {exc}", path=str(config_path)) from None
    if not isinstance(config, dict):
        raise ConversionError("config.json is not an object", path=str(config_path))
    family = _family(config, str(config_path))     # refuse before touching anything else
    sources = _read_sources(root)

    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(root))
    layers, rename = _layer_map(family, cfg, sources, root)

    canonical = set(rename.values())
    specs: list[TensorSpec] = []
    for s in sources.values():
        name = rename.get(s.name, s.name)
        if s.name not in rename and name in canonical:
            raise ConversionError("a dense tensor has a canonical SEIF name", field=s.name)
        specs.append(TensorSpec(name, s.dtype, s.shape, source_name=s.name))
    archs = config.get("architectures") or [None]
    model = ModelInfo(source_framework="transformers", architecture=archs[0],
                      model_type=family.model_type, source_config=config)
    total = sum(s.nbytes for s in sources.values())
    with byte_progress(total, "converting", show_progress) as advance:
        extra = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
        writer = CheckpointWriter(dst, layers, model=model, overwrite=overwrite,
                                  progress=advance, resume=resume, keep_partial=keep_partial,
                                  **extra)
        with writer:
            writer.plan(specs)
            fds: dict[Path, int] = {}
            try:
                for spec, s in zip(specs, sources.values()):
                    if not writer.needs(spec.name):
                        continue
                    fd = fds.get(s.path)
                    if fd is None:
                        fd = fds[s.path] = os.open(s.path, os.O_RDONLY)
                    writer.write(spec.name, _pread_exact(fd, s.nbytes, s.offset, s.name))
            finally:
                for fd in fds.values():
                    os.close(fd)
    return Path(dst)


# --------------------------------------------------------------------------- SEIF -> transformers
def _st_header(entries: list[tuple[str, str, list[int], int]]) -> tuple[bytes, int]:
    """A safetensors header for (name, dtype, shape, nbytes) in order; (bytes, data size)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    cursor = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, cursor


def from_seif(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
              dtype: str | None = None, show_progress: bool | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> Path:
    """Write the SEIF checkpoint `src` back as a transformers directory `dst`: config.json
    verbatim, every tensor under its source name with its stored bytes unchanged."""
    from seif.reader import Checkpoint

    if options:
        raise ConversionError(f"options not supported for seif -> transformers: "
                              f"{', '.join(options)}")
    if dtype is not None:
        raise ConversionError("--dtype is not supported for seif -> transformers yet")
    out = Path(dst)
    if out.exists() and not overwrite:
        raise ConversionError("destination exists (pass overwrite=True / --overwrite)",
                              path=str(out))
    with Checkpoint(src) as ckpt:
        m = ckpt.manifest
        if m.model.source_framework != "transformers" or not m.model.source_config:
            raise ConversionError("this SEIF checkpoint was not converted from transformers "
                                  f"(source_framework {m.model.source_framework!r}, no "
                                  "source_config); cannot rebuild a transformers directory",
                                  path=str(src))
        family = m.model.model_type or m.model.source_config.get("model_type")
        if family not in FAMILIES:
            raise ConversionError(f"family {family!r} is not supported yet", path=str(src))
        items: list[tuple[str, str, str, list[int], int]] = []   # seif, out, dtype, shape, n
        seen: set[str] = set()
        for name, entry in m.tensors.items():
            target = entry.source_name or name
            if target in seen:
                raise ConversionError("two tensors map to the same source name", field=target)
            seen.add(target)
            stored = m.resolve(name)
            items.append((name, target, stored.dtype, list(stored.shape),
                          dtypes.itemsize(stored.dtype) * _numel(stored.shape)))
        shards: list[list[tuple[str, str, str, list[int], int]]] = [[]]
        size = 0
        for item in items:
            if shards[-1] and size + item[4] > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += item[4]
        names = ([SAFETENSORS_SINGLE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))])
        tmp = out.parent / f"{out.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            total = sum(i[4] for i in items)
            with byte_progress(total, "exporting", show_progress) as advance:
                for file, shard in zip(names, shards):
                    header, _ = _st_header([(t, d, s, n) for _, t, d, s, n in shard])
                    with open(tmp / file, "wb") as fh:
                        fh.write(header)
                        for name, _, _, _, n in shard:
                            sh, offset, length = ckpt.stored_bytes(name)
                            assert length == n
                            done = 0
                            while done < length:
                                step = min(COPY_CHUNK, length - done)
                                fh.write(_pread_exact(sh.fd, step, offset + done, name))
                                done += step
                                advance(step)
                        fh.flush()
                        os.fsync(fh.fileno())
            if len(shards) > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {t: f for f, sh in zip(names, shards)
                                        for _, t, _, _, _ in sh}}
                (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(
                json.dumps(m.model.source_config, indent=2, sort_keys=True) + "\n")
            if out.exists():
                old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def register() -> None:
    from seif.convert import register as add
    add("transformers", "seif", to_seif)
    add("seif", "transformers", from_seif)
