"""The conformance case model, its on-disk form, and case selection (`-k`).

A case is one thing a backend must get right:

* ``router``: router logits [T, E] (stored in the case's dtype) and a routing descriptor; the
  backend returns the routing (indices and weights, see :class:`~seif.conformance.Backend`).
* ``moe``: tokens x [T, H] and the layer's tensors under their canonical SEIF names (§4.1),
  possibly quantized (``quantization`` holds the §4.12 descriptors); the backend returns y [T, H].
* ``format``: a checkpoint directory; the backend must load it, or refuse it with the named
  ``SeifError`` subclass.

On disk (``seif conformance generate``) a case is ``cases/<slug>.json`` (everything but arrays)
plus ``cases/<slug>.npz`` (inputs ``in/<name>``, tensors ``t/<name>``, expected ``ex/<name>``),
and for format cases a directory ``format/<slug>/``. The npz files are written with fixed zip
timestamps so that the same catalogue gives the same bytes, hence the same SHA-256.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import dtypes as _dtypes

__all__ = ["Case", "load_cases", "matches", "save_case", "slug"]

KINDS = ("router", "moe", "format")


@dataclass
class Case:
    """One conformance case. Arrays are NumPy; `layer` is a `LayerSpec.to_dict()`.

    Attributes:
        id: stable identifier, ``kind/family/variant/.../dtype``; never reused for other content.
        kind: ``router`` | ``moe`` | ``format``.
        description: one sentence saying what is tested.
        spec_ref: the spec section(s) it checks, e.g. ``"§5.5, §6.2"``.
        dtype: storage dtype of inputs/weights (``fp32``, ``fp16``, ``bf16``, ``fp8``,
            ``mxfp4``, ``int4``, ``int8``); names the tolerance class of MoE outputs.
        layer: the MoE layer descriptor (router and moe cases).
        inputs: ``logits`` (router) or ``x`` (moe).
        tensors: canonical name -> stored array (moe), including quantization companions.
        quantization: canonical name -> §4.12 descriptor dict, for quantized tensors.
        expected: reference outputs in float64 (router: ``indices``, ``weights``, ``kept``,
            ``choice``, ``tau``, ``alt_*``; moe: ``y``, ``alt_token``, ``alt_y``; format:
            ``t/<name>`` real tensor values of an accepted checkpoint).
        expect_error: format cases: the SeifError class name a reader must raise, or None.
        checkpoint: format cases: path of the checkpoint, once materialized.
        tags: free labels (``ties``, ``near-ties``, ``nan``, ``capacity`` ...).
    """

    id: str
    kind: str
    description: str
    spec_ref: str
    dtype: str = "fp32"
    layer: dict | None = None
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    quantization: dict[str, dict] = field(default_factory=dict)
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    expect_error: str | None = None
    checkpoint: Path | None = None
    tags: tuple[str, ...] = ()
    # format cases: builds the checkpoint under a directory and returns its path (not saved)
    build: Any = field(default=None, repr=False, compare=False)

    # -- conveniences for backends --------------------------------------------------------
    @property
    def family(self) -> str:
        """``kind/second-part`` of the id: the row of the summary table."""
        return "/".join(self.id.split("/")[:2])

    @property
    def routing(self) -> dict:
        """The layer's routing descriptor (§4.5) as a dict."""
        return (self.layer or {}).get("routing", {})

    def layer_spec(self):
        """The layer descriptor as a `seif.manifest.LayerSpec`."""
        from ..manifest import LayerSpec
        return LayerSpec.from_dict(self.layer, "layer")

    def real_tensors(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """Every canonical tensor as real values (quantized ones dequantized per §3.3)."""
        from ..manifest import Quantization
        from ..quant import dequantize
        companions = {q[k] for q in self.quantization.values()
                      for k in ("scale", "zero_point") if q.get(k)}
        out = {}
        for name, array in self.tensors.items():
            if name in companions:
                continue
            q = self.quantization.get(name)
            if q is None:
                out[name] = array.astype(dtype)
            else:
                desc = Quantization.from_dict(q, name)
                out[name] = dequantize(array, desc, self.tensors.__getitem__, name).astype(dtype)
        return out

    def moe_params(self, dtype=np.float32):
        """The layer's tensors as `seif.moe.MoEParams` (real values in `dtype`)."""
        from ..moe import MoEParams
        real = self.real_tensors(dtype)
        return MoEParams.from_tensors(self.layer_spec(), real.__getitem__)

    def summary(self) -> dict:
        return {"id": self.id, "kind": self.kind, "family": self.family,
                "description": self.description, "spec_ref": self.spec_ref,
                "dtype": self.dtype, "tags": list(self.tags),
                "expect_error": self.expect_error}


# ---------------------------------------------------------------------------------------- IO
def slug(case_id: str) -> str:
    """File-system name of a case id (``/`` -> ``__``)."""
    return case_id.replace("/", "__")


_DTYPE_TAG = {np.dtype(v): k for k, v in _dtypes.DTYPES.items()}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A .npz with fixed member timestamps and order, so equal arrays give equal bytes.
    Non-NumPy dtypes (bfloat16, float8) are stored as raw bits plus their SEIF dtype name."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name])
            tag = _DTYPE_TAG.get(a.dtype)
            if a.dtype.kind == "V" or (tag in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")):
                name = f"{name}@{tag}"
                a = a.view(f"u{a.dtype.itemsize}")
            member = io.BytesIO()
            np.lib.format.write_array(member, a, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    path.write_bytes(buf.getvalue())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for name in z.files:
            a = z[name]
            if "@" in name:
                name, tag = name.rsplit("@", 1)
                a = a.view(_dtypes.to_numpy(tag))
            out[name] = a
    return out


def save_case(case: Case, root: Path) -> list[Path]:
    """Write `case` under `root` (``cases/``, ``format/``); return the files written."""
    cases_dir = root / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    s = slug(case.id)
    meta = case.summary()
    meta.update(layer=case.layer, quantization=case.quantization)
    written = []
    if case.kind == "format":
        target = root / "format" / s
        target.mkdir(parents=True, exist_ok=True)
        ckpt = case.build(target) if case.build is not None else case.checkpoint
        meta["checkpoint"] = str(Path(ckpt).relative_to(root))
        case.checkpoint = Path(ckpt)
        written += sorted(p for p in target.rglob("*") if not p.is_dir() or p.is_symlink())
    arrays = {f"in/{k}": v for k, v in case.inputs.items()}
    arrays.update({f"t/{k}": v for k, v in case.tensors.items()})
    arrays.update({f"ex/{k}": v for k, v in case.expected.items()})
    npz = cases_dir / f"{s}.npz"
    _write_npz(npz, arrays)
    js = cases_dir / f"{s}.json"
    js.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return [js, npz] + written


def load_cases(root: Path) -> list[Case]:
    """Read the cases written by `save_case` (in catalogue order, from ``catalogue.json``)."""
    root = Path(root)
    index = json.loads((root / "catalogue.json").read_text())
    out = []
    for entry in index["cases"]:
        s = slug(entry["id"])
        meta = json.loads((root / "cases" / f"{s}.json").read_text())
        arrays = _read_npz(root / "cases" / f"{s}.npz")
        part = {p: {k[len(p) + 1:]: v for k, v in arrays.items() if k.startswith(p + "/")}
                for p in ("in", "t", "ex")}
        out.append(Case(
            id=meta["id"], kind=meta["kind"], description=meta["description"],
            spec_ref=meta["spec_ref"], dtype=meta["dtype"], layer=meta.get("layer"),
            inputs=part["in"], tensors=part["t"], quantization=meta.get("quantization") or {},
            expected=part["ex"], expect_error=meta.get("expect_error"),
            checkpoint=(root / meta["checkpoint"]) if meta.get("checkpoint") else None,
            tags=tuple(meta.get("tags", ()))))
    return out


# ----------------------------------------------------------------------------- selection
_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def matches(expr: str | None, case_id: str, tags: Iterable[str] = ()) -> bool:
    """pytest-style `-k`: words are substrings of the id (or exact tags), combined with
    ``and``, ``or``, ``not`` and parentheses; plain words next to each other mean ``and``.
    ``*`` and ``?`` in a word make it a glob over the whole id."""
    if not expr or not expr.strip():
        return True
    from fnmatch import fnmatchcase
    tags = set(tags)
    out: list[str] = []
    for tok in _TOKEN.findall(expr):
        if tok in ("(", ")", "and", "or", "not"):
            if out and out[-1] not in ("(", "and", "or", "not") and tok in ("(", "not"):
                out.append("and")
            out.append(tok)
            continue
        if any(c in tok for c in "*?["):
            hit = fnmatchcase(case_id, tok)
        else:
            hit = tok in case_id or tok in tags
        if out and out[-1] not in ("(", "and", "or", "not"):
            out.append("and")
        out.append(str(hit))
    try:
        return bool(eval(" ".join(out), {"__builtins__": {}}, {}))  # only True/False/ops
    except SyntaxError:
        raise ValueError(f"cannot parse -k expression {expr!r}") from None
