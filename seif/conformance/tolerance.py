"""Tolerance policy and tie-aware comparison (spec §6.4; documented in spec/conformance/).

Two kinds of numbers are compared:

* **Routing** (router weights, Soft MoE dispatch/combine). §6.1 fixes the router's precision to
  float32 whatever the storage dtype, so every router case uses the ``router`` class.
* **Layer outputs** y [T, H]. Expert FFNs may run in the storage dtype (§6.1.2), so the class is
  the case's dtype.

A value passes when ``|got - want| <= atol + rtol * |want|``; NaN must meet NaN and an infinity
the same infinity. The largest error is also reported in ULPs of the class's reporting dtype
(informative, never a criterion).

**Ties.** The reference is float64. Per token, with ``c`` the reference choice values, ``c_k`` the
k-th largest and ``tau`` the token's tie tolerance (stored with the case, see ``tie_tau``):
``A = {e: c[e] > c_k + tau}`` must be selected, the rest must come from the band
``B = {e: |c[e] - c_k| <= tau}``. Values that are *exactly equal in float64* (the same input
values, NaNs, masked zeros) are real ties, which §6.2 resolves to the lower index, so within
each such class only its lowest indices may be taken. Selections other than the reference's
that satisfy this are enumerated at generation time together with their weights (and for MoE
cases the token's output), so a backend that resolves a rounding near-tie the other way is
compared against the reference recomputed on its choice and reported ``tie-ambiguous``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["TOLERANCES", "Tolerance", "admissible", "compare_arrays", "tie_tau"]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    ulp_dtype: str      # ULPs are reported in this format: fp32 | fp16 | bf16
    note: str


# The one table (spec/conformance/README.md repeats it; tests check they agree).
TOLERANCES: dict[str, Tolerance] = {
    "router": Tolerance(3e-5, 1e-7, "fp32",
                        "routing weights, dispatch/combine: float32 math for every storage "
                        "dtype (§6.1)"),
    "fp32": Tolerance(1e-4, 1e-5, "fp32", "MoE output, fp32 weights and activations"),
    "fp16": Tolerance(5e-3, 5e-3, "fp16", "MoE output, fp16 weights (FFN may run in fp16)"),
    "bf16": Tolerance(4e-2, 4e-2, "bf16", "MoE output, bf16 weights (FFN may run in bf16)"),
    "fp8": Tolerance(4e-2, 4e-2, "bf16", "MoE output, fp8-block experts (compute as bf16)"),
    "mxfp4": Tolerance(4e-2, 4e-2, "bf16", "MoE output, mxfp4 experts (compute as bf16)"),
    "int4": Tolerance(4e-2, 4e-2, "bf16", "MoE output, int-group 4-bit experts"),
    "int8": Tolerance(4e-2, 4e-2, "bf16", "MoE output, int-group 8-bit experts"),
    "exact": Tolerance(0.0, 0.0, "fp32", "format cases: tensor values read back bit-exact"),
}

# Tie tolerance: relative part (float32 scoring/normalization rounding with margin, ~6e-5)
# plus the propagated bound on the float32 router matmul error (MoE cases).
TIE_RTOL = 2.0 ** -14
_MANT = {"fp32": 23, "fp16": 10, "bf16": 7}
_EMIN = {"fp32": -126, "fp16": -14, "bf16": -126}


def ulps(got: np.ndarray, want: np.ndarray, fmt: str) -> np.ndarray:
    """|got - want| in units in the last place of `want` in format `fmt` (finite entries)."""
    mag = np.abs(want)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    e = np.maximum(e, _EMIN[fmt])
    return np.abs(got - want) / np.exp2(e - _MANT[fmt])


@dataclass
class Diff:
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float = 0.0
    message: str = ""
    bad: np.ndarray | None = None   # bool mask of failing entries (shape of want)


def compare_arrays(got, want, tol: Tolerance, what: str = "output") -> Diff:
    """Elementwise comparison under `tol` (NaN == NaN, inf == same inf)."""
    want = np.asarray(want, dtype=np.float64)
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return Diff(False, message=f"{what}: not numeric ({exc})")
    if got.shape != want.shape:
        return Diff(False, message=f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    if want.size == 0:
        return Diff(True)
    nan_w, nan_g = np.isnan(want), np.isnan(got)
    inf_w = np.isinf(want)
    finite = ~nan_w & ~inf_w
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(got - want), 0.0)
        bad = np.where(finite, ~(err <= tol.atol + tol.rtol * np.abs(want)), False)
        bad |= nan_w != nan_g
        bad |= inf_w & (got != want)
        rel = np.where(finite & (want != 0), err / np.abs(np.where(want == 0, 1, want)), 0.0)
        ulp = np.where(finite & np.isfinite(got), ulps(got, want, tol.ulp_dtype), 0.0)
    err = np.where(np.isnan(err), np.inf, err)
    d = Diff(not bad.any(), float(err.max()), float(np.nan_to_num(rel, nan=np.inf).max()),
             float(np.nan_to_num(ulp, nan=np.inf).max()), bad=bad)
    if not d.ok:
        i = np.unravel_index(int(np.argmax(bad)), bad.shape)
        d.message = (f"{what}: {int(bad.sum())} of {bad.size} values off (first at "
                     f"{list(map(int, i))}: got {float(got[i])!r}, expected "
                     f"{float(want[i])!r}; max abs {d.max_abs:.3g}, rtol {tol.rtol:g}, "
                     f"atol {tol.atol:g})")
    return d


# ------------------------------------------------------------------------------- ties
def _rank_key(v: np.ndarray) -> np.ndarray:
    """Map values to a key whose plain order is §6.2's order: NaN above +inf above numbers."""
    v = np.asarray(v, dtype=np.float64)
    big = np.finfo(np.float64).max
    key = np.where(np.isposinf(v), big, np.where(np.isneginf(v), -big, v))
    return np.where(np.isnan(v), np.inf, key) + 0.0   # +0.0: -0 and +0 become one key


