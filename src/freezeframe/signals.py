"""SIGINT/SIGTERM handling: the freeze window is never cut short by a signal; elsewhere they unwind cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(KeyboardInterrupt):
    """Raised for SIGTERM so that every ``finally`` runs, as for Ctrl-C."""


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def install_termination_handler() -> None:
    """Make SIGTERM unwind like SIGINT (Python's default for SIGTERM kills without cleanup)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (the guest is released by then), then act on them.

    Only the main thread receives signals; elsewhere (service workers) this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted(f"interrupted by {signal.Signals(received[0]).name} (guest released first)")
