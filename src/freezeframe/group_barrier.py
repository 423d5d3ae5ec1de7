"""The barrier of a group snapshot whose instances live on several hosts.

Each host's agent runs its share of the group set (``GroupFlow.snapshot_share``) and meets the others on a board
(``ports.barrier.BarrierBoard``) at three points:

- ``ready``: every share prepared (locks, sets, journal entries, targets) - no guest touched yet; bounded by
  ``ready_s``.
- ``frozen``: inside the window, after this host's guests are frozen/paused. No share captures before every
  guest of every host is held, so the captures of all hosts show one instant. The wait ends at the host's own
  window deadline (the freeze cap): this host's watchdog then releases its guests whatever the others do.
- ``done``: every share copied its disks; only then does any share record its sets, so the group set is all or
  nothing. Bounded by ``done_s`` (copies of large disks take long; the coordinator aborts the board at once
  when a share's job fails, e.g. when its host's heartbeat stops).

Any share that fails aborts the board; every other share then fails at its next wait (and releases its guests
at once if it is inside the window). A share never waits longer than its bound: a host that stops answering
costs the others at most ``ready_s`` (before the window) or the freeze cap (inside it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from freezeframe.errors import GroupBarrierFailed
from freezeframe.ports.barrier import BarrierBoard

READY, FROZEN, DONE = "ready", "frozen", "done"
PHASES = (READY, FROZEN, DONE)


class Rendezvous(Protocol):
    """The points where the shares of one group set wait for each other (no-ops on one host)."""

    def ready(self) -> None: ...

    def frozen(self, deadline: float) -> None:
        """``deadline`` on the monotonic clock: the end of this host's window."""

    def done(self) -> None: ...

    def abort(self, reason: str) -> None: ...


class Alone:
    """The whole group on one host: nothing to wait for."""

    def ready(self) -> None:
        pass

    def frozen(self, deadline: float) -> None:
        pass

    def done(self) -> None:
        pass

    def abort(self, reason: str) -> None:
        pass


ALONE = Alone()


@dataclass(frozen=True)
class BarrierTimeouts:
    ready_s: float = 120.0
    done_s: float = 3600.0
    poll_s: float = 0.005
    """How often a share waiting at ``ready`` or ``frozen`` reads the board: at most one poll apart, the hosts
    freeze and capture together (a longer poll lengthens the window of the host that waits)."""
    done_poll_s: float = 0.1
    """At ``done`` nothing is held: the copies of large disks may take long, no need to read the board often."""


class HostBarrier:
    """One host's side of the barrier of ``group_set_id`` among ``hosts``."""

    def __init__(
        self,
        board: BarrierBoard,
        group_set_id: str,
        host: str,
        hosts: Sequence[str],
        timeouts: BarrierTimeouts = BarrierTimeouts(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.board, self.group_set_id, self.host = board, group_set_id, host
        self.hosts = frozenset(hosts)
        self.timeouts, self.clock, self.sleep = timeouts, clock, sleep

    def ready(self) -> None:
        self._meet(READY, self.clock() + self.timeouts.ready_s)

    def frozen(self, deadline: float) -> None:
        self._meet(FROZEN, deadline)

    def done(self) -> None:
        self._meet(DONE, self.clock() + self.timeouts.done_s, self.timeouts.done_poll_s)

    def abort(self, reason: str) -> None:
        self.board.abort(self.group_set_id, self.host, reason)

    def _meet(self, phase: str, deadline: float, poll_s: float | None = None) -> None:
        self.board.arrive(self.group_set_id, self.host, phase)
        while True:
            state = self.board.state(self.group_set_id)
            if state.aborted_by is not None:
                raise GroupBarrierFailed(
                    f"group set {self.group_set_id}: host {state.aborted_by} aborted the group snapshot: {state.reason}"
                )
            missing = sorted(self.hosts - state.arrived.get(phase, frozenset()))
            if not missing:
                return
            if self.clock() >= deadline:
                reason = f"host(s) {', '.join(missing)} did not reach {phase!r} in time (host {self.host} waited)"
                self.abort(reason)
                raise GroupBarrierFailed(f"group set {self.group_set_id}: {reason}")
            self.sleep(min(poll_s or self.timeouts.poll_s, max(0.0, deadline - self.clock())))
