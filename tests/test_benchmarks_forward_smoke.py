"""The MoE-forward benchmarks run on tiny shapes and report finite positive numbers.

Timings are not checked: they belong in benchmarks/README.md (`python -m benchmarks.moe_forward`).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

TINY = dict(tokens=(1, 5), target_s=0.0, min_reps=1, bw_bytes=1 << 22, peak_n=128,
            check_tokens=4, flush_bytes=1 << 20)


def _shapes():
    from benchmarks.moe_forward import Shape

    return (Shape("deepseek", 8, 3, 32, 16, "none", "qwen3_moe"),
            Shape("mixtral", 4, 2, 32, 24, "sum", "mixtral"))


def _check(result: dict, impls: set[str], dtypes: set[str], tol: dict[str, float]) -> None:
    from benchmarks.moe_forward import floor_seconds

    assert result["bandwidth"] > 0 and all(p > 0 for p in result["peak"].values())
    assert {(b["layer"], b["dtype"]) for b in result["blocks"]} == {
        (layer, d) for layer in ("deepseek", "mixtral") for d in dtypes}
    for block in result["blocks"]:
        assert [r["T"] for r in block["rows"]] == [1, 5]
        for row in block["rows"]:
            floor, bound = floor_seconds(result, block, row)
            assert math.isfinite(floor) and floor > 0 and bound in ("memory", "compute")
            assert 1 <= row["touched"] <= 8
            for name, seconds in row["times"].items():
                assert name in impls and math.isfinite(seconds) and seconds > 0
        for name, err in block["rel_err"].items():   # every implementation computes the layer
            assert err < tol[block["dtype"]], (block["layer"], block["dtype"], name, err)


def test_moe_forward_benchmark_smoke():
    from benchmarks.moe_forward import IMPLS, markdown, print_tables, run

    result = run(_shapes(), **TINY)
    _check(result, set(IMPLS), {"fp32", "bf16"}, {"fp32": 1e-5, "bf16": 5e-2})
    fp32 = next(b for b in result["blocks"] if b["dtype"] == "fp32")
    assert "ORT MoE" in fp32["rows"][0]["times"]            # com.microsoft.MoE runs in fp32
    if result["library"]:
        assert "SEIF ORT" in fp32["rows"][0]["times"]
    print_tables(result)
    assert "| T | U | floor ms |" in markdown(result)


def test_jax_forward_benchmark_smoke():
    pytest.importorskip("jax")
    from benchmarks.jax_forward import IMPLS, markdown, run

    result = run(_shapes(), **TINY)
    _check(result, set(IMPLS), {"fp32"}, {"fp32": 1e-4})
    assert all(set(r["times"]) == set(IMPLS) for b in result["blocks"] for r in b["rows"])
    assert "dense / tiled" in markdown(result)
