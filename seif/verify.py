"""`seif verify SRC DST`: do two checkpoints compute the same MoE layers?

SRC and DST are each a SEIF checkpoint or a transformers directory (`config.json` +
safetensors); a transformers directory is converted on the fly into a temporary SEIF checkpoint
by the registered converter. For every MoE layer present in both (matched by the source model's
decoder-layer index), the SEIF reference forward (`seif.moe.moe_forward`) of each side runs on the
same random hidden states, and the report gives, per layer:

* `max_error`: the largest absolute difference of the two outputs;
* `routing_agreement`: the fraction of tokens whose selected expert sets are the same, tie-aware
  (spec §6.4): a token whose reference has a tie at the k-th place agrees with either choice;
* `oracle_error` / `oracle_agreement`, when a side is a transformers directory and torch and
  transformers are installed: the same against transformers' own MoE block forward for that
  layer (the model built with `AutoModelForCausalLM.from_pretrained`, in float32), compared with
  the reference output of both sides. That is the real oracle: a converter bug that both sides
  share is caught only there.

A layer fails when an error exceeds its allowance, `tolerance + rtol * scale` (`scale`: the largest
magnitude of the src side's reference output on that layer), or any token's routing disagrees; a
layer present on one side only fails as "missing". The relative part is there because fp32
rounding differences between two correct implementations (a different summation order over the
hidden size, the experts' intermediate size, the k experts) grow with the output's magnitude and
the hidden size: an absolute 1e-5 alone fails correct conversions of large layers. Nothing here
imports torch unless an oracle runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from .errors import SeifError
from .manifest import LayerSpec
from .moe import MoEParams, moe_forward
from .routing import _group_limit, expert_choice, route, router_logits

__all__ = ["LayerResult", "VerifyError", "VerifyReport", "verify", "verify_command"]

TOKEN_CHOICE = ("topk", "group_topk", "sparse_mixer")


class VerifyError(SeifError):
    """The two checkpoints cannot be compared (no common MoE layer, unknown format, ...)."""


@dataclass
class LayerResult:
    layer: int
    experts: str                      # "8", or "8/6" when the sides differ
    routing: str                      # routing kind(s)
    max_error: float | None           # None when the layer is missing on one side
    routing_agreement: float | None   # None when not applicable (soft_moe, missing)
    oracle_error: float | None = None
    oracle_agreement: float | None = None
    status: str = "ok"                # ok | FAIL | missing
    scale: float | None = None        # max |src reference output| on this layer
    allowed: float | None = None      # tolerance + rtol * scale: the largest error accepted
    notes: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    src: str
    dst: str
    src_format: str
    dst_format: str
    tolerance: float
    tokens: int
    seed: int
    oracle: str                       # "transformers" when an oracle ran, else "none"
    layers: list[LayerResult]
    rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.layers) and all(r.status == "ok" for r in self.layers)

    @property
    def failed(self) -> list[int]:
        return [r.layer for r in self.layers if r.status != "ok"]

    def to_dict(self) -> dict:
        d = asdict(self)
        for row in d["layers"]:       # JSON has no NaN/inf: report them as strings
            for key in ("max_error", "oracle_error", "scale", "allowed"):
                v = row[key]
                if v is not None and not math.isfinite(v):
                    row[key] = str(v)
        d["ok"] = self.ok
        d["failed_layers"] = self.failed
        return d


# --------------------------------------------------------------------------- sides
@dataclass
class _Side:
    label: str
    path: Path
    format: str
    ckpt: object                      # seif.reader.Checkpoint
    model: object = None              # transformers model (oracle), lazily built


def _open_side(label: str, path: Path, stack: contextlib.ExitStack) -> _Side:
    from .convert import convert, detect_format
    from .reader import Checkpoint

    fmt = detect_format(path)
    if fmt == "seif":
        return _Side(label, path, fmt, stack.enter_context(Checkpoint(path)))
    if fmt == "transformers":
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seif-verify-")))
        out = convert(path, tmp / f"{label}.seif", source_format="transformers",
                      target_format="seif", show_progress=False)
        return _Side(label, path, fmt, stack.enter_context(Checkpoint(out)))
    raise VerifyError(f"verify compares SEIF checkpoints and transformers directories, not "
                      f"{fmt}", path=str(path))


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- routing
def _selection(x: np.ndarray, layer: LayerSpec, params: MoEParams):
    """What the reference selects: ("token", indices [T, k], choice values [T, E]) for token
    choice, ("expert", picked [T, E] bool) for expert choice, None for soft MoE."""
    r = layer.routing
    logits = router_logits(x, params.router_weight, params.router_bias)
    if r.kind in TOKEN_CHOICE:
        res = route(logits, r, params.selection_bias)
        if r.kind == "sparse_mixer":
            choice = logits
        else:
            choice = res.scores if params.selection_bias is None \
                else res.scores + np.asarray(params.selection_bias, dtype=np.float32)
            if r.kind == "group_topk":
                choice = _group_limit(choice, r)
        return ("token", res.indices, choice)
    if r.kind == "expert_choice":
        tok, _ = expert_choice(logits, r)
        picked = np.zeros((x.shape[0], layer.num_experts), dtype=bool)
        for e in range(layer.num_experts):
            picked[tok[e], e] = True
        return ("expert", picked)
    return None


def _accepted(choice: np.ndarray, ref_idx: np.ndarray, other: np.ndarray,
              tau: float) -> np.ndarray:
    """Per token: is the selection `other` [T, k] acceptable against a reference with choice
    values `choice` [T, E] and selection `ref_idx` [T, k] (spec §6.4)? The sure set (strictly
    above the k-th value + tau) must be selected, the rest from the tie band."""
    T, E = choice.shape
    if other.shape != ref_idx.shape or (other.size and other.max() >= E):
        return np.zeros(T, dtype=bool)
    kth = np.take_along_axis(choice, ref_idx[:, -1:], axis=-1)             # [T, 1]
    sure = choice > kth + tau
    band = np.abs(choice - kth) <= tau
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, other, True, axis=-1)
    distinct = np.sort(other, axis=-1)
    distinct = np.all(distinct[:, 1:] != distinct[:, :-1], axis=-1) if other.shape[1] > 1 \
        else np.ones(T, dtype=bool)
    return distinct & np.all(~sure | chosen, axis=-1) & np.all(~chosen | sure | band, axis=-1)


def _agreement(a, b, tau: float) -> float | None:
    """Fraction of tokens whose selections agree, tie-aware, each side taken as reference."""
    if a is None or b is None:
        return None
    if a[0] != b[0]:
        return 0.0
    if a[0] == "expert":
        if a[1].shape != b[1].shape:
            return 0.0
        return float(np.mean(np.all(a[1] == b[1], axis=-1))) if a[1].shape[0] else 1.0
    _, ia, ca = a
    _, ib, cb = b
    T = ia.shape[0]
    if T == 0:
        return 1.0
    same = np.zeros(T, dtype=bool)
    if ia.shape == ib.shape:
        same = np.all(np.sort(ia, -1) == np.sort(ib, -1), axis=-1)
    ok = same | _accepted(ca, ia, ib, tau) | _accepted(cb, ib, ia, tau)
    return float(np.mean(ok))


# --------------------------------------------------------------------------- oracle
def _oracle_model(side: _Side):
    if side.model is None:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        from seif.converters.torch import _family

        kwargs = dict(dtype=torch.float32)
        family = _family(side.ckpt.manifest.model.model_type)
        auto = getattr(transformers, getattr(family, "automodel", None) or
                       "AutoModelForCausalLM")
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()          # keep stderr to one line per problem
        try:
            model = auto.from_pretrained(str(side.path), **kwargs)
        except ValueError:           # not this head: the bare model has the blocks too
            model = transformers.AutoModel.from_pretrained(str(side.path), **kwargs)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        side.model = model.eval()
    return side.model


def _oracle_forward(side: _Side, layer: LayerSpec, x: np.ndarray):
    """transformers' own MoE block for `layer` on x: (output [T, H], selected indices [T, k] or
    None). A shared MLP that the family keeps outside the block is added, as its decoder
    layer does."""
    import torch

    from seif.converters.torch import _family, find_moe_block, shared_outside_block

    model = _oracle_model(side)
    model_type = getattr(model.config, "model_type", None)
    name, block = find_moe_block(model, layer.index, model_type, layer.source_prefix)
    T = x.shape[0]
    captured: list = []

    def grab(_module, args, kwargs=None):
        for a in [*args, *(kwargs or {}).values()]:
            if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == T \
                    and not a.is_floating_point():
                captured.append(a.detach().clone())
                return

    hooks = []
    experts = getattr(block, "experts", None)
    if isinstance(experts, torch.nn.Module):
        hooks.append(experts.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            xt = torch.from_numpy(x)
            out = block(xt[None])
            if isinstance(out, tuple):
                out = out[0]
            out = out.reshape(T, -1).float()
            shared = shared_outside_block(_family(model_type), layer.index, name)
            if shared is not None:
                out = out + model.get_submodule(shared)(xt[None]).reshape(T, -1).float()
    finally:
        for h in hooks:
            h.remove()
    return out.numpy(), (captured[0].numpy().astype(np.int64) if captured else None)


# --------------------------------------------------------------------------- verify
def verify(src, dst, tolerance: float = 1e-5, tokens: int = 64, seed: int = 0, *,
           oracle: bool | None = None, tie_tolerance: float = 0.0,
           rtol: float = 1e-5) -> VerifyReport:
    """Compare every MoE layer of `src` and `dst` (SEIF checkpoints or transformers dirs).

    A layer's outputs agree when the max abs error is <= `tolerance + rtol * scale`, `scale`
    being the largest magnitude of src's reference output on that layer (`rtol=0`: absolute
    only). `oracle`: None runs transformers' own MoE blocks for transformers sides when torch
    and transformers are installed; True requires it; False skips it. Hidden states are
    N(0, 1), `tokens` of them per layer, from `seed`.
    """
    if tokens < 1:
        raise VerifyError(f"tokens must be >= 1, not {tokens}")
    if not tolerance >= 0:
        raise VerifyError(f"tolerance must be >= 0, not {tolerance}")
    if not rtol >= 0:
        raise VerifyError(f"rtol must be >= 0, not {rtol}")
    src, dst = Path(src), Path(dst)
    rows: list[LayerResult] = []
    with contextlib.ExitStack() as stack:
        a = _open_side("src", src, stack)
        b = _open_side("dst", dst, stack)
        hf_sides = [s for s in (a, b) if s.format == "transformers"]
        if oracle and not hf_sides:
            raise VerifyError("--oracle needs a transformers directory on one side")
        if oracle and not _torch_available():
            raise VerifyError("--oracle needs torch and transformers installed")
        run_oracle = bool(hf_sides) and (oracle if oracle is not None else _torch_available())
        la = {layer.index: layer for layer in a.ckpt.layers}
        lb = {layer.index: layer for layer in b.ckpt.layers}
        if not set(la) & set(lb):
            raise VerifyError(f"no MoE layer in common: {src} has layers "
                              f"{sorted(la) or 'none'}, {dst} has {sorted(lb) or 'none'}")
        for index in sorted(set(la) | set(lb)):
            if index not in la or index not in lb:
                where = "src" if index in la else "dst"
                spec = la.get(index) or lb[index]
                rows.append(LayerResult(index, str(spec.num_experts), spec.routing.kind, None,
                                        None, status="missing",
                                        notes=[f"only in {where}"]))
                continue
            rows.append(_compare_layer(a, b, la[index], lb[index], hf_sides if run_oracle
                                       else [], (tolerance, rtol), tokens, seed,
                                       tie_tolerance))
    return VerifyReport(str(src), str(dst), a.format, b.format, tolerance, tokens, seed,
                        "transformers" if run_oracle else "none", rows, rtol)


def _compare_layer(a: _Side, b: _Side, sa: LayerSpec, sb: LayerSpec, oracles: list[_Side],
                   tols: tuple[float, float], tokens: int, seed: int, tau: float
                   ) -> LayerResult:
    experts = str(sa.num_experts) if sa.num_experts == sb.num_experts \
        else f"{sa.num_experts}/{sb.num_experts}"
    kind = sa.routing.kind if sa.routing.kind == sb.routing.kind \
        else f"{sa.routing.kind}/{sb.routing.kind}"
    row = LayerResult(sa.index, experts, kind, None, None)
    if sa.hidden_size != sb.hidden_size:
        row.status = "FAIL"
        row.notes.append(f"hidden size {sa.hidden_size} vs {sb.hidden_size}")
        return row
    x = np.random.default_rng([seed, sa.index]).standard_normal(
        (tokens, sa.hidden_size)).astype(np.float32)
    pa, pb = a.ckpt.moe_params(sa.index), b.ckpt.moe_params(sb.index)
    ya, yb = moe_forward(x, sa, pa), moe_forward(x, sb, pb)
    row.max_error = float(np.max(np.abs(ya - yb)))
    row.scale = float(np.max(np.abs(ya))) if ya.size else 0.0
    row.allowed = tol = tols[0] + tols[1] * row.scale
    sel_a, sel_b = _selection(x, sa, pa), _selection(x, sb, pb)
    row.routing_agreement = _agreement(sel_a, sel_b, tau)
    failed = not row.max_error <= tol          # NaN fails too
    if row.routing_agreement is not None and row.routing_agreement < 1.0:
        failed = True
    if sa.routing.to_dict() != sb.routing.to_dict():
        row.notes.append("routing descriptors differ")
    for side in oracles:
        try:
            y_hf, idx_hf = _oracle_forward(side, side.ckpt.layer(sa.index), x)
        except (SeifError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
            row.notes.append(f"no transformers oracle for {side.label}: {exc}")
            continue
        err = max(float(np.max(np.abs(y_hf - ya))), float(np.max(np.abs(y_hf - yb))))
        row.oracle_error = err if row.oracle_error is None else max(row.oracle_error, err)
        if not err <= tol:
            failed = True
        if idx_hf is not None and sel_a is not None and sel_a[0] == "token":
            hf_sel = ("token", idx_hf, None)
            agree = min(_agree_with(sel_a, hf_sel, tau), _agree_with(sel_b, hf_sel, tau))
            row.oracle_agreement = agree if row.oracle_agreement is None \
                else min(row.oracle_agreement, agree)
            if agree < 1.0:
                failed = True
    row.status = "FAIL" if failed else "ok"
    return row


def _agree_with(ref, other, tau: float) -> float:
    """Agreement of `other`'s token selection (no choice values) with reference `ref`."""
    if ref is None or ref[0] != "token" or other[1].shape[0] != ref[1].shape[0]:
        return 0.0
    _, idx, choice = ref
    T = idx.shape[0]
    if T == 0:
        return 1.0
    same = np.zeros(T, dtype=bool)
    if idx.shape == other[1].shape:
        same = np.all(np.sort(idx, -1) == np.sort(other[1], -1), axis=-1)
    return float(np.mean(same | _accepted(choice, idx, other[1], tau)))


