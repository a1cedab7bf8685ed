"""`seif.runtime.Session`: run an exported SEIF ONNX model in ONNX Runtime, and `seif run`.

    sess = Session("layer0.onnx", device="cpu")
    y = sess.run({"hidden_states": x})["output"]
    sess.provider        # the execution provider ORT actually uses, e.g. "CPUExecutionProvider"

The custom-op library (`libseif_ort.so`, found by `seif.runtime.library_path()`) is registered
when present: its kernels then replace the `ai.seif` function bodies. When it is absent, a model
using `ai.seif` ops still runs on those bodies (a portable, slow reference), with one warning per
process. ONNX Runtime silently falls back to CPU when a requested provider is missing, so the
session checks the provider it got and raises instead of pretending.

onnxruntime is imported when a Session is created, never at import time.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

from seif.errors import FormatError, SeifError

from .library import ENV_VAR, LIBRARY_NAME, library_path

__all__ = ["Session", "model_domains", "run_command"]

SEIF_DOMAIN = "ai.seif"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_warned_no_library = False


# --------------------------------------------------------------------------- model scan
def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def model_domains(path: str | os.PathLike) -> set[str]:
    """The operator domains a model imports (ModelProto.opset_import), read without parsing
    the graph: the top-level protobuf fields are walked and the graph's bytes skipped, so this
    costs a few reads even for a multi-gigabyte model."""
    domains: set[str] = set()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = 0
        while pos < size:
            fh.seek(pos)
            head = fh.read(20)
            if not head:
                break
            tag, used = _varint(head, 0)
            field, wire = tag >> 3, tag & 7
            pos += used
            if wire == 0:
                fh.seek(pos)
                _, used = _varint(fh.read(10), 0)
                pos += used
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                fh.seek(pos)
                length, used = _varint(fh.read(10), 0)
                pos += used
                if field == 8:                         # OperatorSetIdProto
                    fh.seek(pos)
                    domains.add(_opset_domain(fh.read(length)))
                pos += length
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")
    return domains


def _opset_domain(buf: bytes) -> str:
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _varint(buf, pos)
            if field == 1:
                return buf[pos:pos + length].decode("utf-8", "replace")
            pos += length
        elif wire == 0:
            _, pos = _varint(buf, pos)
        else:
            pos += {1: 8, 5: 4}.get(wire, len(buf))
    return ""


# --------------------------------------------------------------------------- session
class Session:
    """An ONNX Runtime session for a SEIF-exported model, on a verified execution provider.

    device: "cpu" or "cuda". library: "auto" (register `library_path()` when found), a path, or
    None (never register: run the function bodies).
    """

    def __init__(self, onnx_path: str | os.PathLike, device: str = "cpu", *,
                 library: str | os.PathLike | None = "auto", session_options=None):
        global _warned_no_library
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the environment
            raise SeifError("running ONNX models needs onnxruntime: pip install "
                            "'seif[onnx]'") from None
        if device not in _PROVIDERS:
            raise SeifError(f"unknown device {device!r}; use cpu or cuda")
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FormatError("no such ONNX model file", path=str(self.path))
        self.device = device
        wanted = _PROVIDERS[device]
        available = ort.get_available_providers()
        if wanted not in available:
            raise SeifError(f"device {device!r} needs {wanted}, which this onnxruntime "
                            f"({ort.__version__}) lacks (it has {', '.join(available)}); "
                            "install onnxruntime-gpu for CUDA")
        try:
            self.uses_seif_ops = SEIF_DOMAIN in model_domains(self.path)
        except (OSError, ValueError):
            self.uses_seif_ops = False
        so = session_options or ort.SessionOptions()
        if library == "auto":
            lib = library_path()
        else:
            lib = Path(library) if library is not None else None
        self.library: Path | None = None
        if lib is not None:
            try:
                so.register_custom_ops_library(str(lib))
            except Exception as exc:
                raise SeifError(f"cannot register the custom-op library: {exc}",
                                path=str(lib)) from None
            self.library = lib
        elif self.uses_seif_ops and library == "auto" and not _warned_no_library:
            _warned_no_library = True
            env = os.environ.get(ENV_VAR)
            hint = f" (${ENV_VAR}={env} is not a file)" if env else ""
            warnings.warn(
                f"{LIBRARY_NAME} not found{hint}: ai.seif ops run on their portable ONNX "
                "function bodies (correct but slow, every expert computed densely). Build "
                "runtime/ or set $SEIF_ORT_LIBRARY to use the kernels.",
                RuntimeWarning, stacklevel=2)
        providers = [wanted] if device == "cpu" else [wanted, "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as exc:
            raise SeifError(f"onnxruntime cannot load the model: {exc}",
                            path=str(self.path)) from None
        self.providers: list[str] = list(self._session.get_providers())
        self.provider = self.providers[0] if self.providers else None
        if self.provider != wanted:
            raise SeifError(f"asked for {wanted} but onnxruntime runs this session on "
                            f"{self.provider} (silent fallback); refusing to mislabel the run")
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    @property
    def inputs(self):
        """ONNX Runtime's NodeArg list (name, shape with symbolic dims, type)."""
        return self._session.get_inputs()

    @property
    def outputs(self):
        return self._session.get_outputs()

    def run(self, feeds: dict[str, np.ndarray] | np.ndarray | None = None,
            **named: np.ndarray) -> dict[str, np.ndarray]:
        """Run once; `feeds` maps input names to arrays (a bare array for a one-input model).
        Returns {output name: array}."""
        if isinstance(feeds, np.ndarray):
            if len(self.input_names) != 1:
                raise SeifError(f"the model has inputs {self.input_names}; pass a dict")
            feeds = {self.input_names[0]: feeds}
        feeds = {**(feeds or {}), **named}
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise SeifError(f"missing input(s): {', '.join(sorted(missing))}")
        values = self._session.run(None, feeds)
        return dict(zip(self.output_names, values))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[self.output_names[0]]

    def __repr__(self) -> str:
        return (f"Session({str(self.path)!r}, device={self.device!r}, provider={self.provider!r}, "
                f"library={str(self.library) if self.library else None!r})")


