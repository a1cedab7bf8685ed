"""The vendor conformance suite (`seif conformance`): catalogue, determinism, the reference
backend passing everything, broken backends failing exactly what they should, reports, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from seif.conformance import TOLERANCES, NumpyBackend, catalogue, generate, load_cases, run
from seif.conformance.backends import BROKEN, resolve_backend
from seif.conformance.cases import matches
from seif.conformance.catalogue import (
    ACTIVATIONS,
    DEFAULT_SEED,
    DTYPES,
    MOE_KINDS,
    build_catalogue,
)
from seif.conformance.cli import conformance
from seif.conformance.runner import FAIL, NA, PASS, TIE
from seif.conformance.tolerance import admissible

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec" / "conformance"


@pytest.fixture(scope="module")
def cases():
    return catalogue()


@pytest.fixture(scope="module")
def by_id(cases):
    return {c.id: c for c in cases}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cases")
    return out, generate(out)


def _status(report):
    return {r.id: r.status for r in report.results}


# ------------------------------------------------------------------------------ catalogue
def test_catalogue_size_ids_and_refs(cases):
    assert len(cases) >= 150
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    for c in cases:
        assert re.fullmatch(r"(router|moe|format)/[A-Za-z0-9_./+-]+", c.id), c.id
        assert re.search(r"§\d+", c.spec_ref), c.id
        assert c.description and c.kind == c.id.split("/")[0]
        if c.kind == "format":
            assert (c.expect_error is None) == ("accept" in c.tags)
    kinds = {c.kind for c in cases}
    assert kinds == {"router", "moe", "format"}


def test_catalogue_covers_the_issue(by_id, cases):
    # every routing kind x activation x dtype as an MoE case
    for kind in MOE_KINDS:
        for act in ACTIVATIONS:
            for dt in DTYPES:
                assert f"moe/{kind}/{act}/{dt}" in by_id
    dtypes = {c.dtype for c in cases}
    assert {"fp32", "fp16", "bf16", "fp8", "mxfp4", "int4", "int8"} <= dtypes
    tags = {t for c in cases for t in c.tags}
    assert {"ties", "near-ties", "nan", "capacity", "shared", "quantized"} <= tags
    for needle in ("T0", "T1", "k1", "kE", "E7", "E6", "large-logits", "signed-zeros",
                   "ties-kth", "near-ties-kth", "capacity", "ties-group", "zero-mask"):
        assert any(needle in i for i in by_id), needle
    errors = {c.expect_error for c in cases if c.kind == "format"}
    assert errors == {None, "FormatError", "VersionError", "FeatureError", "SecurityError",
                      "IntegrityError"}
    for name in ("newer-minor-unknown-fields", "v1.0-required-fields-only", "aliases",
                 "all-routing-kinds", "quant-fp8-block", "quant-mxfp4"):
        assert f"format/valid/{name}" in by_id


def _ids(path: Path) -> list[str]:
    return [x.strip() for x in path.read_text().splitlines() if x.strip() and not
            x.startswith("#")]


def _hashes(path: Path) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in path.read_text().splitlines()
            if line.strip()}


def test_must_pass_and_hash_lists_name_the_catalogue(cases):
    """1.1 lists name the whole catalogue; 1.0's (frozen) name it without the 1.1 cases."""
    ids = [c.id for c in cases]
    ids_1_0 = [c.id for c in cases if "output-bias" not in c.id]
    assert _ids(SPEC / "must-pass-1.1.txt") == ids
    assert list(_hashes(SPEC / "catalogue-1.1.sha256")) == ids
    assert _ids(SPEC / "must-pass-1.0.txt") == ids_1_0
    assert list(_hashes(SPEC / "catalogue-1.0.sha256")) == ids_1_0


def test_checked_in_digests_equal_the_generated_ones(generated):
    """Adding the 1.1 cases changed no 1.0 case: its digests are the 1.0 release's."""
    got = {e["id"]: e["digest"] for e in generated[1]["cases"]}
    assert _hashes(SPEC / "catalogue-1.1.sha256") == got
    old = _hashes(SPEC / "catalogue-1.0.sha256")
    assert {i: got[i] for i in old} == old


def test_output_bias_cases_fail_a_backend_that_ignores_the_bias(by_id):
    """A 1.0 runtime that dropped `output_bias` would be caught by every 1.1 MoE case."""
    from seif.moe import moe_forward

    class IgnoresBias(NumpyBackend):
        name = "broken-ignores-output-bias"

        def moe(self, case):
            layer, params = case.layer_spec(), case.moe_params(np.float32)
            layer.output_bias, params.output_bias = False, None
            return moe_forward(case.inputs["x"], layer, params, dtype=self.dtype)

    bias_cases = [c for i, c in by_id.items() if i.startswith("moe/") and "output-bias" in i]
    assert len(bias_cases) == 9
    st = _status(run(IgnoresBias(), bias_cases))
    assert {i: s for i, s in st.items() if "T0" not in i} == \
        {c.id: FAIL for c in bias_cases if "T0" not in c.id}
    assert _status(run(NumpyBackend(), bias_cases)) == {c.id: PASS for c in bias_cases}


