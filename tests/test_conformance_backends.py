"""The project's framework backends of the conformance suite (issue 6, item 3): the torch module
(`seif.conformance.backends_torch:TorchBackend`) and JAX (`seif.conformance.backends_jax:
JaxBackend`) pass every case that applies to them, and say why the others do not apply.

The backends are loaded by ``module:Class`` (what ``--backend`` takes), so these tests do not
need the ``seif.conformance_backends`` entry points installed.

Time: the torch backend runs the whole catalogue (a few seconds). The JAX backend compiles
``moe_apply`` once per MoE case (0.3-1 s each on CPU), so by default it runs every router and
format case but a covering subset of the MoE cases: every one outside the plain activation x
dtype grid (ties, near-ties, capacity, shared experts, quantized experts, T = 0 / 1, ...) plus
each activation once, spread over every routing kind and dtype. ``SEIF_CONFORMANCE_FULL=1``
runs the whole catalogue (and the ``tiled`` grouped matmul) for JAX too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from seif.conformance import catalogue, run
from seif.conformance.backends import resolve_backend
from seif.conformance.catalogue import ACTIVATIONS
from seif.conformance.runner import FAIL, NA, PASS, TIE

TORCH = "seif.conformance.backends_torch:TorchBackend"
JAX = "seif.conformance.backends_jax:JaxBackend"
FULL = os.environ.get("SEIF_CONFORMANCE_FULL", "") not in ("", "0")


@pytest.fixture(scope="module")
def cases():
    return catalogue()


def _check(report, cases, na_reasons: dict[str, str]):
    """No failure; every result passed or was declared not applicable with one of the expected
    reasons (reason-substring -> predicate over case ids documented per backend)."""
    assert len(report.results) == len(cases)
    bad = [(r.id, r.message) for r in report.results if r.status == FAIL]
    assert not bad, f"{len(bad)} failures: {bad[:5]}"
    assert all(r.status in (PASS, TIE, NA) for r in report.results)
    for r in report.results:
        if r.status == NA:
            assert r.message and r.message != "not applicable", r.id
            assert any(key in r.message and pred(r.id) for key, pred in na_reasons.items()), \
                (r.id, r.message)
    return {r.id: r.status for r in report.results}


def _is_router(kind):
    return lambda cid: cid.startswith(f"router/{kind}/")


# ---------------------------------------------------------------------------------- torch
def test_torch_backend_passes_every_applicable_case(cases):
    pytest.importorskip("torch")
    backend = resolve_backend(TORCH)
    assert backend.name == "torch"
    report = run(backend, cases)
    st = _check(report, cases, {
        "expert-choice selection": _is_router("expert_choice"),
        "Soft MoE dispatch/combine": _is_router("soft_moe"),
        "format cases test a checkpoint reader": lambda cid: cid.startswith("format/"),
    })
    # what does apply: every token-choice router case and every MoE case
    for c in cases:
        applies = c.kind == "moe" or (c.kind == "router" and c.routing["kind"] in
                                      ("topk", "group_topk", "sparse_mixer"))
        assert (st[c.id] != NA) == applies, c.id
    assert report.count(PASS) + report.count(TIE) == 120 - 18 + 175 + 9   # + 1.1 output bias


def test_torch_per_expert_dispatch_passes_moe_cases(cases):
    """The fallback dispatch (one matmul per expert, no torch._grouped_mm) conforms too."""
    pytest.importorskip("torch")
    from seif.conformance.backends_torch import TorchBackend

    moe = [c for c in cases if c.kind == "moe"]
    report = run(TorchBackend(grouped_mm=False), moe)
    _check(report, moe, {})


def test_torch_backend_really_runs_sparse_moe(cases):
    torch = pytest.importorskip("torch")
    from seif.converters.torch import SparseMoE, grouped_mm_supported, native_supported

    from seif.conformance.backends_torch import TorchBackend

    case = next(c for c in cases if c.id == "moe/topk/swiglu/fp32")
    module = TorchBackend().module(case)
    assert isinstance(module, SparseMoE)
    with torch.no_grad():
        module(torch.from_numpy(case.inputs["x"]))
    want = "native" if native_supported() else \
        "grouped_mm" if grouped_mm_supported("cpu", torch.float32) else "per_expert"
    assert module.last_dispatch == want
    bf16 = next(c for c in cases if c.id == "moe/topk/swiglu/bf16")
    assert TorchBackend().module(bf16).up_proj.dtype == torch.bfloat16   # stored dtype kept


def test_cli_runs_the_torch_backend(tmp_path):
    pytest.importorskip("torch")
    from seif.conformance.cli import conformance

    out = tmp_path / "torch.json"
    res = CliRunner().invoke(conformance, ["run", "--backend", TORCH, "--json", str(out)])
    assert res.exit_code == 0, res.output[-3000:]
    assert "SEIF conformance: backend torch" in res.output
    assert "format cases test a checkpoint reader" in res.output    # n/a reasons are shown
    summary = json.loads(out.read_text())["summary"]
    # SEIF 1.1 added 9 MoE cases (run) and 6 format cases (n/a: no reader of its own)
    assert summary["fail"] == 0 and summary["not-applicable"] == 82 + 18 + 6
    assert summary["pass"] + summary["tie-ambiguous"] == 277 + 9


# ------------------------------------------------------------------------------------ JAX
_GRID = re.compile(r"moe/[a-z_]+/([a-z0-9_]+)/(fp32|fp16|bf16)")
_KINDS = ("topk", "group_topk", "sparse_mixer", "expert_choice", "soft_moe")
_DTYPES = ("fp32", "fp16", "bf16")


def _jax_moe_subset(cases):
    """Every MoE case outside the activation x dtype grid, plus activation i of the grid on
    routing kind i mod 5 and dtype i mod 3 (every activation, kind and dtype at least once)."""
    picked = set()
    for i, act in enumerate(ACTIVATIONS):
        picked.add(f"moe/{_KINDS[i % len(_KINDS)]}/{act}/{_DTYPES[i % len(_DTYPES)]}")
    out = []
    for c in cases:
        if c.kind != "moe":
            continue
        m = _GRID.fullmatch(c.id)
        if c.id in picked or not (m and m.group(1) in ACTIVATIONS):
            out.append(c)
    return out


def test_jax_moe_subset_covers_the_catalogue(cases):
    subset = _jax_moe_subset(cases)
    assert {c.layer["routing"]["kind"] for c in subset} == set(_KINDS)
    assert {c.layer["experts"]["activation"] for c in subset} == set(ACTIVATIONS)
    assert {c.dtype for c in subset} == {c.dtype for c in cases if c.kind == "moe"}
    for tag in ("ties", "near-ties", "exact-ties", "nan", "capacity", "shared", "quantized"):
        assert any(tag in c.tags for c in subset), tag
    assert any("/T0/" in c.id for c in subset) and any("/T1/" in c.id for c in subset)


JAX_NA = {
    "expert-choice selection": _is_router("expert_choice"),
    "no Soft MoE dispatch/combine": _is_router("soft_moe"),
    "does not verify checksums": lambda cid: cid.startswith("format/malformed/integrity/"),
}


def test_jax_backend_passes_every_applicable_case(cases):
    pytest.importorskip("jax")
    backend = resolve_backend(JAX)
    assert backend.name == "jax"
    selected = cases if FULL else [c for c in cases if c.kind != "moe"] + _jax_moe_subset(cases)
    report = run(backend, selected)
    st = _check(report, selected, JAX_NA)
    for c in selected:
        applies = not (c.kind == "router" and c.routing["kind"] in ("expert_choice", "soft_moe")
                       or c.expect_error == "IntegrityError")
        assert (st[c.id] != NA) == applies, c.id
    # the format cases ran through converters.jax.load / load_dense and were value-checked
    assert all(st[c.id] in (PASS, TIE) for c in selected
               if c.kind == "format" and c.expect_error is None)


@pytest.mark.skipif(not FULL, reason="set SEIF_CONFORMANCE_FULL=1 (compiles every case twice)")
def test_jax_tiled_grouped_matmul_passes_token_choice_moe_cases(cases):
    pytest.importorskip("jax")
    from seif.conformance.backends_jax import JaxBackend

    moe = [c for c in cases if c.kind == "moe" and c.routing["kind"] in _KINDS[:3]]
    _check(run(JaxBackend(impl="tiled"), moe), moe, {})


def test_jax_topk_ranks_negative_nan_first():
    """Regression (found by the suite): jax.lax.top_k orders by IEEE total order, so a NaN with
    the sign bit set (x86's default NaN, e.g. jax.nn.sigmoid(nan)) ranked below -inf."""
    jax = pytest.importorskip("jax")
    from seif.converters.jax import _topk

    v = np.array([[0.5, 0.25, np.nan, 0.75, -0.0, 0.0, np.nan]], np.float32)
    bits = v.view(np.uint32)
    bits[0, 2] |= np.uint32(0x80000000)          # -nan
    bits[0, 6] = np.uint32(0x7FC00001)           # another payload
    got = jax.jit(lambda a: _topk(a, 7))(jax.numpy.asarray(v))
    assert np.asarray(got).tolist() == [[2, 6, 3, 0, 1, 4, 5]]


# ---------------------------------------------------------------------------------- imports
def test_importing_the_backends_does_not_import_the_frameworks():
    code = ("import sys, seif.conformance, seif.conformance.backends_torch, "
            "seif.conformance.backends_jax; "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