# --------------------------------------------------------------------------- output
def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.2e}"


def print_report(report: VerifyReport, console=None) -> None:
    from rich.table import Table

    from .inspect import make_console

    console = console or make_console()
    console.print(f"[bold]seif verify[/] {report.src} ({report.src_format}) vs {report.dst} "
                  f"({report.dst_format}); {report.tokens} random tokens per layer, seed "
                  f"{report.seed}, tolerance {_tolerance(report)}; transformers oracle: "
                  f"{'yes' if report.oracle != 'none' else 'no'}")
    table = Table(title="MoE layers")
    columns = ["layer", "experts", "routing", "max error", "allowed", "routing agreement"]
    if report.oracle != "none":
        columns += ["vs transformers", "transformers routing"]
    columns += ["status", "notes"]
    for col in columns:
        table.add_column(col)
    for r in report.layers:
        cells = [str(r.layer), r.experts, r.routing, _fmt(r.max_error), _fmt(r.allowed),
                 _fmt(r.routing_agreement, pct=True)]
        if report.oracle != "none":
            cells += [_fmt(r.oracle_error), _fmt(r.oracle_agreement, pct=True)]
        style = "green" if r.status == "ok" else "bold red"
        cells += [f"[{style}]{r.status}[/]", "; ".join(r.notes)]
        table.add_row(*cells)
    console.print(table)
    if report.ok:
        console.print(f"ok: {len(report.layers)} MoE layers agree within "
                      f"{_tolerance(report)}")
    else:
        console.print(f"FAIL: layer(s) {', '.join(map(str, report.failed))} differ")


