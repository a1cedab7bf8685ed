"""Progress reporting for long byte-moving steps (rich, to stderr, only on a terminal)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def byte_progress(total: int, description: str, enabled: bool | None = None
                  ) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(nbytes)` callable that drives a bar with bytes/s, or a no-op.

    `enabled=None` shows the bar only when stderr is a terminal, so logs and tests stay clean.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
