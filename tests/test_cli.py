"""The `seif` CLI: every command's --help, inspect --json contract, validate, convert, demo."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import seif
from seif.cli import main

COMMANDS = ["inspect", "validate", "convert", "demo", "verify", "run", "conformance",
            "conformance run", "conformance list", "conformance generate"]


@pytest.mark.parametrize("command", [[]] + [c.split() for c in COMMANDS])
def test_help(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_inspect_json_contract(tiny):
    path, layers, tensors = tiny
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert set(s) >= {"path", "seif_version", "required_features", "model", "num_tensors",
                      "total_bytes", "dense", "layers", "layout", "shards"}
    assert s["num_tensors"] == len(tensors)
    assert [x["index"] for x in s["layers"]] == [0, 3]
    one = s["layers"][1]
    assert one["routing_kind"] == "group_topk" and one["top_k"] == 2
    assert one["scoring"] == "sigmoid" and one["shared_experts"] == 1
    assert one["bytes_per_expert"] == 3 * 32 * 16 * 4
    assert one["expert_dtypes"] == ["F32"] and one["router_dtype"] == "F32"
    assert sum(sh["size"] for sh in s["shards"]) == s["total_bytes"]
    assert all(set(sh) == {"file", "role", "size", "layers", "experts", "tensors"}
               for sh in s["shards"])


def test_inspect_table(tiny):
    result = CliRunner().invoke(main, ["inspect", str(tiny[0])])
    assert result.exit_code == 0 and "group_topk" in result.output


def test_validate_ok(tiny):
    result = CliRunner().invoke(main, ["validate", str(tiny[0]), "--deep"])
    assert result.exit_code == 0 and result.output.startswith("ok: ")
    assert "checksums verified" in result.output


def test_convert_subset_and_refusals(tiny, tmp_path):
    dst = tmp_path / "sub.seif"
    result = CliRunner().invoke(main, ["convert", str(tiny[0]), str(dst), "--experts", "0-3",
                                       "--dtype", "f16"])
    assert result.exit_code == 0, result.output
    assert seif.open(dst).layer(0).num_experts == 4
    again = CliRunner().invoke(main, ["convert", str(tiny[0]), str(dst)])
    assert again.exit_code == seif.ConversionError.exit_code and "exists" in again.output
    bad = CliRunner().invoke(main, ["convert", str(tiny[0]), str(tmp_path / "x.seif"),
                                    "--dtype", "int3"])
    assert bad.exit_code != 0 and "int3" in bad.output and "Traceback" not in bad.output


def test_demo_runs_and_keeps_its_output(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seif.validate(tmp_path / "demo.seif", deep=True).layers == 3
    assert seif.validate(tmp_path / "demo-experts-0-3.seif").layers == 3
    assert "checkpoint vs in-memory max|diff| 0.0e+00" in result.output
