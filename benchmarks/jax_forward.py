"""MoE layer forward in JAX on CPU: `converters.jax.moe_apply` under jit (impl="ragged_dot" and
impl="tiled") vs a dense all-experts einsum, fp32, as % of the hardware floor.

`python -m benchmarks.jax_forward [--quick] [--json FILE] [--markdown FILE]`

Same layers, weights, tokens and floor as `benchmarks.moe_forward` (see there): the floor is
`max(U * bytes_per_expert / BW, 2 * T * k * params_per_expert / peak)` with U counted from the
routing of the benchmark's input and BW / peak measured in this run (best reading; the peak is the
better of torch's and XLA's fp32 matmul rate). The dense baseline runs every expert on every token
(`einsum` over [E, T, I]) and mixes the outputs with the routing weights scattered to [T, E]: E/k
times the work, but no gather, sort or data-dependent shapes.

Compile time is timed apart (AOT `lower().compile()` per T). A call whose time, extrapolated
linearly in T from the previous T, would exceed `--max-call-s` is skipped (ragged_dot lowers on
CPU to a masked dense dot over all experts, [E, T*k, H] in memory).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.moe_forward import (
    QUICK_TOKENS,
    SHAPES,
    TOKENS,
    Flush,
    Report,
    Shape,
    load,
    machine,
    make_params,
    measure_bandwidth,
    measure_peak,
    time_call,
)

IMPLS = ("ragged_dot", "tiled", "dense")


def xla_peak(n: int = 4096, repeats: int = 3) -> float:
    """fp32 matmul rate of XLA on CPU (FLOP/s, best of repeats)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def dense_apply(params, x, layer):
    """Every expert on every token, mixed by the routing weights (the reference's routing)."""
    import jax
    import jax.numpy as jnp

    from converters.jax import route

    layer = getattr(layer, "layer", layer)          # a StaticLayer holds the LayerSpec
    xf = x.astype(jnp.float32)
    logits = jnp.matmul(xf, params["router"]["kernel"], precision="highest")
    indices, weights, _ = route(logits, layer)
    E = layer.num_experts
    mix = jnp.zeros((x.shape[0], E), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], indices].add(weights)             # [T, E]
    p = params["experts"]
    gate = jnp.einsum("th,ehi->eti", xf, p["gate"]["kernel"], precision="highest")
    up = jnp.einsum("th,ehi->eti", xf, p["up"]["kernel"], precision="highest")
    h = jax.nn.silu(gate) * up
    y = jnp.einsum("eti,eih->eth", h, p["down"]["kernel"], precision="highest")
    return jnp.einsum("te,eth->th", mix, y, precision="highest")


def jax_params(shape: Shape):
    """The layer's params pytree on the JAX CPU device, from the benchmark's random weights."""
    import jax

    from converters.jax import tensors_to_params

    layer = shape.spec()
    tensors = make_params(shape).to_tensors(layer)
    params = tensors_to_params(layer, tensors.__getitem__)
    del tensors
    return layer, jax.device_put(params)


def _touched(layer, params, x) -> int:
    import jax.numpy as jnp

    from converters.jax import route

    logits = jnp.matmul(jnp.asarray(x), params["router"]["kernel"], precision="highest")
    indices, _, _ = route(logits, layer)
    return int(np.unique(np.asarray(indices)).size)


def bench_layer(shape: Shape, tokens: Sequence[int], target_s: float, min_reps: int,
                max_call_s: float, check_tokens: int, flush: Flush) -> dict:
    import jax

    from converters.jax import moe_apply, static
    from seif.moe import MoEParams, moe_forward

    layer, params = jax_params(shape)
    fns = {"ragged_dot": jax.jit(functools.partial(moe_apply, impl="ragged_dot"),
                                 static_argnames="layer"),
           "tiled": jax.jit(functools.partial(moe_apply, impl="tiled"),
                            static_argnames="layer"),
           "dense": jax.jit(dense_apply, static_argnames="layer")}
    sl = static(layer)
    rng = np.random.default_rng(1234)
    block = {"layer": shape.name, "dtype": "fp32",
             "bytes_per_expert": shape.params_per_expert * 4,
             "flops_per_token": 2 * shape.top_k * shape.params_per_expert,
             "load_before": load(), "rows": [], "skipped": {}}

    # Agreement with the NumPy reference (seif.moe.moe_forward) on a few tokens.
    xc = rng.standard_normal((check_tokens, shape.hidden), dtype=np.float32)
    p = params["experts"]
    host = {k: np.asarray(v["kernel"]) for k, v in p.items()}
    ref_params = MoEParams(router_weight=np.asarray(params["router"]["kernel"]).T,
                           experts=[{k: host[k][e].T for k in host}
                                    for e in range(shape.experts)])
    ref = moe_forward(xc, layer, ref_params)
    del host, ref_params
    block["rel_err"] = {n: float(np.linalg.norm(np.asarray(f(params, xc, layer=sl)) - ref)
                                 / np.linalg.norm(ref)) for n, f in fns.items()}

    last: dict[str, tuple[int, float]] = {}
    for T in tokens:
        x = rng.standard_normal((T, shape.hidden), dtype=np.float32)
        row = {"T": T, "touched": _touched(layer, params, x), "times": {}, "reps": {},
               "best": {}, "compile_s": {}, "skipped": {}}
        for name, f in fns.items():
            if name in last:
                t0, s0 = last[name]
                estimate = s0 * T / t0
                if estimate > max_call_s:
                    row["skipped"][name] = estimate
                    continue
            start = time.perf_counter()
            compiled = f.lower(params, x, layer=sl).compile()
            row["compile_s"][name] = time.perf_counter() - start
            seconds, reps, best = time_call(
                lambda c=compiled, x=x: c(params, x).block_until_ready(), target_s, min_reps,
                flush=flush)
            row["times"][name], row["reps"][name], row["best"][name] = seconds, reps, best
            last[name] = (T, seconds)
        block["rows"].append(row)
    block["load_after"] = load()
    return block


