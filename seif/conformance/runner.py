"""Run a backend over cases, compare (tolerance.py), and report (rich table, JSON, JUnit XML).

Statuses: ``pass``; ``tie-ambiguous`` (passed, but some token chose differently from the
reference within a near-tie, and was checked against the reference recomputed on its choice);
``fail``; ``not-applicable`` (the backend said so, with a reason). A backend exception is a
failure, except on format cases that expect exactly that error.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SeifError
from ..manifest import SPEC_VERSION
from .cases import Case, slug
from .tolerance import TOLERANCES, Diff, _rank_key, compare_arrays

PASS, TIE, FAIL, NA = "pass", "tie-ambiguous", "fail", "not-applicable"


@dataclass
class Result:
    id: str
    kind: str
    family: str
    spec_ref: str
    dtype: str
    status: str
    message: str = ""
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float = 0.0
    tie_rows: int = 0
    seconds: float = 0.0
    must_pass: bool = False

    @property
    def ok(self) -> bool:
        return self.status in (PASS, TIE, NA)


@dataclass
class Report:
    backend: str
    results: list[Result] = field(default_factory=list)
    missing_must_pass: list[str] = field(default_factory=list)

    def count(self, status: str, results: Iterable[Result] | None = None) -> int:
        return sum(r.status == status for r in (self.results if results is None else results))

    @property
    def must_pass_failures(self) -> list[Result]:
        return [r for r in self.results if r.must_pass and r.status == FAIL]

    def exit_code(self, must_pass_given: bool) -> int:
        if must_pass_given:
            return 1 if self.must_pass_failures or self.missing_must_pass else 0
        return 1 if any(r.status == FAIL for r in self.results) else 0

    def to_dict(self) -> dict:
        from .catalogue import SUITE_VERSION
        return {
            "suite_version": SUITE_VERSION, "spec_version": SPEC_VERSION,
            "backend": self.backend,
            "summary": {s: self.count(s) for s in (PASS, TIE, FAIL, NA)}
            | {"total": len(self.results),
               "must_pass_failures": [r.id for r in self.must_pass_failures],
               "missing_must_pass": self.missing_must_pass},
            "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
            "cases": [asdict(r) for r in self.results],
        }


# ------------------------------------------------------------------------------ comparing
def _rows_of(case: Case, kind: str) -> dict[int, list[tuple[tuple, np.ndarray]]]:
    ex = case.expected
    alts: dict[int, list] = {}
    for r, sel, w in zip(ex.get("alt_row", []), ex.get("alt_indices", []),
                         ex.get("alt_weights", [])):
        alts.setdefault(int(r), []).append((tuple(int(i) for i in sel), np.asarray(w)))
    return alts


def compare_route(case: Case, got) -> tuple[str, str, Diff, int]:
    """(status, message, weight diff, rows decided on an alternative)."""
    ex = case.expected
    kind = case.routing["kind"]
    tol = TOLERANCES["router"]
    if kind == "soft_moe":
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return FAIL, "soft_moe route() must return (dispatch, combine)", Diff(False), 0
        d1 = compare_arrays(got[0], ex["dispatch"], tol, "dispatch")
        d2 = compare_arrays(got[1], ex["combine"], tol, "combine")
        worst = d1 if d1.max_abs >= d2.max_abs else d2
        msg = "; ".join(m for m in (d1.message, d2.message) if m)
        return (PASS if d1.ok and d2.ok else FAIL), msg, worst, 0
    if not isinstance(got, (tuple, list)) or len(got) not in (2, 3):
        return FAIL, "route() must return (indices, weights) or (indices, weights, kept)", \
            Diff(False), 0
    idx = np.asarray(got[0])
    ref_idx = ex["indices"]
    if idx.shape != ref_idx.shape:
        return FAIL, f"indices: shape {list(idx.shape)}, expected {list(ref_idx.shape)}", \
            Diff(False), 0
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        if not np.all(np.equal(np.mod(idx, 1), 0)):
            return FAIL, "indices are not integers", Diff(False), 0
    idx = idx.astype(np.int64)
    weights = np.asarray(got[1], dtype=np.float64) if len(idx) else np.zeros(ref_idx.shape)
    if weights.shape != ref_idx.shape:
        return FAIL, f"weights: shape {list(weights.shape)}, expected {list(ref_idx.shape)}", \
            Diff(False), 0
    alts = _rows_of(case, kind)
    ordered = kind == "sparse_mixer"
    want = ex["weights"].copy()
    tie_rows = 0
    for r in range(idx.shape[0]):
        mine = tuple(int(i) for i in idx[r])
        ref = tuple(int(i) for i in ref_idx[r])
        if len(set(mine)) != len(mine):
            return FAIL, f"row {r}: an index appears twice {list(mine)}", Diff(False), 0
        if (mine if ordered else tuple(sorted(mine))) == (ref if ordered else tuple(sorted(ref))):
            pos = {e: j for j, e in enumerate(ref)}
            want[r] = ex["weights"][r, [pos[e] for e in mine]]
            if not ordered and r not in alts and mine != ref:
                bad = _order_problem(ex["choice"][r], mine, ex["tau"][r])
                if bad:
                    return FAIL, f"row {r}: order {list(mine)} but reference {list(ref)} " \
                                 f"({bad})", Diff(False), 0
            continue
        key = mine if ordered else tuple(sorted(mine))
        match = [w for sel, w in alts.get(r, []) if sel == key]
        if not match:
            return FAIL, (f"row {r}: selected {list(mine)}, reference {list(ref)}"
                          + (f" (accepted alternatives: {[list(s) for s, _ in alts[r]]})"
                             if r in alts else " (no tie within tolerance there)")), \
                Diff(False), 0
        pos = {e: j for j, e in enumerate(key)}
        want[r] = match[0][[pos[e] for e in mine]]
        tie_rows += 1
    d = compare_arrays(weights, want, tol, "weights")
    if not d.ok:
        return FAIL, d.message, d, tie_rows
    if case.layer["routing"].get("capacity") is not None and kind != "expert_choice":
        if len(got) != 3:
            return FAIL, "capacity routing: route() must also return `kept`", d, tie_rows
        kept = np.asarray(got[2]).astype(bool)
        if kept.shape != ex["kept"].shape or (kept != ex["kept"]).any():
            n = int((kept != ex["kept"]).sum()) if kept.shape == ex["kept"].shape else -1
            return FAIL, f"kept: {n} assignments differ from the reference capacity drop", \
                d, tie_rows
    return (TIE if tie_rows else PASS), "", d, tie_rows


def _order_problem(choice: np.ndarray, order: tuple, tau: float) -> str:
    """'' when `order` is best-first under §6.2 up to near-ties within tau."""
    key = _rank_key(choice)
    for a, b in zip(order, order[1:]):
        if key[a] == key[b] and a > b:
            return f"experts {a} and {b} tie exactly; the lower index comes first"
        if key[a] < key[b] and not (key[b] - key[a] <= tau):
            return f"expert {b} ranks above {a}"
    return ""


def compare_moe(case: Case, got) -> tuple[str, str, Diff, int]:
    ex = case.expected
    tol = TOLERANCES.get(case.dtype, TOLERANCES["fp32"])
    d = compare_arrays(got, ex["y"], tol, "y")
    if d.ok or d.bad is None:
        return (PASS if d.ok else FAIL), d.message, d, 0
    got = np.asarray(got, dtype=np.float64)
    rows = sorted(set(np.nonzero(d.bad.any(axis=1))[0].tolist()))
    tie_rows = 0
    for t in rows:
        cands = [ex["alt_y"][i] for i, r in enumerate(ex.get("alt_row", [])) if int(r) == t]
        if not any(compare_arrays(got[t], c, tol).ok for c in cands):
            return FAIL, d.message + (f" (token {t} matches none of its {len(cands)} "
                                      "near-tie alternatives)" if cands else ""), d, 0
        tie_rows += 1
    # passed on alternatives: report the errors against them
    fixed = ex["y"].copy()
    for t in rows:
        cands = [ex["alt_y"][i] for i, r in enumerate(ex["alt_row"]) if int(r) == t]
        fixed[t] = next(c for c in cands if compare_arrays(got[t], c, tol).ok)
    return TIE, "", compare_arrays(got, fixed, tol, "y"), tie_rows


def compare_load(case: Case, load, path: Path) -> tuple[str, str, Diff]:
    """`load(path)` is called here so that the exception it raises is the result."""
    want_error = case.expect_error
    try:
        values = load(path)
    except Exception as exc:  # noqa: BLE001 - any exception is a result here
        names = [c.__name__ for c in type(exc).__mro__]
        if want_error and want_error in names and isinstance(exc, SeifError):
            return PASS, "", Diff(True)
        if want_error:
            return FAIL, (f"raised {type(exc).__name__}: {str(exc)[:200]}; expected "
                          f"{want_error}"), Diff(False)
        return FAIL, f"refused a valid checkpoint: {type(exc).__name__}: {str(exc)[:300]}", \
            Diff(False)
    if want_error:
        return FAIL, f"accepted a malformed checkpoint; expected {want_error}", Diff(False)
    if values is None:
        return PASS, "accepted (values not returned, not checked)", Diff(True)
    worst = Diff(True)
    for key, want in case.expected.items():
        if not key.startswith("t/"):
            continue
        name = key[2:]
        if name not in values:
            return FAIL, f"tensor {name!r} missing from load()'s result", Diff(False)
        d = compare_arrays(np.asarray(values[name], dtype=np.float32), want,
                           TOLERANCES["exact"], name)
        if not d.ok:
            return FAIL, d.message, d
        worst = d if d.max_abs > worst.max_abs else worst
    return PASS, "", worst


# --------------------------------------------------------------------------------- running
def load_must_pass(path: Path | str) -> list[str]:
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def run(backend, cases: list[Case], must_pass: Iterable[str] | None = None,
        workdir: Path | None = None, all_ids: Iterable[str] | None = None,
        progress=None) -> Report:
    """Run `backend` on `cases`; format cases are built under `workdir` if not on disk."""
    must = set(must_pass or ())
    report = Report(backend=getattr(backend, "name", type(backend).__name__))
    known = set(all_ids) if all_ids is not None else {c.id for c in cases}
    report.missing_must_pass = sorted(must - known)
    tmp = None
    if workdir is None and any(c.kind == "format" and c.checkpoint is None for c in cases):
        tmp = tempfile.TemporaryDirectory(prefix="seif-conformance-")
        workdir = Path(tmp.name)
    try:
        for case in cases:
            report.results.append(_run_one(backend, case, workdir, case.id in must))
            if progress is not None:
                progress(report.results[-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return report


def _run_one(backend, case: Case, workdir: Path | None, must: bool) -> Result:
    res = Result(case.id, case.kind, case.family, case.spec_ref, case.dtype, NA, must_pass=must)
    start = time.perf_counter()
    try:
        ok, reason = backend.applies(case)
    except Exception as exc:  # noqa: BLE001
        ok, reason = False, f"applies() raised {type(exc).__name__}: {exc}"
        res.status, res.message = FAIL, reason
        return res
    if not ok:
        res.message = reason or "not applicable"
        return res
    try:
        if case.kind == "format":
            path = case.checkpoint
            if path is None:
                path = case.build(Path(workdir) / slug(case.id))
            status, msg, d = compare_load(case, backend.load, path)
            tie = 0
        else:
            with np.errstate(all="ignore"):
                got = backend.route(case) if case.kind == "router" else backend.moe(case)
            status, msg, d, tie = (compare_route if case.kind == "router"
                                   else compare_moe)(case, got)
    except Exception as exc:  # noqa: BLE001 - a crash is a failure of this case only
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        res.status, res.message = FAIL, f"backend raised {tb}"
        res.seconds = time.perf_counter() - start
        return res
    res.status, res.message, res.tie_rows = status, msg, tie
    res.max_abs, res.max_rel, res.max_ulp = d.max_abs, d.max_rel, d.max_ulp
    if status == TIE:
        res.message = f"{tie} row(s) resolved a near-tie differently; matched the reference " \
                      "recomputed on that choice"
    res.seconds = time.perf_counter() - start
    return res


# --------------------------------------------------------------------------------- reports
def write_json(report: Report, path: Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=1, default=float) + "\n")


def write_junit(report: Report, path: Path) -> None:
    """JUnit XML: one <testsuite> per family; tie-ambiguous passes carry a property."""
    root = ET.Element("testsuites", name=f"seif-conformance-{report.backend}",
                      tests=str(len(report.results)), failures=str(report.count(FAIL)),
                      skipped=str(report.count(NA)))
    families: dict[str, list[Result]] = {}
    for r in report.results:
        families.setdefault(r.family, []).append(r)
    for fam, results in families.items():
        suite = ET.SubElement(root, "testsuite", name=fam, tests=str(len(results)),
                              failures=str(sum(r.status == FAIL for r in results)),
                              skipped=str(sum(r.status == NA for r in results)), errors="0",
                              time=f"{sum(r.seconds for r in results):.4f}")
        for r in results:
            tc = ET.SubElement(suite, "testcase", classname=fam.replace("/", "."), name=r.id,
                               time=f"{r.seconds:.4f}")
            props = ET.SubElement(tc, "properties")
            for k, v in (("spec_ref", r.spec_ref), ("dtype", r.dtype), ("status", r.status),
                         ("must_pass", str(r.must_pass).lower()),
                         ("max_abs", f"{r.max_abs:.3g}"), ("max_ulp", f"{r.max_ulp:.3g}")):
                ET.SubElement(props, "property", name=k, value=v)
            if r.status == FAIL:
                ET.SubElement(tc, "failure", message=r.message[:500]).text = r.message
            elif r.status == NA:
                ET.SubElement(tc, "skipped", message=r.message[:500])
            elif r.status == TIE:
                ET.SubElement(tc, "system-out").text = f"tie-ambiguous: {r.message}"
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def print_summary(report: Report, console=None, max_failures: int = 25) -> None:
    """A rich table by family, then the failures and the not-applicable reasons."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"SEIF conformance: backend {report.backend}")
    for col in ("family", "cases", "pass", "tie-ambiguous", "fail", "n/a"):
        table.add_column(col, justify="left" if col == "family" else "right")
    families: dict[str, list[Result]] = {}
    for r in report.results:
        families.setdefault(r.family, []).append(r)
    for fam, results in families.items():
        fails = report.count(FAIL, results)
        table.add_row(fam, str(len(results)), str(report.count(PASS, results)),
                      str(report.count(TIE, results)),
                      f"[bold red]{fails}[/]" if fails else "0", str(report.count(NA, results)))
    table.add_row("[bold]total", str(len(report.results)), str(report.count(PASS)),
                  str(report.count(TIE)), str(report.count(FAIL)), str(report.count(NA)))
    console.print(table)
    failed = [r for r in report.results if r.status == FAIL]
    for r in failed[:max_failures]:
        mark = " [must-pass]" if r.must_pass else ""
        console.print(f"[red]FAIL[/] {r.id}{mark} ({r.spec_ref}): {r.message}", highlight=False,
                      soft_wrap=True)
    if len(failed) > max_failures:
        console.print(f"... and {len(failed) - max_failures} more failures (see --json)")
    reasons: dict[str, int] = {}
    for r in report.results:
        if r.status == NA:
            reasons[r.message] = reasons.get(r.message, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        console.print(f"[yellow]n/a[/] {n} case(s): {reason}", highlight=False, soft_wrap=True)
    for cid in report.missing_must_pass:
        console.print(f"[red]MISSING[/] must-pass case {cid} is not in the catalogue",
                      highlight=False)
