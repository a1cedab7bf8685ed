"""`seif demo`: the whole core on a small built-in model, from a seed, with no download.

It builds three MoE layers that exercise the routing features real families differ in
(Mixtral-style softmax top-2; DeepSeek-V3-style sigmoid, biased group-limited top-k, scaling
and a shared expert; gpt-oss-style top-k on biased logits, softmax over the k, clamped SwiGLU
with biases), writes them as a SEIF checkpoint, and then uses it the way a user would.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .manifest import FFNSpec, LayerSpec, ModelInfo, RoutingSpec, SharedExpertsSpec

HIDDEN = 64


def demo_layers() -> list[LayerSpec]:
    return [
        LayerSpec(0, 8, HIDDEN, RoutingSpec("topk", 2, "softmax", normalize="sum"),
                  FFNSpec(128, "swiglu")),
        LayerSpec(1, 16, HIDDEN,
                  RoutingSpec("group_topk", 4, "sigmoid", selection_bias=True, normalize="sum",
                              epsilon=1e-20, scale=2.5, n_group=4, topk_group=2,
                              group_score="top2_sum", group_mask="neg_inf"),
                  FFNSpec(96, "swiglu"), SharedExpertsSpec(1, FFNSpec(128, "swiglu"))),
        LayerSpec(2, 8, HIDDEN, RoutingSpec("topk", 2, "softmax_topk", router_bias=True),
                  FFNSpec(128, "swiglu_oai", bias=True)),
    ]


def demo_tensors(layers: list[LayerSpec], seed: int) -> dict[str, np.ndarray]:
    """Canonical name -> weights; the LM head is tied to the embedding (stored once)."""
    from .moe import random_layer_params

    rng = np.random.default_rng(seed)
    embed = (rng.standard_normal((256, HIDDEN)) * 0.02).astype(np.float32)
    tensors = {"model.embed_tokens.weight": embed}
    for layer in layers:
        tensors.update(random_layer_params(layer, rng).to_tensors(layer))
    tensors["lm_head.weight"] = embed.copy()
    return tensors


def run_demo(out: Path | None, seed: int = 0) -> Path | None:
    from .convert import convert
    from .inspect import human_bytes, make_console, print_summary, summarize
    from .moe import MoEParams, moe_forward
    from .reader import Checkpoint
    from .routing import route, router_logits
    from .validate import validate
    from .writer import save

    console = make_console()
    workdir = None
    if out is None:
        workdir = tempfile.TemporaryDirectory(prefix="seif-demo-")
        out = Path(workdir.name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.seif"
    try:
        layers = demo_layers()
        tensors = demo_tensors(layers, seed)
        console.rule("[bold]1. write")
        save(path, tensors, layers, dedupe=True, overwrite=True, max_shard_bytes=512 * 1024,
             model=ModelInfo("seif", "SeifDemoForCausalLM", "seif-demo", name=f"demo seed {seed}"))
        console.print(f"wrote {path} ({len(tensors)} tensors; lm_head stored as an alias of "
                      f"the embedding)")

        console.rule("[bold]2. inspect")
        with Checkpoint(path) as ckpt:
            print_summary(summarize(ckpt), console)

        console.rule("[bold]3. validate --deep")
        report = validate(path, deep=True)
        console.print(f"ok: {report.tensors} tensors, {report.shards} shards, "
                      f"{report.checksums_verified} checksums verified")

        console.rule("[bold]4. read one expert")
        with Checkpoint(path) as ckpt:
            expert = ckpt.expert(1, 5)
            layer_bytes = sum(t.nbytes for n, t in ckpt.manifest.tensors.items()
                              if n.startswith("layers.1."))
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in expert.items())
            console.print(f"expert 5 of layer 1: {shapes} -> {human_bytes(ckpt.bytes_read)} "
                          f"read (incl. one shard header) "
                          f"of the layer's {human_bytes(layer_bytes)}")

        console.rule("[bold]5. reference forward")
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal((32, HIDDEN)).astype(np.float32)
        with Checkpoint(path) as ckpt:
            for layer in layers:
                params = ckpt.moe_params(layer.index, verify=True)
                y = moe_forward(x, layer, params)
                again = moe_forward(x, layer, MoEParams.from_tensors(layer, tensors.__getitem__))
                r = layer.routing
                sel = route(router_logits(x, params.router_weight, params.router_bias), r,
                            params.selection_bias)
                load = np.bincount(sel.indices.ravel(), minlength=layer.num_experts)
                console.print(f"layer {layer.index} ({r.kind}, {r.scoring}, k={r.top_k}): "
                              f"out {list(y.shape)} |y|={np.linalg.norm(y):.4f}; "
                              f"tokens per expert {load.tolist()}; "
                              f"checkpoint vs in-memory max|diff| "
                              f"{float(np.max(np.abs(y - again))):.1e}")

        console.rule("[bold]6. cut to experts 0-3 (a device that serves only those)")
        subset = out / "demo-experts-0-3.seif"
        convert(path, subset, experts="0-3", overwrite=True)
        with Checkpoint(subset) as small:
            layer = small.layer(1)
            console.print(f"{subset.name}: layer 1 now has {layer.num_experts} experts "
                          f"(source ids {layer.expert_ids}), n_group={layer.routing.n_group}, "
                          f"router {list(small.tensor(layer.router_name()).shape)}; "
                          f"{human_bytes(sum(s.size for s in small.manifest.shards))} vs "
                          f"{human_bytes(report.bytes)}")
        _transformers_leg(out, seed, console)
        _jax_leg(path, layers, x, console)
        _onnx_leg(path, out, layers, x, console)
        console.rule()
        kept = path if workdir is None else "(temporary; use --out DIR to keep it)"
        console.print(f"demo checkpoint: {kept}")
        return None if workdir else path
    finally:
        if workdir is not None:
            workdir.cleanup()


# Tiny transformers models of two families that differ in every routing detail. Sizes are small
# so the demo runs in seconds on a laptop CPU; the weights are random, drawn from the seed.
_HF_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=64, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_HF_FAMILIES = {
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, head_dim=8),
}


def _transformers_leg(out: Path, seed: int, console) -> None:
    """transformers -> SEIF -> transformers for two families, then `seif verify` against
    transformers' own MoE blocks. Skipped (with the reason) without the torch extra."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        console.rule("[bold]7. transformers (skipped)")
        console.print(f"install seif[torch] for this step ({exc})")
        return
    from transformers.utils import logging as hf_logging

    from .convert import convert
    from .verify import print_report, verify

    hf_logging.disable_progress_bar()
    console.rule("[bold]7. transformers -> SEIF -> transformers, verified")
    for family, extra in _HF_FAMILIES.items():
        hf = out / f"hf-{family}"
        seif_path = out / f"{family}.seif"
        back = out / f"hf-{family}-again"
        for p in (hf, seif_path, back):
            if p.exists():
                import shutil
                shutil.rmtree(p)
        torch.manual_seed(seed)
        config = AutoConfig.for_model(family, **_HF_COMMON, **extra)
        model = AutoModelForCausalLM.from_config(config).eval()
        if family == "deepseek_v3":  # give the selection bias something to do
            with torch.no_grad():
                for layer in model.model.layers[1:]:
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
        model.save_pretrained(hf)
        convert(hf, seif_path)
        convert(seif_path, back, target_format="transformers")
        again = AutoModelForCausalLM.from_pretrained(back).eval()
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            same = torch.equal(model(ids).logits, again(ids).logits)
        console.print(f"[bold]{family}[/]: {hf.name} -> {seif_path.name} -> {back.name}; "
                      f"logits after the round trip bitwise equal: {same}")
        print_report(verify(hf, seif_path), console)