def test_readme_tolerance_table_matches_code():
    text = (SPEC / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([\d.e-]+) \| ([\d.e-]+) \| (\w+) \|", text, re.M)
    assert {r[0] for r in rows} == set(TOLERANCES)
    for name, rtol, atol, fmt in rows:
        tol = TOLERANCES[name]
        assert (float(rtol), float(atol), fmt) == (tol.rtol, tol.atol, tol.ulp_dtype), name


def test_generation_is_deterministic(generated, tmp_path):
    out, index = generated
    again = generate(tmp_path / "again", cases=build_catalogue(DEFAULT_SEED))  # recomputed
    assert again["digest"] == index["digest"]
    assert [e["files"] for e in again["cases"]] == [e["files"] for e in index["cases"]]
    assert all(v.startswith(("sha256:", "symlink:")) for e in index["cases"]
               for v in e["files"].values())


# ------------------------------------------------------------------------------- backends
def test_numpy_backend_passes_everything(cases, generated):
    report = run(NumpyBackend(), cases)
    bad = [(r.id, r.message) for r in report.results if r.status != PASS and r.status != TIE]
    assert not bad, bad[:5]
    # near-ties the float32 reference resolves differently from float64 are reported as such
    assert report.count(TIE) >= 1
    # and the same from the files written by `generate`
    from_disk = run(resolve_backend("numpy"), load_cases(generated[0]))
    assert from_disk.count(FAIL) == 0 and len(from_disk.results) == len(cases)


@pytest.fixture(scope="module")
def broken(generated):
    on_disk = load_cases(generated[0])   # checkpoints built once
    return {name: _status(run(cls(), on_disk)) for name, cls in BROKEN.items()}


def test_highest_index_ties_fail_only_tie_cases(broken, by_id):
    st = broken["broken-highest-index-ties"]
    failed = {i for i, s in st.items() if s == FAIL}
    assert failed and all("ties" in by_id[i].tags for i in failed)
    for i in ("router/topk/softmax-none-k2/ties-kth/fp32",
              "router/topk/sigmoid_topk-k1/ties-kth/bf16",
              "router/group_topk/top2_sum-neginf-sigmoid-k4/ties-kth/fp16",
              "router/sparse_mixer/jitter0.5/ties-kth/fp32",
              "router/expert_choice/softmax-tokens3/ties-kth/fp32",
              "router/topk/edge/signed-zeros-sigmoid_topk/fp32",
              "router/topk/edge/nan-kth-sigmoid_topk/fp32",
              "moe/topk/ties-kth/swiglu/fp32", "moe/group_topk/ties-group/swiglu/fp32"):
        assert st[i] == FAIL, i
    for i in ("router/topk/softmax-none-k2/fp32", "router/group_topk/max-zero-softmax-k3/fp32",
              "moe/topk/swiglu/fp32", "moe/expert_choice/gelu/fp32", "format/valid/aliases"):
        assert st[i] == PASS, i


def test_softmax_after_topk_fails_unnormalized_softmax(broken, by_id):
    st = broken["broken-softmax-after-topk"]
    failed = {i for i, s in st.items() if s == FAIL}
    assert all(by_id[i].routing.get("scoring") == "softmax" for i in failed)
    for i in ("router/topk/softmax-none-k2/fp32", "router/topk/softmax-none-k2/bf16",
              "moe/topk/int8-asym/gelu/int8",
              "router/group_topk/max-zero-softmax-k3/fp16"):
        assert st[i] == FAIL, i
    # renormalizing (sum or Lp) makes the two equal, and so does k = E
    for i in ("router/topk/softmax-sum-k2/fp32", "moe/topk/swiglu/bf16",
              "router/topk/softmax-lp2-k3/fp32",
              "router/topk/edge/kE-softmax-none/fp32", "router/topk/sigmoid-sum-eps-k4/fp32",
              "router/topk/softmax_topk-k4/fp32"):
        assert st[i] == PASS, i


def test_missing_renormalization_fails_normalized_cases(broken, by_id):
    st = broken["broken-missing-renormalization"]
    failed = {i for i, s in st.items() if s == FAIL}
    assert all(by_id[i].routing.get("normalize") in ("sum", "lp") for i in failed)
    for i in ("router/topk/softmax-sum-k2/fp32", "router/topk/softmax-lp2-k3/fp32",
              "router/topk/edge/k1-sum/fp32", "router/topk/edge/clamp-eps-tiny-sum/fp32",
              "moe/topk/swiglu/fp32", "moe/group_topk/silu/bf16"):
        assert st[i] == FAIL, i
    for i in ("router/topk/softmax-none-k2/fp32", "moe/sparse_mixer/swiglu/fp32",
              "moe/soft_moe/gelu/fp32", "router/expert_choice/sigmoid-factor1.5/fp32"):
        assert st[i] == PASS, i


def test_fp16_router_fails_router_precision(broken):
    st = broken["broken-fp16-router"]
    failed = {i for i, s in st.items() if s == FAIL}
    assert not any(i.startswith("format/") for i in failed)
    for i in ("router/topk/softmax-none-k2/fp32", "router/topk/softmax-sum-k2/bf16",
              "router/soft_moe/slots2/fp32", "router/expert_choice/softmax-tokens3/fp16",
              "moe/topk/swiglu/fp32", "moe/group_topk/relu/fp32"):
        assert st[i] == FAIL, i
    assert sum(i.startswith("router/") for i in failed) > 0.6 * sum(
        i.startswith("router/") for i in st)


def test_every_broken_backend_still_reads_checkpoints(broken):
    for name, st in broken.items():
        assert all(s == PASS for i, s in st.items() if i.startswith("format/")), name


def test_moe_near_tie_is_checked_against_the_alternative(by_id):
    from seif.conformance.runner import compare_moe
    case = by_id["moe/topk/near-ties-kth/swiglu/fp32"]
    ex = case.expected
    assert len(ex["alt_row"]) > 0
    t = int(ex["alt_row"][0])
    y = ex["y"].copy()
    y[t] = ex["alt_y"][0]                       # the other admissible choice for token t
    assert compare_moe(case, y)[0] == TIE
    y[t] += 0.5                                 # neither choice
    assert compare_moe(case, y)[0] == FAIL
    other = np.setdiff1d(np.arange(len(y)), ex["alt_row"])
    if other.size:                              # a token without a near-tie has no leeway
        y = ex["y"].copy()
        y[other[0]] = ex["alt_y"][0]
        assert compare_moe(case, y)[0] == FAIL


# ---------------------------------------------------------------------- tie comparison unit
def test_admissible_rules():
    # exact ties: only the lower index
    assert admissible(np.array([1.0, 2.0, 2.0, 0.5]), 1, 0.0) == [(1,)]
    # a near-tie within tau: both
    assert admissible(np.array([1.0, 2.0, 2.0 - 1e-9, 0.5]), 1, 1e-6) == [(1,), (2,)]
    # near-tie with an exact class behind it: the class keeps its lowest index
    assert admissible(np.array([0.5, 0.5, 0.5 + 1e-9]), 1, 1e-6) == [(2,), (0,)]
    # NaN ranks first; NaNs tie among themselves by index
    assert admissible(np.array([1.0, np.nan, 3.0, np.nan]), 1, 0.0) == [(1,)]
    assert admissible(np.array([-0.0, 0.0, -1.0]), 1, 0.0) == [(0,)]


# ------------------------------------------------------------------------------ CLI, reports
def test_cli_run_reports_and_exit_codes(tmp_path):
    r = CliRunner()
    j, x = tmp_path / "r.json", tmp_path / "r.xml"
    res = r.invoke(conformance, ["run", "--backend", "numpy", "-k", "router/topk and edge",
                                 "--json", str(j), "--junit", str(x)])
    assert res.exit_code == 0, res.output
    assert "SEIF conformance" in res.output and "tie-ambiguous" in res.output
    data = json.loads(j.read_text())
    assert data["summary"]["fail"] == 0 and data["summary"]["total"] == len(data["cases"]) > 5
    assert all(c["id"].startswith("router/topk/") for c in data["cases"])
    root = ET.parse(x).getroot()
    assert root.tag == "testsuites" and int(root.get("tests")) == data["summary"]["total"]
    assert not root.findall(".//failure")

    res = r.invoke(conformance, ["run", "--backend", "broken-missing-renormalization",
                                 "-k", "moe/topk/swiglu or router/topk/softmax-none-k2",
                                 "--junit", str(x)])
    assert res.exit_code == 1 and "FAIL moe/topk/swiglu/fp32" in res.output
    failures = ET.parse(x).getroot().findall(".//failure")
    assert failures and all(f.get("message") for f in failures)

    # --must-pass: only listed failures count; unknown ids fail the run
    ok = tmp_path / "ok.txt"
    ok.write_text("# passing ones\nrouter/topk/softmax-none-k2/fp32\n")
    res = r.invoke(conformance, ["run", "--backend", "broken-missing-renormalization",
                                 "-k", "router/topk/softmax", "--must-pass", str(ok)])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.txt"
    bad.write_text("router/topk/softmax-sum-k2/fp32\n")
    res = r.invoke(conformance, ["run", "--backend", "broken-missing-renormalization",
                                 "-k", "router/topk/softmax", "--must-pass", str(bad)])
    assert res.exit_code == 1
    missing = tmp_path / "missing.txt"
    missing.write_text("router/no/such/case\n")
    res = r.invoke(conformance, ["run", "--backend", "numpy", "-k", "k1-sum",
                                 "--must-pass", str(missing)])
    assert res.exit_code == 1 and "MISSING" in res.output

    res = r.invoke(conformance, ["run", "--backend", "no-such-backend"])
    assert res.exit_code == 1 and "unknown backend" in res.output


def test_cli_list_and_filter():
    r = CliRunner()
    res = r.invoke(conformance, ["list", "--ids", "-k", "format/malformed/path"])
    ids = res.output.split()
    assert res.exit_code == 0 and len(ids) >= 7 and all("/path/" in i for i in ids)
    res = r.invoke(conformance, ["list", "--json", "-k", "ties and not router"])
    data = json.loads(res.output)
    assert data and all(c["kind"] != "router" and ("ties" in c["tags"] or "ties" in c["id"])
                        for c in data)
    res = r.invoke(conformance, ["list", "-k", "soft_moe/T0"])
    assert res.exit_code == 0 and "soft_moe" in res.output
    assert r.invoke(conformance, ["--help"]).exit_code == 0
    group = click.Group("seif")              # how seif/cli.py wires it: main.add_command(...)
    group.add_command(conformance)
    res = r.invoke(group, ["conformance", "list", "--ids", "-k", "soft_moe/edge/T0"])
    assert res.exit_code == 0 and res.output.split() == ["router/soft_moe/edge/T0/fp32"]
    assert r.invoke(conformance, ["list", "-k", "(unbalanced"]).exit_code == 2
    assert matches("moe/*/swiglu/* and not bf16", "moe/topk/swiglu/fp32")
    assert not matches("moe/*/swiglu/* and not bf16", "moe/topk/swiglu/bf16")
    assert matches("(nan or ties) fp32", "router/x/fp32", ["nan"])
    assert matches(None, "anything")


def test_cli_generate_and_check(tmp_path):
    r = CliRunner()
    hashes = tmp_path / "h.sha256"
    k = "format/valid/alignment or near-ties-kth"
    res = r.invoke(conformance, ["generate", "--out", str(tmp_path / "a"), "-k", k,
                                 "--write-hashes", str(hashes)])
    assert res.exit_code == 0, res.output
    res = r.invoke(conformance, ["generate", "--out", str(tmp_path / "b"), "-k", k,
                                 "--check", str(hashes)])
    n = len(catalogue(k=k))
    assert res.exit_code == 0 and f"all {n} cases match" in res.output, res.output
    res = r.invoke(conformance, ["generate", "--out", str(tmp_path / "b"), "-k", k])
    assert res.exit_code == 1 and "not empty" in res.output
    hashes.write_text(hashes.read_text().replace("a", "b", 1))
    res = r.invoke(conformance, ["generate", "--out", str(tmp_path / "c"), "-k", k,
                                 "--check", str(hashes)])
    assert res.exit_code == 1
    res = r.invoke(conformance, ["run", "--backend", "numpy", "--cases", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output


def test_vendor_backend_from_readme_by_module_class(tmp_path, monkeypatch):
    text = (SPEC / "README.md").read_text()
    code = text.split("<!-- vendor-example -->\n```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 20
    (tmp_path / "vendor_backend.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    j = tmp_path / "v.json"
    res = CliRunner().invoke(conformance, ["run", "--backend",
                                           "vendor_backend:SoftmaxTopkKernel", "-k",
                                           "router/topk or moe/topk/swiglu/fp32",
                                           "--json", str(j)])
    assert res.exit_code == 0, res.output
    data = json.loads(j.read_text())
    assert data["backend"] == "my-softmax-topk"
    assert data["summary"]["pass"] >= 15 and data["summary"]["fail"] == 0
    na = [c for c in data["cases"] if c["status"] == NA]
    assert na and all("kernel:" in c["message"] or "does not implement" in c["message"]
                      for c in na)
    assert "n/a" in res.output
    # a backend that breaks the tie rule is caught even when it is a vendor's
    cls = resolve_backend("vendor_backend:SoftmaxTopkKernel")
    assert cls.name == "my-softmax-topk"


def test_core_imports_only_numpy():
    code = ("import sys, seif.conformance, seif.conformance.catalogue, "
            "seif.conformance.runner; "
            "print(sorted(m for m in ('torch', 'jax', 'scipy', 'onnxruntime', 'rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