def _tolerance(report: VerifyReport) -> str:
    if not report.rtol:
        return f"{report.tolerance:g}"
    return f"{report.tolerance:g} + {report.rtol:g} x max|y|"


def _friendly(fn):
    """seif.cli's `_friendly_errors` (one-line SeifError messages), looked up when the command
    runs: seif.cli imports this module to add the command, so importing it here at import time
    would be circular."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cli import _friendly_errors
        return _friendly_errors(fn)(*args, **kwargs)
    return wrapper


@click.command("verify")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--tolerance", default=1e-5, show_default=True, type=float,
              help="Absolute part of the output difference allowed per layer.")
@click.option("--rtol", default=1e-5, show_default=True, type=float,
              help="Relative part: a layer passes when its max abs error is <= tolerance + "
                   "rtol x max|reference output| (fp32 rounding grows with the output's "
                   "magnitude and the hidden size); 0 = absolute only.")
@click.option("--tokens", default=64, show_default=True, type=int,
              help="Random hidden states per layer.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the hidden states.")
@click.option("--oracle/--no-oracle", default=None,
              help="Also run transformers' own MoE blocks for a transformers side (default: "
                   "when torch and transformers are installed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly
def verify_command(src: Path, dst: Path, tolerance: float, rtol: float, tokens: int,
                   seed: int, oracle: bool | None, as_json: bool) -> None:
    """Check that SRC and DST (SEIF checkpoints or transformers directories) compute the same
    MoE layers: per layer, the max abs error of the reference forward on the same random hidden
    states and the routing agreement (tie-aware). Exits 1 when any layer differs."""
    report = verify(src, dst, tolerance, tokens, seed, oracle=oracle, rtol=rtol)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if not report.ok:
        raise SystemExit(1)
