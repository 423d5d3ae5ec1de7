"""What the CLI tests share: run the real `freezeframe` command in-process, a scripted service, sample sets.

``run_cli`` goes through ``freezeframe.cli_errors.run`` exactly as the console script does, so exit codes and
stderr are the user's. ``FakeService`` stands in for ``freezeframe.service.Freezeframe`` (through
``cli_common.service_factory``) and records what the commands asked of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer

from freezeframe import cli_common
from freezeframe.cli import app
from freezeframe.cli_errors import run
from freezeframe.config import Settings
from freezeframe.errors import SetNotFound
from freezeframe.model import Consistency, Hardware, Instance, InstanceState, Member, SetStatus, SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.set_query import Cursor, SetFilter, SetPage

SRC = Path(__file__).resolve().parent.parent / "src"

HOSTILE = (
    "[/x]",
    "[link=http://evil.example]click[/link]",
    "[bold red]red[/bold red]",
    "\x1b]8;;http://evil.example\x07link\x1b]8;;\x07",
    "\x1b[2J\x1b[38;5;196mcleared",
    "bell\x07\x08back",
    "c1\x9b31m\x9dtitle",
    "bidi\u202eexe.txt",
    ":smile: emoji",
)
"""User text that must print as data: markup, hyperlinks, escape sequences, C0/C1 controls, bidi overrides."""
RAW_SEQUENCES = ("\x1b]8", "\x1b[2J", "\x1b[38;5;196m", "\x07", "\x08", "\x9b", "\x9d", "\u202e")
"""None of these may reach the terminal from user text (Rich's own styling codes are fine)."""


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    capsys.readouterr()
    code = run(typer.main.get_command(app), list(args))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def terminal(monkeypatch: pytest.MonkeyPatch, columns: int = 80) -> None:
    """Make the CLI believe stdout and stderr are a terminal of ``columns`` cells (as Rich reads it)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def subprocess_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a fresh interpreter (what a user's shell runs)."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from freezeframe.cli import main; main()", *args],
        env=full_env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def hardware() -> Hardware:
    return Hardware(vcpus=1, memory_kib=262144, arch="x86_64", machine="pc")


def sample_set(
    n: int = 0,
    name: str = "nightly",
    instance: str = "vm1",
    metadata: dict[str, str] | None = None,
    error: str | None = None,
) -> SnapshotSet:
    set_id = f"{n:08x}-1111-4222-8333-444455556666"
    member = Member(set_id, "vda", "virtio", 1, 64 << 20, "qcow2", f"/repo/{set_id}/vda.qcow2", sha256="ab" * 32)
    return SnapshotSet(
        id=set_id,
        name=name,
        instance_name=instance,
        instance_uuid="5e7a1b2c-0000-4000-8000-00000000000a",
        requested=Consistency.FILESYSTEM,
        achieved=Consistency.FILESYSTEM,
        status=SetStatus.AVAILABLE,
        created_at=datetime(2026, 12, 1, 19, 40, 11, tzinfo=UTC),
        completed_at=datetime(2026, 12, 1, 19, 40, 13, tzinfo=UTC),
        freeze_window_ms=12.4,
        hardware=hardware(),
        members=[member],
        metadata=metadata or {},
        error=error,
    )


def sample_instance(name: str = "vm1") -> Instance:
    return Instance(name, "5e7a1b2c-0000-4000-8000-00000000000a", InstanceState.RUNNING, hardware())


@dataclass
class Calls:
    settings: list[Settings] = field(default_factory=list)
    progress: dict[str, ProgressCallback | None] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


class FakeLifecycle:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def restore(
        self, set_ref: str, name: str, *, start: bool = False, full: bool = False, progress: ProgressCallback | None
    ) -> Any:
        self.calls.progress["restore"] = progress
        self.calls.args["restore"] = (set_ref, name, start, full)
        raise SetNotFound(f"no set matches {set_ref!r}")

    def backup(self, instance: str, backup_type: str, rotation: int, **kwargs: Any) -> Any:
        self.calls.args["backup"] = (instance, backup_type, rotation, kwargs)
        raise SetNotFound("scripted: stop here")


class FakePortable:
    def __init__(self, calls: Calls, images: Sequence[Any]) -> None:
        self.calls = calls
        self._images = list(images)

    def images(self) -> list[Any]:
        return self._images

    def image(self, ref: str) -> Any:
        return self._images[0]

    def export(self, set_ref: str, output: Path, *, progress: ProgressCallback | None, **kwargs: Any) -> Any:
        self.calls.progress["export"] = progress
        raise SetNotFound("scripted: stop here")

    def export_to_store(self, set_ref: str, *, progress: ProgressCallback | None, **kwargs: Any) -> Any:
        self.calls.progress["export"] = progress
        self.calls.args["export_to_store"] = kwargs
        raise SetNotFound("scripted: stop here")

    def import_package(self, source: str, name: str, *, progress: ProgressCallback | None, **kwargs: Any) -> Any:
        self.calls.progress["import"] = progress
        self.calls.args["import"] = (source, name)
        raise SetNotFound("scripted: stop here")


class FakeService:
    """The parts of ``Freezeframe`` the CLI calls, scripted; every call is recorded in ``calls``."""

    def __init__(
        self, sets: Sequence[SnapshotSet] = (), instances: Sequence[Instance] = (), images: Sequence[Any] = ()
    ) -> None:
        self.sets = list(sets)
        self.found = list(instances)
        self.calls = Calls()
        self.lifecycle = FakeLifecycle(self.calls)
        self.portable = FakePortable(self.calls, images)

    def page_sets(self, wanted: SetFilter, limit: int, cursor: Cursor | None = None) -> SetPage:
        """``self.sets`` in pages of ``limit``: the cursor is the position's set, as a real catalog's key."""
        self.calls.args["page_sets"] = (wanted, limit, cursor)
        start = 0 if cursor is None else next(i for i, s in enumerate(self.sets) if s.id == cursor.set_id) + 1
        chunk = self.sets[start : start + limit]
        more = start + limit < len(self.sets)
        return SetPage(chunk, Cursor.after(chunk[-1]).encode() if more else None)

    def iter_sets(self, wanted: SetFilter, cursor: Cursor | None = None) -> Iterator[SnapshotSet]:
        self.calls.args["iter_sets"] = (wanted, cursor)
        yield from self.sets

    def count_sets(self, wanted: SetFilter, bound: int | None = None, cursor: Cursor | None = None) -> int:
        start = 0 if cursor is None else next(i for i, s in enumerate(self.sets) if s.id == cursor.set_id) + 1
        left = len(self.sets) - start
        return left if bound is None else min(left, bound)

    def show(self, ref: str) -> SnapshotSet:
        for s in self.sets:
            if s.id.startswith(ref) or s.name == ref:
                return s
        raise SetNotFound(f"no set matches {ref!r}")

    def instances(self) -> list[Instance]:
        return self.found

    def snapshot(self, request: Any, progress: ProgressCallback | None, wait: bool = True) -> SnapshotSet:
        self.calls.progress["snapshot"] = progress
        self.calls.args["snapshot"] = request
        if progress is not None:
            progress(1 << 20, 2 << 20)
        return self.sets[0]


def install_fake(monkeypatch: pytest.MonkeyPatch) -> FakeService:
    """Commands reach a ``FakeService`` instead of the real one for the rest of the test."""
    service = FakeService()

    @contextmanager
    def factory(settings: Settings) -> Iterator[FakeService]:
        service.calls.settings.append(settings)
        yield service

    monkeypatch.setattr(cli_common, "service_factory", factory)
    return service
