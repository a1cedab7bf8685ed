"""`python -m benchmarks.kernels`: the CPU expert GEMM alone, per token count, against one core's
matmul peak and read bandwidth measured in the same run.

The MoE layer's time is, to within 1-10%, its experts' FFN GEMMs at their token counts
(benchmarks/README.md, "Session 8"), so this sweep says where the layer can and cannot reach
its floor: at M tokens per expert a core does M x 2 FLOP per weight (fp32: M/2 FLOP per byte,
bf16: M); one core here multiplies at ~180 GFLOP/s and reads ~15 GB/s, so below ~24 tokens
(fp32) or ~12 (bf16) it waits on memory, above on its FMA units. Each point runs
`seif_kernel_bench gemm M N K` (see runtime/csrc/kernel_bench.cpp: weights cycled over 1 GiB
of copies so every repeat reads them from memory, 128-row calls as the layer's tasks make,
outputs checked against float64) on one core, then on every core at once (GFLOP/s per core:
the cores share the memory bandwidth, as in the layer). The baseline, in the same run: torch's
own GEMM (`F.linear`, oneDNN / MKL) on one thread for the same shapes and weight type, with its
weights cycled over as many bytes of copies. Build the binary with `make bench-kernels` (which
then runs this) or `cmake --build runtime/build --target seif_kernel_bench`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 64, 96)
QUICK_TOKENS = (1, 12, 20, 70)
# One expert's gate and up rows of the deepseek-like layer stacked (2 x 1408 x 2048) x 4.
N, K = 11264, 2048
_LINE = re.compile(r"median ([\d.]+) ms, ([\d.]+) GFLOP/s, ([\d.]+) GB/s")


def find_binary() -> Path | None:
    """SEIF_KERNEL_BENCH, else runtime/build/seif_kernel_bench; None when neither exists."""
    env = os.environ.get("SEIF_KERNEL_BENCH")
    path = Path(env) if env else ROOT / "runtime" / "build" / "seif_kernel_bench"
    return path if path.is_file() else None


def run_gemm(binary: Path, m: int, n: int, k: int, dtype: str, threads: int, reps: int,
             mib: int) -> dict:
    """One `seif_kernel_bench gemm` run: median ms, GFLOP/s and GB/s of weights (all cores
    together). Raises RuntimeError when the binary fails or its output check does."""
    cmd = [str(binary), "gemm", str(m), str(n), str(k), dtype, f"reps={reps}", f"mib={mib}",
           f"threads={threads}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    match = _LINE.search(proc.stdout)
    if proc.returncode or not match or "check:" not in proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    ms, gflops, gbs = (float(g) for g in match.groups())
    return {"ms": ms, "gflops": gflops, "gbs": gbs}


class TorchGemm:
    """torch.nn.functional.linear(x [M, K], W [N, K]) on one thread: the GEMM torch's CPU
    backend (oneDNN / MKL) runs for these shapes, as the baseline of the sweep. Its weights are
    cycled over `mib` MiB of copies (0: one copy), as seif_kernel_bench's are, so each call reads
    them from memory; bf16 weights multiply bf16 tokens (torch has no bf16 x fp32 GEMM)."""

    def __init__(self, n: int, k: int, dtype: str, mib: int):
        import torch

        self.dtype = torch.float32 if dtype == "f32" else torch.bfloat16
        size = n * k * (4 if dtype == "f32" else 2)
        count = max(1, (mib << 20) // size) if mib else 1
        gen = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(n, k, generator=gen).to(self.dtype) for _ in range(count)]
        self.n, self.k = n, k

    def run(self, m: int, reps: int) -> dict:
        """Median ms and GFLOP/s of one call over `reps` passes through the copies."""
        import torch
        import torch.nn.functional as F

        x = torch.randn(m, self.k).to(self.dtype)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                F.linear(x, self.weights[0])  # warm-up (oneDNN builds its kernel once per shape)
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    for w in self.weights:
                        F.linear(x, w)
                    times.append((time.perf_counter() - start) / len(self.weights))
        finally:
            torch.set_num_threads(threads)
        seconds = statistics.median(times)
        return {"ms": seconds * 1e3, "gflops": 2.0 * m * self.n * self.k / seconds / 1e9}


def one_core_peak_and_bandwidth(quick: bool) -> tuple[float, float]:
    """(FLOP/s of one core's fp32 matmul, bytes/s of one core's read), torch on one thread."""
    import torch

    from benchmarks.moe_forward import measure_bandwidth, measure_peak

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if quick:
            return measure_peak(torch.float32, n=256), measure_bandwidth(1 << 22, repeats=2)
        return max(measure_peak(torch.float32) for _ in range(3)), measure_bandwidth()
    finally:
        torch.set_num_threads(threads)


def run(binary: Path, tokens: Sequence[int] = TOKENS, dtypes: Sequence[str] = ("f32", "bf16"),
        n: int = N, k: int = K, reps: int = 5, mib: int = 1024, quick: bool = False,
        progress=lambda s: None) -> dict:
    """Every token count and weight type on one core and on all cores, and torch's GEMM on one
    core."""
    cores = os.cpu_count() or 1
    peak, bandwidth = one_core_peak_and_bandwidth(quick)
    rows = []
    for dtype in dtypes:
        baseline = TorchGemm(n, k, dtype, mib)
        for m in tokens:
            progress(f"{dtype} M={m}")
            one = run_gemm(binary, m, n, k, dtype, 1, reps, mib)
            every = run_gemm(binary, m, n, k, dtype, cores, reps, mib)
            rows.append({"dtype": dtype, "M": m, "one": one, "every": every,
                         "torch": baseline.run(m, reps)})
        del baseline
    return {"cores": cores, "peak": peak, "bandwidth": bandwidth, "n": n, "k": k, "mib": mib,
            "rows": rows}


def print_table(result: dict) -> None:
    cores, peak, bw = result["cores"], result["peak"], result["bandwidth"]
    where = (f"weights cycled over {result['mib']} MiB of copies" if result["mib"]
             else "one copy of the weights")
    print(f"GEMM M x {result['n']} x {result['k']} (128-row calls, {where}); one core: torch "
          f"fp32 matmul {peak / 1e9:.0f} GFLOP/s, torch read {bw / 1e9:.1f} GB/s; torch: "
          f"F.linear of the same shapes on one core (oneDNN / MKL)")
    head = (f"{'dtype':>5} {'M':>4} | {'1 core GF/s':>11} {'% peak':>6} {'GB/s':>6} | "
            f"{f'{cores} cores GF/s/core':>18} {'% peak':>6} {'GB/s':>6} | "
            f"{'torch 1 core GF/s':>17} {'SEIF / torch':>12}")
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        one, every = row["one"], row["every"]
        per_core = every["gflops"] / cores
        print(f"{row['dtype']:>5} {row['M']:>4} | {one['gflops']:>11.1f} "
              f"{100 * one['gflops'] * 1e9 / peak:>5.0f}% {one['gbs']:>6.2f} | "
              f"{per_core:>18.1f} {100 * per_core * 1e9 / peak:>5.0f}% {every['gbs']:>6.2f} | "
              f"{row['torch']['gflops']:>17.1f} {one['gflops'] / row['torch']['gflops']:>11.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"M in {QUICK_TOKENS}, small weights in cache, one repeat "
                             "(checks that the sweep runs, not timings)")
    parser.add_argument("--tokens", nargs="+", type=int, help=f"default {TOKENS}")
    parser.add_argument("--dtypes", nargs="+", choices=("f32", "bf16"), default=["f32", "bf16"])
    args = parser.parse_args(argv)
    binary = find_binary()
    if binary is None:
        sys.exit("benchmarks.kernels: runtime/build/seif_kernel_bench is not built "
                 "(run `make bench-kernels`, or set SEIF_KERNEL_BENCH)")
    kwargs: dict = dict(n=256, k=512, reps=1, mib=0, quick=True,
                        tokens=QUICK_TOKENS) if args.quick else {}
    if args.tokens:
        kwargs["tokens"] = tuple(args.tokens)
    try:
        result = run(binary, dtypes=args.dtypes, progress=lambda s: print(s, flush=True),
                     **kwargs)
    except RuntimeError as e:
        sys.exit(f"benchmarks.kernels: {e}")
    print_table(result)


if __name__ == "__main__":
    main()
