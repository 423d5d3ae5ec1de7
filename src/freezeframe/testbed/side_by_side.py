"""Test-bed context managers entered side by side (threads): booting guests, starting servers and tearing them
down spend most of their time waiting - on a guest agent, a daemon's start-up, libvirt's destroy - so several of
them overlap well even on two cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def entered_together(managers: Sequence[AbstractContextManager[T]]) -> Iterator[list[T]]:
    """Enter every context manager at once, each in its own thread, and exit them all at once. If any fails to
    enter, the others that did are exited before its error is raised."""
    if not managers:
        yield []
        return
    with concurrent.futures.ThreadPoolExecutor(len(managers)) as pool:
        entering = [pool.submit(m.__enter__) for m in managers]
        concurrent.futures.wait(entering)
        entered = [m for m, f in zip(managers, entering, strict=True) if f.exception() is None]
        try:
            yield [f.result() for f in entering]
        finally:
            for exiting in [pool.submit(m.__exit__, None, None, None) for m in entered]:
                exiting.result()


@contextlib.contextmanager
def entered_in_background(manager: AbstractContextManager[T]) -> Iterator[concurrent.futures.Future[T]]:
    """Enter ``manager`` in a thread (the future of what it gives) while the caller goes on; on leaving, exit it
    once it has entered (one that failed to enter has cleaned up after itself)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        entering = pool.submit(manager.__enter__)
        try:
            yield entering
        finally:
            if entering.exception() is None:
                manager.__exit__(None, None, None)