def _jax_leg(path: Path, layers: list[LayerSpec], x: np.ndarray, console) -> None:
    """The same checkpoint loaded into JAX (stacked experts) and run under jax.jit."""
    try:
        import jax

        from .converters import jax as seif_jax
    except ImportError as exc:
        console.rule("[bold]8. JAX (skipped)")
        console.print(f"install seif[jax] for this step ({exc})")
        return
    from .moe import moe_forward
    from .reader import Checkpoint

    console.rule("[bold]8. JAX: load stacked experts, jit the forward")
    with Checkpoint(path) as ckpt:
        for layer in layers:
            params, spec = seif_jax.load_layer(ckpt, layer.index)
            forward = jax.jit(seif_jax.moe_apply, static_argnames="layer")
            y = np.asarray(forward(params, x, layer=seif_jax.static(spec)))
            ref = moe_forward(x, layer, ckpt.moe_params(layer.index))
            shapes = {k: list(v["kernel"].shape) for k, v in params["experts"].items()}
            console.print(f"layer {layer.index}: experts {shapes}; jit(moe_apply) vs reference "
                          f"max|diff| {float(np.max(np.abs(y - ref))):.1e}")


def _onnx_leg(path: Path, out: Path, layers: list[LayerSpec], x: np.ndarray, console) -> None:
    """Each layer exported to ONNX and run by ONNX Runtime three ways: the portable function body
    (stock ORT), the native ai.seif kernels (when `make native` built them) and the lowering to
    ORT's own com.microsoft.MoE (where it can express the layer exactly)."""
    try:
        import onnxruntime  # noqa: F401

        from .converters import onnx as seif_onnx
    except ImportError as exc:
        console.rule("[bold]9. ONNX (skipped)")
        console.print(f"install seif[onnx] for this step ({exc})")
        return
    from .convert import convert
    from .moe import moe_forward
    from .reader import Checkpoint
    from .runtime.library import library_path
    from .runtime.session import Session

    console.rule("[bold]9. ONNX: export each layer, run it in ONNX Runtime")
    lib = library_path()
    with Checkpoint(path) as ckpt:
        for layer in layers:
            ref = moe_forward(x, layer, ckpt.moe_params(layer.index))
            results = []
            for target, library in (("portable", None), ("seif-kernels", "auto"),
                                    ("ort", None)):
                if target == "seif-kernels" and lib is None:
                    results.append(f"{target}: no library (make native)")
                    continue
                refusal = seif_onnx.ort_lowering_refusal(layer) if target == "ort" else None
                if refusal:
                    results.append(f"{target}: refused ({refusal})")
                    continue
                model = out / f"layer{layer.index}-{target}.onnx"
                convert(path, model, layer=layer.index, target=target, overwrite=True)
                y = Session(model, library=library)(x)
                results.append(f"{target}: max|diff| {float(np.max(np.abs(y - ref))):.1e}")
            console.print(f"layer {layer.index}: " + "; ".join(results))