def run(shapes: Sequence[Shape] = SHAPES, tokens: Sequence[int] = TOKENS, *,
        target_s: float = 1.0, min_reps: int = 2, max_call_s: float = 15.0,
        bw_bytes: int = 1 << 30, peak_n: int = 4096, check_tokens: int = 8,
        flush_bytes: int = 1 << 30, progress: Callable[[str], None] | None = None) -> dict:
    import torch

    say = progress or (lambda s: None)
    started = time.perf_counter()
    result = {"machine": machine(), "load_start": load(), "blocks": [], "hardware": [],
              "shapes": {s.name: s.describe() for s in shapes}, "flush_bytes": flush_bytes}
    flush = Flush(flush_bytes)

    def hardware():
        result["hardware"].append({"load": load(), "bandwidth": measure_bandwidth(bw_bytes),
                                   "peak_torch": measure_peak(torch.float32, peak_n),
                                   "peak_xla": xla_peak(peak_n)})

    import jax

    result["machine"]["versions"]["jax"] = jax.__version__
    for shape in shapes:
        hardware()
        say(f"{shape.describe()} fp32 (load {load():.2f})")
        result["blocks"].append(bench_layer(shape, tokens, target_s, min_reps, max_call_s,
                                            check_tokens, flush))
    hardware()
    hw = result["hardware"]
    result["bandwidth"] = max(h["bandwidth"] for h in hw)
    result["peak"] = {"fp32": max(max(h["peak_torch"], h["peak_xla"]) for h in hw)}
    result["load_end"] = load()
    result["seconds"] = time.perf_counter() - started
    return result


# =========================================================================== output
COLUMNS = ("T", "U", "floor ms", "bound", *[f"{n} ms" for n in IMPLS],
           *[f"{n} %floor" for n in IMPLS], "dense / ragged_dot", "dense / tiled",
           "compile s (r/t/d)")


def table_rows(result: dict, block: dict) -> list[list[str]]:
    from benchmarks.moe_forward import floor_seconds

    out = []
    for row in block["rows"]:
        floor, bound = floor_seconds(result, block, row)
        t, skipped = row["times"], row["skipped"]

        def ms(n, t=t, skipped=skipped):
            if n in skipped:
                return f"skipped (~{skipped[n]:.0f} s)"
            return "—" if n not in t else f"{t[n] * 1e3:.2f}"

        def pct(n, t=t, floor=floor):
            return "—" if n not in t else f"{100 * floor / t[n]:.0f}%"

        def ratio(a, b, t=t):
            return "—" if a not in t or b not in t else f"{t[a] / t[b]:.2f}x"

        compile_s = "/".join(f"{row['compile_s'][n]:.1f}" if n in row["compile_s"] else "—"
                             for n in IMPLS)
        out.append([str(row["T"]), str(row["touched"]), f"{floor * 1e3:.2f}", bound,
                    *[ms(n) for n in IMPLS], *[pct(n) for n in IMPLS],
                    ratio("dense", "ragged_dot"), ratio("dense", "tiled"), compile_s])
    return out


def header_lines(result: dict) -> list[str]:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    hw = result["hardware"]
    bws = " ".join(f"{h['bandwidth'] / 1e9:.1f}" for h in hw)
    torch_peaks = " ".join(f"{h['peak_torch'] / 1e9:.0f}" for h in hw)
    xla_peaks = " ".join(f"{h['peak_xla'] / 1e9:.0f}" for h in hw)
    return [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.1f} GiB; {versions}",
            f"floor uses read bandwidth {result['bandwidth'] / 1e9:.1f} GB/s and fp32 matmul "
            f"peak {result['peak']['fp32'] / 1e9:.0f} GFLOP/s (best of {len(hw)} readings: "
            f"BW GB/s {bws}; torch GFLOP/s {torch_peaks}; XLA GFLOP/s {xla_peaks})",
            f"load average (1 min): start {result['load_start']:.2f}, end "
            f"{result['load_end']:.2f}; run took {result['seconds']:.0f} s",
            f"times in ms (median, compiled call, caches flushed by reading "
            f"{result['flush_bytes'] / 2**20:.0f} MiB before every call); "
            "% of floor = floor / time; ratios are time / time (> 1: faster than dense)"]


def block_title(result: dict, block: dict) -> str:
    return (f"JAX {result['shapes'][block['layer']]}, fp32 "
            f"(load {block['load_before']:.2f} -> {block['load_after']:.2f})")


def block_footer(block: dict) -> str:
    return "relative L2 difference from seif.moe.moe_forward: " + ", ".join(
        f"{k} {v:.1e}" for k, v in block["rel_err"].items())


REPORT = Report(COLUMNS, header_lines, block_title, table_rows, block_footer)
print_tables = REPORT.print
markdown = REPORT.markdown


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_TOKENS}")
    parser.add_argument("--layers", nargs="+", choices=[s.name for s in SHAPES])
    parser.add_argument("--tokens", nargs="+", type=int, help=f"default {TOKENS}")
    parser.add_argument("--max-call-s", type=float, default=15.0,
                        help="skip a call extrapolated to take longer (default 15)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--markdown", type=Path, help="also write Markdown tables here")
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if not args.layers or s.name in args.layers]
    kwargs: dict = dict(tokens=QUICK_TOKENS, target_s=0.3) if args.quick else {}
    if args.tokens:
        kwargs["tokens"] = tuple(args.tokens)
    result = run(shapes, max_call_s=args.max_call_s, progress=lambda s: print(s, flush=True),
                 **kwargs)
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()
