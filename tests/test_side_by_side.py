"""Context managers entered side by side (the multi-host test beds boot guests and start servers this way): they
overlap, each one entered is exited, and a failure to enter leaves nothing behind."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from freezeframe.testbed.side_by_side import entered_in_background, entered_together


class Recorder:
    def __init__(self, parties: int = 1) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.all_in = threading.Barrier(parties, timeout=5)

    def note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    @contextlib.contextmanager
    def managed(self, name: str, fail: bool = False) -> Iterator[str]:
        self.all_in.wait()  # every manager is entering at the same time, or this times out
        if fail:
            raise RuntimeError(f"{name} failed to enter")
        self.note(f"enter {name}")
        try:
            yield name
        finally:
            self.note(f"exit {name}")


def test_all_enter_at_once_and_all_exit() -> None:
    rec = Recorder(parties=3)
    managers = [rec.managed("a"), rec.managed("b"), rec.managed("c")]  # held: no exit by garbage collection
    with entered_together(managers) as values:
        assert values == ["a", "b", "c"]
        assert sorted(rec.events) == ["enter a", "enter b", "enter c"]
    assert sorted(e for e in rec.events if e.startswith("exit")) == ["exit a", "exit b", "exit c"]


def test_one_failing_to_enter_exits_the_others_and_raises_its_error() -> None:
    rec = Recorder(parties=3)
    managers = [rec.managed("a"), rec.managed("b", fail=True), rec.managed("c")]
    with pytest.raises(RuntimeError, match="b failed to enter"), entered_together(managers):
        pytest.fail("the body must not run")
    assert sorted(rec.events) == ["enter a", "enter c", "exit a", "exit c"]


def test_background_entry_is_exited_after_the_body_and_a_failed_one_is_not() -> None:
    rec = Recorder()
    server = rec.managed("server")
    with entered_in_background(server) as starting:
        assert starting.result(timeout=5) == "server"
        rec.note("body")
    assert rec.events == ["enter server", "body", "exit server"]

    broken = FailsToEnter()
    with entered_in_background(broken) as starting:
        assert isinstance(starting.exception(timeout=5), RuntimeError)
    assert not broken.exited


class FailsToEnter:
    exited = False

    def __enter__(self) -> None:
        raise RuntimeError("failed to enter")

    def __exit__(self, *exc: object) -> None:
        self.exited = True
