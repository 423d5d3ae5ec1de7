"""The heartbeat workload's log: the longest stall the guest's writer saw (e.g. during a freeze or pause).

Timestamps are the guest's CLOCK_REALTIME; the guest clock may be offset from the host's by up to about a
second (see ``TestInstance.guest_clock_offset_ns``), so translate host times before passing an interval.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from freezeframe.testbed.ledger import read_guest_file

RECORD = 42
"""``%020llu %020llu\\n``: sequence number, guest realtime in ns."""
LOG_PATH = "/heartbeat.log"


@dataclass(frozen=True)
class Beat:
    seq: int
    realtime_ns: int


@dataclass(frozen=True)
class HeartbeatGap:
    """The longest interval between consecutive beats; ``start_ns`` is the beat before the gap."""

    beats: int
    max_gap_ms: float
    start_ns: int | None
    end_ns: int | None


def parse_heartbeat(data: bytes) -> list[Beat]:
    """Complete, well-formed records only; a torn or garbled trailing record is dropped."""
    beats: list[Beat] = []
    for k in range(len(data) // RECORD):
        rec = data[k * RECORD : (k + 1) * RECORD]
        seq, sep, ts = rec[:20], rec[20:21], rec[21:41]
        if sep != b" " or rec[41:] != b"\n" or not seq.isdigit() or not ts.isdigit():
            break
        beats.append(Beat(int(seq), int(ts)))
    return beats


def longest_gap(beats: Sequence[Beat], start_ns: int | None = None, end_ns: int | None = None) -> HeartbeatGap:
    """Longest gap between consecutive beats, counting gaps that overlap [start_ns, end_ns] if given."""
    best = -1
    at: tuple[int, int] | None = None
    counted = 0
    for prev, cur in itertools.pairwise(beats):
        if start_ns is not None and cur.realtime_ns < start_ns:
            continue
        if end_ns is not None and prev.realtime_ns > end_ns:
            break
        counted += 1
        gap = cur.realtime_ns - prev.realtime_ns
        if gap > best:
            best, at = gap, (prev.realtime_ns, cur.realtime_ns)
    if at is None:
        return HeartbeatGap(beats=0, max_gap_ms=0.0, start_ns=None, end_ns=None)
    return HeartbeatGap(beats=counted + 1, max_gap_ms=best / 1e6, start_ns=at[0], end_ns=at[1])


def heartbeat_from_image(
    image: Path, start_ns: int | None = None, end_ns: int | None = None, *, tmp_dir: Path | None = None
) -> HeartbeatGap:
    """Read /heartbeat.log from a disk image (qcow2 or raw, not booted) and find its longest gap."""
    return longest_gap(parse_heartbeat(read_guest_file(image, LOG_PATH, tmp_dir=tmp_dir)), start_ns, end_ns)
