"""Synthetic transformers checkpoints of any size, with real family layouts, for benchmarks.

A tiny model of the family is built from its config class and saved with `save_pretrained`, so
the tensor names are exactly what transformers writes; its dimensions are distinct small
numbers, which lets each tiny shape be scaled to the benchmark's dimensions by value. The big
checkpoint is then written shard by shard (float16, deterministic content), never whole in memory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

# tiny value -> which benchmark dimension it stands for: distinct from each other and from any
# expert count used, so a tiny shape maps to the big one by value
TINY = {"hidden": 24, "inter": 40, "moe_inter": 28, "vocab": 97, "heads": 3, "head_dim": 6}


def _family_config(family: str, dims: dict):
    if family == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(hidden_size=dims["hidden"], intermediate_size=dims["moe_inter"],
                             num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                             num_key_value_heads=dims["heads"], head_dim=dims["head_dim"],
                             num_local_experts=dims["experts"], num_experts_per_tok=2,
                             vocab_size=dims["vocab"], tie_word_embeddings=False)
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config
        return DeepseekV3Config(hidden_size=dims["hidden"], intermediate_size=dims["inter"],
                                moe_intermediate_size=dims["moe_inter"],
                                num_hidden_layers=dims["layers"],
                                num_attention_heads=dims["heads"],
                                num_key_value_heads=dims["heads"], n_routed_experts=dims["experts"],
                                num_experts_per_tok=6, n_group=8, topk_group=4,
                                n_shared_experts=2, first_k_dense_replace=1,
                                q_lora_rank=None, kv_lora_rank=dims["head_dim"],
                                qk_rope_head_dim=dims["head_dim"], v_head_dim=dims["head_dim"],
                                qk_nope_head_dim=dims["head_dim"], vocab_size=dims["vocab"],
                                tie_word_embeddings=False)
    raise ValueError(f"unknown family {family}")


def _layout(family: str, layers: int, experts: int) -> tuple[dict, dict[str, tuple]]:
    """(config.json dict of the tiny model, name -> tiny shape) as save_pretrained writes them."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    dims = dict(TINY, layers=layers, experts=experts)
    config = _family_config(family, dims)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        shapes = {}
        with safe_open(str(Path(tmp) / "model.safetensors"), framework="numpy") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    return cfg, shapes


def write_checkpoint(out: Path, family: str, *, hidden: int, inter: int, moe_inter: int,
                     layers: int, experts: int, vocab: int = 32000, heads: int = 16,
                     head_dim: int = 64, shard_bytes: int = 1 << 30) -> int:
    """Write a sharded float16 checkpoint of `family` at the given size; returns its bytes."""
    from safetensors.numpy import save_file

    cfg, shapes = _layout(family, layers, experts)
    big = {"hidden": hidden, "inter": inter, "moe_inter": moe_inter, "vocab": vocab,
           "heads": heads, "head_dim": head_dim}
    scale = {TINY[k]: big[k] for k in TINY}
    scale[2 * TINY["moe_inter"]] = 2 * moe_inter  # DeepSeek-V3's 2 shared experts, fused
    for key, tiny_value in (("hidden_size", "hidden"), ("intermediate_size", "inter"),
                            ("moe_intermediate_size", "moe_inter"), ("vocab_size", "vocab"),
                            ("num_attention_heads", "heads"), ("num_key_value_heads", "heads"),
                            ("head_dim", "head_dim"), ("kv_lora_rank", "head_dim"),
                            ("qk_rope_head_dim", "head_dim"), ("v_head_dim", "head_dim"),
                            ("qk_nope_head_dim", "head_dim")):
        if key in cfg and cfg[key] is not None:
            cfg[key] = big[tiny_value] if not (family == "mixtral" and key ==
                                               "intermediate_size") else moe_inter
    cfg["torch_dtype"] = "float16"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    shard_size = total = 0
    files: list[list[str]] = []

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(list(shard))
            for k in shard:
                weight_map[k] = name
            shard, shard_size = {}, 0

    for i, (name, tiny_shape) in enumerate(shapes.items()):
        shape = tuple(scale.get(d, d) for d in tiny_shape)
        array = np.full(shape, np.float16(0.001 * (i % 997)), dtype=np.float16)
        if shard_size + array.nbytes > shard_bytes:
            flush()
        shard[name] = array
        shard_size += array.nbytes
        total += array.nbytes
    flush()
    count = len(files)
    renamed = {}
    for n, _ in enumerate(files, 1):  # model-0000n-of-0000N naming, as transformers writes
        old = out / f"model-{n:05d}.safetensors"
        new = f"model-{n:05d}-of-{count:05d}.safetensors"
        old.rename(out / new)
        renamed[old.name] = new
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total
