"""What every `freezeframe` command module shares: consoles, common options, JSON output, progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from freezeframe.errors import InvalidRequest
from freezeframe.ports import ProgressCallback
from freezeframe.service import Freezeframe, settings_for

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
"""soft_wrap: an error stays one line even when stderr is not a terminal (rich would wrap at 80 columns)."""

ConnectOpt = Annotated[
    str | None,
    typer.Option("--connect", "-c", help="libvirt URI (env FREEZEFRAME_LIBVIRT_URI)", show_default=False),
]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="data directory (env FREEZEFRAME_HOME)", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SetArg = Annotated[str, typer.Argument(metavar="SET", help="set id, id prefix or name")]


@contextmanager
def open_service(home: Path | None, connect: str | None, freeze_cap_s: float | None = None) -> Iterator[Freezeframe]:
    with Freezeframe.open(settings_for(home, connect, freeze_cap_s)) as service:
        yield service


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    return meta


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[ProgressCallback | None]:
    """A progress bar on stderr, only when stderr is a terminal (never in pipes, logs or --json runs)."""
    if not enabled or not err.is_terminal:
        yield None
        return
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update
