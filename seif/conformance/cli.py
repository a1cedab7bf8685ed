"""`seif conformance`: list, generate and run the vendor conformance suite.

The group is self-contained (``main.add_command(conformance)`` in seif/cli.py wires it in);
it can also be invoked directly, e.g. with click's CliRunner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import SeifError


def _fail(exc: SeifError) -> None:
    click.echo(f"error: {exc.one_line()}", err=True)
    sys.exit(exc.exit_code)


@click.group("conformance", context_settings={"help_option_names": ["-h", "--help"]})
def conformance() -> None:
    """The vendor conformance suite: routing, MoE layer and format cases with tolerances.

    A backend (a runtime, kernel library or compiler) proves that it routes exactly like the
    spec and reads SEIF checkpoints correctly. See spec/conformance/README.md.
    """


@conformance.command("list")
@click.option("-k", "filter_", metavar="EXPR", help="Select cases: substrings of the id or "
              "tags, with and/or/not (pytest style).")
@click.option("--ids", is_flag=True, help="Print only case ids, one per line.")
@click.option("--json", "as_json", is_flag=True, help="Print the case summaries as JSON.")
@click.option("--seed", type=int, default=None, help="Catalogue seed (default: the release's).")
def list_cases(filter_: str | None, ids: bool, as_json: bool, seed: int | None) -> None:
    """List the cases of the catalogue (id, spec section, dtype, description)."""
    from .catalogue import DEFAULT_SEED, catalogue, counts

    try:
        cases = catalogue(DEFAULT_SEED if seed is None else seed, k=filter_)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="-k") from None
    if ids:
        click.echo("\n".join(c.id for c in cases))
        return
    if as_json:
        click.echo(json.dumps([c.summary() for c in cases], indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{len(cases)} conformance cases")
    for col in ("id", "spec", "dtype", "description"):
        table.add_column(col, overflow="fold")
    for c in cases:
        table.add_row(c.id, c.spec_ref, c.dtype, c.description)
    console = Console()
    console.print(table)
    console.print(", ".join(f"{fam}: {n}" for fam, n in counts(cases).items()), highlight=False)


@conformance.command("generate")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Directory to write cases/, format/ and catalogue.json into.")
@click.option("-k", "filter_", metavar="EXPR", help="Only the selected cases.")
@click.option("--seed", type=int, default=None, help="Catalogue seed (default: the release's).")
@click.option("--check", "check", type=click.Path(exists=True, path_type=Path),
              help="Compare the per-case digests with this hash list; exit 1 on a difference.")
@click.option("--write-hashes", type=click.Path(path_type=Path),
              help="Also write the per-case digests (`<sha256>  <id>` lines) to this file.")
def generate_cmd(out: Path, filter_: str | None, seed: int | None, check: Path | None,
                 write_hashes: Path | None) -> None:
    """Write the catalogue (npz + json per case, format checkpoints) with SHA-256 digests.

    The data is deterministic: the same seed and release give the same bytes, so a copy can
    be compared by hash with `--check spec/conformance/catalogue-1.0.sha256`.
    """
    from .catalogue import DEFAULT_SEED, generate, hash_list

    if out.exists() and any(out.iterdir()):
        _fail(SeifError(f"{out} exists and is not empty; choose a fresh directory"))
    index = generate(out, DEFAULT_SEED if seed is None else seed, k=filter_)
    text = hash_list(index)
    if write_hashes:
        Path(write_hashes).write_text(text)
    click.echo(f"wrote {len(index['cases'])} cases to {out} (catalogue digest "
               f"{index['digest'][:16]}...)")
    if check:
        want = {line.split()[1]: line.split()[0]
                for line in Path(check).read_text().splitlines() if line.strip()}
        got = {e["id"]: e["digest"] for e in index["cases"]}
        differ = sorted(i for i in got if i in want and want[i] != got[i])
        missing = sorted(set(want) - set(got)) if not filter_ else []
        extra = sorted(set(got) - set(want))
        for i in differ[:20]:
            click.echo(f"differs: {i}")
        if differ or missing or extra:
            click.echo(f"hash check: {len(differ)} differ, {len(missing)} missing, "
                       f"{len(extra)} not in {check}", err=True)
            sys.exit(1)
        click.echo(f"hash check: all {len(got)} cases match {check}")


@conformance.command("run")
@click.option("--backend", "backend_name", required=True, metavar="NAME",
              help="A registered backend (entry point group seif.conformance_backends) or "
              "module:Class.")
@click.option("-k", "filter_", metavar="EXPR", help="Only the selected cases.")
@click.option("--must-pass", "must_pass", type=click.Path(exists=True, path_type=Path),
              help="Case ids that must pass (e.g. spec/conformance/must-pass-1.0.txt); the exit "
              "status is 1 only if one of them fails.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write a JSON report.")
@click.option("--junit", "junit_out", type=click.Path(path_type=Path),
              help="Write a JUnit XML report.")
@click.option("--cases", "cases_dir", type=click.Path(exists=True, path_type=Path),
              help="Run the cases written by `generate` (default: generate in memory).")
@click.option("--seed", type=int, default=None, help="Catalogue seed (default: the release's).")
def run_cmd(backend_name: str, filter_: str | None, must_pass: Path | None,
            json_out: Path | None, junit_out: Path | None, cases_dir: Path | None,
            seed: int | None) -> None:
    """Run the suite against a backend; print a summary, write JSON / JUnit XML.

    Exit status: 0 when every case passes (or every must-pass case, with --must-pass),
    1 otherwise.
    """
    from .backends import resolve_backend
    from .cases import load_cases, matches
    from .catalogue import DEFAULT_SEED, catalogue
    from .runner import load_must_pass, print_summary, run, write_json, write_junit

    try:
        backend = resolve_backend(backend_name)
    except SeifError as exc:
        _fail(exc)
    try:
        if cases_dir:
            all_cases = load_cases(cases_dir)
            cases = [c for c in all_cases if matches(filter_, c.id, c.tags)]
        else:
            all_cases = catalogue(DEFAULT_SEED if seed is None else seed)
            cases = [c for c in all_cases if matches(filter_, c.id, c.tags)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="-k") from None
    must = load_must_pass(must_pass) if must_pass else None
    if must is not None and filter_:
        selected = {c.id for c in cases}
        must = [i for i in must if i in selected or i not in {c.id for c in all_cases}]
    report = run(backend, cases, must, all_ids=[c.id for c in all_cases])
    print_summary(report)
    if json_out:
        write_json(report, json_out)
    if junit_out:
        write_junit(report, junit_out)
    sys.exit(report.exit_code(must is not None))
