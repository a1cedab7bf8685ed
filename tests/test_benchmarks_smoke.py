"""The benchmarks run (tiny sizes; the numbers are not checked: timings belong in benchmarks/)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_conversion_benchmark_smoke(tmp_path):
    from benchmarks.conversion import print_table, run

    results = run(0.01, tmp_path / "bench", repeats=2)
    for family in ("deepseek_v3", "mixtral"):
        r = results[family]
        assert [m["method"] for m in r["methods"]] == ["cp -r + sync",
                                                       "naive load_file+save_file",
                                                       "seif convert"]
        assert all(m["seconds"] > 0 and m["peak_rss_mb"] > 0 for m in r["methods"])
        e = r["expert_read"]
        assert 0 < e["expert_bytes"] < e["layer_bytes"]
    print_table(results)
