"""The kernel microbenchmark (runtime/csrc/kernel_bench.cpp, benchmarks/kernels.py) runs, checks
its own outputs against float64, and refuses bad arguments with a usage line.

Timings are not checked: they belong in benchmarks/README.md (`make bench-kernels`). The binary
is built by `make test` (`make native-bench`); these tests skip when it is missing.
"""

from __future__ import annotations

import math
import subprocess

import pytest

from benchmarks.kernels import QUICK_TOKENS, find_binary, main, run_gemm

BINARY = find_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="seif_kernel_bench is not built "
                                "(make native-bench)")


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True)


# Token counts that reach every form of the GEMM (dot product, phase, outer product with and
# without the dot-form tail, token blocks of 4 + 1 vectors split as 3 + 2) and K, N not
# multiples of any block or tile.
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 9, 17, 33, 48, 70, 80, 144])
def test_gemm_outputs_match_float64(dtype, m):
    out = run_gemm(BINARY, m, 131, 1037, dtype, threads=2, reps=1, mib=0)
    assert out["ms"] > 0 and out["gflops"] > 0 and out["gbs"] > 0


def test_ffn_outputs_match_float64():
    proc = _bench("ffn", "96", "72", "bf16", "1,6,17,40", "reps=1", "mib=0", "threads=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "experts=4 tokens=64 threads=2" in proc.stdout
    assert "check: 32 sampled outputs" in proc.stdout and ": ok" in proc.stdout


@pytest.mark.parametrize("args, message", [
    ((), "name a mode"),
    (("gemm", "4", "8"), "gemm wants M N K"),
    (("gemm", "4", "8", "16", "f16"), "the weight type is f32 or bf16"),
    (("gemm", "0", "8", "16", "f32"), "M must be a positive integer"),
    (("gemm", "4", "8", "16", "f32", "reps=x"), "reps must be a positive integer"),
    (("gemm", "4", "8", "16", "f32", "speed=9"), "unknown option speed"),
    (("ffn", "8", "8", "f32", "3,,4"), "a token count must be a positive integer"),
    (("conv",), "the mode is gemm or ffn"),
])
def test_bad_arguments_give_usage(args, message):
    proc = _bench(*args)
    assert proc.returncode == 2
    assert f"seif_kernel_bench: {message}" in proc.stderr and "usage:" in proc.stderr
    assert proc.stdout == ""


def test_quick_sweep_prints_every_point(capsys):
    pytest.importorskip("torch")
    main(["--quick"])
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if "|" in line and line.split()[0] in ("f32", "bf16")]
    assert [(line.split()[0], int(line.split()[1])) for line in table] == [
        (d, m) for d in ("f32", "bf16") for m in QUICK_TOKENS]
    for line in table:
        numbers = [float(x.rstrip("%x")) for x in line.replace("|", " ").split()[2:]]
        assert len(numbers) == 8 and all(math.isfinite(x) and x >= 0 for x in numbers)
        # GFLOP/s on one core, per core on all, torch's on one core; SEIF / torch
        assert numbers[0] > 0 and numbers[3] > 0 and numbers[6] > 0
        assert numbers[7] == pytest.approx(numbers[0] / numbers[6], rel=0.05, abs=0.01)
