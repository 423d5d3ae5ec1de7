"""The guest-visible window of a snapshot: freeze and/or pause, then release exactly once.

Released by the flow when the capture has started, or by the watchdog at the cap, whichever comes first; a thaw
the guest agent does not confirm is left to ``repair`` (the journal entry says so).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from freezeframe.errors import AgentUnavailable, FreezeframeError
from freezeframe.model import Instance
from freezeframe.ports import Hypervisor, Journal, JournalEntry

log = logging.getLogger(__name__)
THAW_PENDING = "thaw-pending"
EnsureThawed = Callable[[Instance], bool]
"""Thaw until the agent confirms it, for a bounded time; False leaves the job to repair."""


class GuestWindow:
    """Freeze and/or pause, then release exactly once: from the flow, or from the watchdog at the cap.

    The journal entry is written once before the window opens, recording everything the window may do; no
    write happens inside it, so the window holds only guest-visible calls.
    """

    def __init__(
        self,
        hypervisor: Hypervisor,
        journal: Journal,
        ensure_thawed: EnsureThawed,
        instance: Instance,
        entry: JournalEntry,
    ) -> None:
        self.hypervisor = hypervisor
        self.journal = journal
        self.ensure_thawed = ensure_thawed
        self.instance = instance
        self.entry = entry
        self.froze = False
        self.paused = False
        self.expired = False
        self.released = False
        self.thaw_confirmed = True
        self._lock = threading.Lock()
        self.freeze_started: float | None = None
        self.freeze_ended: float | None = None
        self.pause_started: float | None = None
        self.pause_ended: float | None = None

    def freeze(self) -> None:
        self.freeze_started = time.monotonic()
        self.froze = True
        self.thaw_confirmed = False
        try:
            self.hypervisor.freeze(self.instance)
        except AgentUnavailable:
            # A freeze that timed out may still land inside the guest later: make sure it is thawed.
            with self._lock:
                self._thaw()
                self.froze = False
                self.freeze_started = self.freeze_ended = None
            raise
        with self._lock:
            if self.released:  # the watchdog released the guest while the freeze was still on its way
                self._thaw()

    def pause(self) -> None:
        self.pause_started = time.monotonic()
        self.paused = True
        self.hypervisor.pause(self.instance)
        with self._lock:
            if self.released:  # released by the watchdog while the pause was on its way: undo it
                self.hypervisor.resume(self.instance)
                self.pause_ended = time.monotonic()

    def _thaw(self) -> None:
        self.thaw_confirmed = self.ensure_thawed(self.instance)
        self.freeze_ended = time.monotonic()
        if not self.thaw_confirmed:
            self.entry.phase = THAW_PENDING
            self.journal.record(self.entry)

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
            errors: list[BaseException] = []
            if self.paused:
                try:
                    self.hypervisor.resume(self.instance)
                except FreezeframeError as exc:
                    errors.append(exc)
                self.pause_ended = time.monotonic()
            if self.froze:
                self._thaw()
            if errors:
                raise errors[0]

    def expire(self) -> None:
        """Watchdog: the cap passed while the flow was still inside the window."""
        if not self.released:
            self.expired = True
            log.warning("freeze window of %s reached its cap: releasing the guest", self.instance.name)
            try:
                self.release()
            except FreezeframeError:
                log.exception("watchdog could not release %s", self.instance.name)

    def ms(self, start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round((end - start) * 1000.0, 3)