def tie_tau(kth: float, logit_err: float = 0.0, slope: float = 0.0) -> float:
    """Tie tolerance around the k-th choice value `kth`: float32 rounding of scoring and
    normalization (TIE_RTOL relative) plus `slope` (d choice / d logit) times the bound
    `logit_err` on the float32 router logits' error."""
    if not np.isfinite(kth):
        return 0.0
    return float(TIE_RTOL * abs(kth) + slope * logit_err)


def admissible(values: np.ndarray, k: int, tau: float, limit: int = 64
               ) -> list[tuple[int, ...]]:
    """Every selection of k indices (sorted tuples) that §6.4 accepts for `values`, the
    reference's own first. Exactly equal values keep §6.2's lower-index rule among themselves.
    At most `limit` selections (the enumeration is cut there)."""
    key = _rank_key(values)
    n = key.shape[0]
    order = np.lexsort((np.arange(n), -np.where(np.isinf(key), 0, key), ~np.isposinf(key)))
    ref = tuple(sorted(int(i) for i in order[:k]))
    if k == 0 or k == n:
        return [ref]
    kth = key[order[k - 1]]
    if np.isinf(kth):
        tau = 0.0
    sure = [i for i in range(n) if key[i] > kth + tau and not (np.isinf(kth) and key[i] == kth)]
    band = [i for i in range(n) if key[i] == kth or abs(key[i] - kth) <= tau]
    need = k - len(sure)
    classes: dict[float, list[int]] = {}
    for i in band:
        classes.setdefault(float(key[i]), []).append(i)
    groups = [sorted(v) for _, v in sorted(classes.items(), reverse=True)]
    if len(groups) == 1:
        return [ref]
    out = [ref]
    for counts in itertools.product(*[range(len(g) + 1) for g in groups]):
        if sum(counts) != need:
            continue
        sel = tuple(sorted(sure + [i for g, c in zip(groups, counts) for i in g[:c]]))
        if sel not in out:
            out.append(sel)
            if len(out) >= limit:
                break
    return out