# --------------------------------------------------------------------------- `seif run`
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _random_feed(arg, tokens: int, rng: np.random.Generator) -> np.ndarray:
    shape = []
    for i, dim in enumerate(arg.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif i == 0:
            shape.append(tokens)
        else:
            raise SeifError(f"input {arg.name} has a dynamic dimension {dim!r} beyond the first;"
                            " pass --input")
    dtype = _NUMPY_TYPES.get(arg.type)
    if dtype is None:
        raise SeifError(f"input {arg.name} has type {arg.type}; pass --input")
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)


def _describe(name: str, a: np.ndarray) -> str:
    line = f"  {name}: {a.dtype}{list(a.shape)}"
    if a.size and np.issubdtype(a.dtype, np.number):
        f = a.astype(np.float64)
        line += (f"  mean {np.nanmean(f):+.6g}  std {np.nanstd(f):.6g}  "
                 f"min {np.nanmin(f):+.6g}  max {np.nanmax(f):+.6g}")
        if np.isnan(f).any():
            line += f"  NaN {int(np.isnan(f).sum())}"
        flat = a.reshape(-1)[:6]
        line += "\n    first: " + " ".join(f"{v:+.6g}" if np.issubdtype(a.dtype, np.floating)
                                           else str(v) for v in flat.tolist())
    return line


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "inputs", multiple=True, metavar="[NAME=]FILE.npy",
              help="Input array (.npy); NAME= for models with several inputs. Repeatable.")
@click.option("--random", "random_tokens", type=click.IntRange(min=0), metavar="T",
              help="Random float32 inputs with T tokens (the dynamic first dimension).")
@click.option("--device", type=click.Choice(sorted(_PROVIDERS)), default="cpu", show_default=True)
@click.option("--repeat", type=click.IntRange(min=0), default=10, show_default=True,
              help="Timed runs after the first (warm-up) run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random.")
@click.option("--no-library", is_flag=True, help="Do not register libseif_ort.so even if found.")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the outputs to this .npz file.")
def run_command(model: Path, inputs: tuple[str, ...], random_tokens: int | None, device: str,
                repeat: int, seed: int, no_library: bool, save: Path | None) -> None:
    """Run MODEL.onnx in ONNX Runtime and print its outputs and timing.

    Give the inputs with --input FILE.npy, or random ones with --random T.
    """
    try:
        _run(model, inputs, random_tokens, device, repeat, seed, no_library, save)
    except SeifError as exc:
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.find_root().params.get("debug"):
            raise
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)


def _run(model, inputs, random_tokens, device, repeat, seed, no_library, save) -> None:
    if bool(inputs) == (random_tokens is not None):
        raise SeifError("give --input FILE.npy or --random T (one of them)")
    sess = Session(model, device, library=None if no_library else "auto")
    feeds: dict[str, np.ndarray] = {}
    if random_tokens is not None:
        rng = np.random.default_rng(seed)
        feeds = {arg.name: _random_feed(arg, random_tokens, rng) for arg in sess.inputs}
    else:
        for spec in inputs:
            name, sep, file = spec.partition("=")
            if not sep:
                if len(sess.input_names) != 1 or len(inputs) != 1:
                    raise SeifError(f"the model has inputs {sess.input_names}; use NAME=FILE.npy")
                name, file = sess.input_names[0], spec
            if name not in sess.input_names:
                raise SeifError(f"the model has no input {name!r} (it has {sess.input_names})")
            try:
                feeds[name] = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise FormatError(f"cannot read the array: {exc}", path=file) from None
    t0 = time.perf_counter()
    try:
        out = sess.run(feeds)
    except SeifError:
        raise
    except Exception as exc:
        raise SeifError(f"onnxruntime failed: {exc}", path=str(model)) from None
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(feeds)
        times.append(time.perf_counter() - t0)
    lib = str(sess.library) if sess.library else \
        ("none (function bodies)" if sess.uses_seif_ops else "none")
    click.echo(f"model    {model}")
    click.echo(f"provider {sess.provider}   library {lib}")
    click.echo("inputs")
    for name, a in feeds.items():
        click.echo(f"  {name}: {a.dtype}{list(a.shape)}")
    click.echo("outputs")
    for name, a in out.items():
        click.echo(_describe(name, a))
    line = f"timing   first run {first * 1e3:.3f} ms"
    if times:
        line += (f"; {len(times)} runs: median {np.median(times) * 1e3:.3f} ms, "
                 f"mean {np.mean(times) * 1e3:.3f} ms, min {np.min(times) * 1e3:.3f} ms")
    click.echo(line)
    if save is not None:
        np.savez(save, **out)
        click.echo(f"saved    {save}")

