"""The `seif` command line (click). Every command maps SeifError to one line and an exit code."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import ConversionError, SeifError

# Commands that live in their own modules, imported only when run (or listed by --help): `seif
# convert` then starts without the conformance catalogue, the reference MoE math and the runtime
# (~50 ms of a ~0.35 s fixed cost that weighs on every conversion).
_LAZY_COMMANDS = {
    "verify": ("seif.verify", "verify_command"),
    "conformance": ("seif.conformance.cli", "conformance"),
    "run": ("seif.runtime.session", "run_command"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY_COMMANDS and name not in self.commands:
            import importlib

            module, attr = _LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


def _friendly_errors(fn):
    """Turn SeifError into `error: <file> [<field>]: <message>` and its exit code; show the
    traceback only under --debug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SeifError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
    return wrapper


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="seif")
def main(debug: bool) -> None:
    """SEIF: move Mixture-of-Experts checkpoints between frameworks without losing routing.

    A SEIF checkpoint is a directory (NAME.seif/) with a seif.json manifest and safetensors
    shards; every expert can be read by itself. Exit codes: 0 ok, 1 other error, 2 malformed,
    3 unsupported version, 4 unknown required feature, 5 checksum mismatch, 6 unsafe input,
    7 conversion refused, 8 bad routing input.
    """


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (see README).")
@_friendly_errors
def inspect(path: Path, as_json: bool) -> None:
    """Show layers, routing, experts, dtypes and shard layout of PATH (reads the manifest only)."""
    from .inspect import print_summary, summarize
    from .reader import Checkpoint

    with Checkpoint(path) as ckpt:
        summary = summarize(ckpt)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    print_summary(summary)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--deep", is_flag=True, help="Also verify every shard and tensor checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly_errors
def validate(path: Path, deep: bool, as_json: bool) -> None:
    """Check that PATH is a well-formed SEIF checkpoint; exit non-zero naming the problem."""
    from .inspect import human_bytes as _human
    from .progress import byte_progress
    from .validate import validate as run

    total = 0
    if deep:
        from .reader import read_manifest
        total = sum(s.size for s in read_manifest(path).shards)
    with byte_progress(total, "verifying") as advance:
        report = run(path, deep=deep, progress=advance)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"ok: {report.path}: SEIF {report.seif_version}, {report.layers} MoE layers, "
                   f"{report.tensors} tensors in {report.shards} shards ({_human(report.bytes)})"
                   + (f", {report.checksums_verified} checksums verified" if deep else ""))


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "target", help="Destination format (default: from DST's suffix; "
              "a directory or .seif means seif).")
@click.option("--from", "source", help="Source format (default: detected from SRC).")
@click.option("--dtype", help="Cast float weights to this dtype (bf16, f16, f32); quantized "
              "weights are dequantized to it. Routers keep their dtype.")
@click.option("--experts", help="Keep only these experts in every MoE layer, e.g. 0-7 or "
              "0,2,5; router rows are cut to match and experts renumbered.")
@click.option("--max-shard-size", "max_shard_bytes", type=int,
              help="Cap on bytes per shard file (default: the source's, or 4 GiB).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new "
              "checkpoint is complete).")
@click.option("--resume", is_flag=True, help="Continue a conversion that was interrupted: "
              "shards it finished in DST.partial/ are verified by checksum and reused.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Worker threads that copy and "
              "hash tensors (default: 4 per core, at most 8, as they mostly wait for the disk; "
              "1 = no threads). seif and transformers sources.")
@click.option("--layer", type=int, help="ONNX export: the MoE layer (source layer index).")
@click.option("--all-layers", is_flag=True, help="ONNX export: every MoE layer in one model "
              "(outputs output_<index>; layers must share one configuration).")
@click.option("--target", "onnx_target", type=click.Choice(["portable", "seif-kernels", "ort"]),
              help="ONNX export: ai.seif node with a standard-op function body (portable), the "
              "same node for the native kernels (seif-kernels), or ORT's com.microsoft.MoE (ort).")
@_friendly_errors
def convert(src: Path, dst: Path, target: str | None, source: str | None, dtype: str | None,
            experts: str | None, max_shard_bytes: int | None, overwrite: bool,
            resume: bool, jobs: int | None, layer: int | None, all_layers: bool,
            onnx_target: str | None) -> None:
    """Convert SRC to DST. Writes are atomic: DST appears only when complete.

    Formats: seif (a NAME.seif directory), transformers (a directory with config.json),
    flax (.msgpack), onnx (.onnx). seif -> seif re-lays out, casts (--dtype) or cuts experts
    (--experts); framework converters need their extras (seif[torch], seif[jax], seif[onnx]).
    """
    from .convert import convert as run

    options = {k: v for k, v in dict(dtype=dtype, experts=experts,
                                     max_shard_bytes=max_shard_bytes, layer=layer,
                                     target=onnx_target, jobs=jobs).items() if v is not None}
    if resume:
        options["resume"] = True
    if all_layers:
        options["all_layers"] = True
    try:
        out = run(src, dst, source_format=source, target_format=target, overwrite=overwrite,
                  **options)
    except (SeifError, KeyboardInterrupt) as exc:
        partial = dst.parent / f"{dst.name}.partial"
        # ConversionErrors are refusals (destination exists, locked, stale staging directory):
        # their own message says what to do.
        if partial.is_dir() and not resume and not isinstance(exc, ConversionError):
            click.echo(f"note: finished shards are kept in {partial}; rerun with --resume to "
                       "continue", err=True)
        raise
    click.echo(f"wrote {out}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path),
              help="Keep the demo checkpoint in this directory (default: a temporary one).")
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
@_friendly_errors
def demo(out: Path | None, seed: int) -> None:
    """Build a small MoE checkpoint from a seed (no download), then inspect, validate, read
    one expert and run the reference forward on it."""
    from .demo import run_demo

    run_demo(out, seed)


if __name__ == "__main__":
    main()
