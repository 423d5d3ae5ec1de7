"""The two-instance ledger: an invariant that only a point in time common to two guests satisfies.

Guest A (``link-send``) appends record i to its disk and fsyncs, sends i to guest B over a virtio-serial link
joined on the host (A's QEMU listens on a UNIX socket, B's connects to it), and waits for B's acknowledgement
before i+1; B (``link-recv``) appends i, fsyncs and acknowledges. So at every instant
``B.last <= A.last <= B.last + 1``. Images of A and B captured at one instant satisfy it; A captured, then B a
little later (two separate snapshots), break it as soon as B has stored a record A's image does not have.
The checker reads both journals straight from the captured images (no boot).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.testbed.domain import GuestLink
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestbedError, TestInstance, running_instance
from freezeframe.testbed.ledger import RECORD, _parse_record, read_guest_files
from freezeframe.testbed.side_by_side import entered_in_background

JOURNAL = "/ledger/journal"
"""On each guest's first disk (vda), which its init mounts at /mnt/vda."""
MIB = 1 << 20


@dataclass(frozen=True)
class LinkVerdict:
    ok: bool
    sender_last: int | None
    receiver_last: int | None
    reason: str


@dataclass(frozen=True)
class LinkedPair:
    sender: TestInstance
    receiver: TestInstance


def _last_record(journal: bytes, who: str) -> tuple[int | None, str | None]:
    """The last record of a journal of consecutive records 1, 2, ...; a torn trailing record is ignored."""
    last = 0
    for k in range(len(journal) // RECORD):
        value = _parse_record(journal[k * RECORD : (k + 1) * RECORD])
        if value is None:
            if k == len(journal) // RECORD - 1:
                break
            return None, f"{who} journal record #{k} is corrupt"
        if value != last + 1:
            return None, f"{who} journal record #{k} is {value}, expected {last + 1}"
        last = value
    return last, None


def judge_link(sender: bytes | None, receiver: bytes | None) -> LinkVerdict:
    """The verdict from both journals' contents (``None``: the file is missing); pure, so it is unit tested."""
    if sender is None or receiver is None:
        return LinkVerdict(
            False, None, None, f"{JOURNAL} is missing from the {'sender' if sender is None else 'receiver'}"
        )
    a, why_a = _last_record(sender, "sender")
    b, why_b = _last_record(receiver, "receiver")
    if a is None or b is None:
        return LinkVerdict(False, a, b, why_a or why_b or "unreadable")
    if b > a:
        return LinkVerdict(False, a, b, f"receiver holds {b} but the sender only {a}: B was captured later than A")
    if a > b + 1:
        return LinkVerdict(False, a, b, f"sender holds {a} but the receiver only {b}: A was captured later than B")
    return LinkVerdict(True, a, b, f"consistent: sender {a}, receiver {b}")


def check_link(sender_image: Path, receiver_image: Path, *, tmp_dir: Path | None = None) -> LinkVerdict:
    """Judge the captured first disks (vda) of the sender and the receiver."""
    a = read_guest_files(sender_image, [JOURNAL], tmp_dir=tmp_dir)[JOURNAL]
    b = read_guest_files(receiver_image, [JOURNAL], tmp_dir=tmp_dir)[JOURNAL]
    return judge_link(a, b)


@contextlib.contextmanager
def linked_pair(
    conn: Any,
    *,
    workdir: Path,
    guest: GuestImage | None = None,
    name_prefix: str = "ffgrp",
    disk_mib: int = 32,
    progress_timeout_s: float = 90.0,
    receiver_conn: Any = None,
    boot_timeout_s: float = 120.0,
) -> Iterator[LinkedPair]:
    """Boot A (listening end) and B (connecting end) side by side, wait until records flow, always remove both.

    B starts as soon as A's QEMU listens on the link's socket (B's QEMU connects to it as it starts), while A's
    guest is still booting. ``receiver_conn``: B on another libvirt (another host): the link is a UNIX socket in
    ``workdir``, which two QEMUs in different network namespaces reach alike as long as they share the file system."""
    workdir.mkdir(parents=True, exist_ok=True)
    socket = workdir / "link.sock"
    socket.unlink(missing_ok=True)
    disks = [DiskRequest(size_bytes=disk_mib * MIB)]
    common: dict[str, Any] = {"disks": disks, "workdir": workdir, "guest": guest, "boot_timeout_s": boot_timeout_s}
    sending = running_instance(conn, workload="link-send", name_prefix=f"{name_prefix}-a",
                               link=GuestLink(socket, "bind"), **common)  # fmt: skip
    with contextlib.ExitStack() as stack:
        booting = stack.enter_context(entered_in_background(sending))
        deadline = time.monotonic() + boot_timeout_s
        while not socket.exists() and not booting.done():
            if time.monotonic() > deadline:
                raise TestbedError(f"the sender's QEMU never listened on {socket}")
            time.sleep(0.05)
        if booting.done():
            booting.result()  # it failed before it listened: its error
        receiver = stack.enter_context(
            running_instance(receiver_conn or conn, workload="link-recv", name_prefix=f"{name_prefix}-b",
                             link=GuestLink(socket, "connect"), **common)
        )  # fmt: skip
        sender = booting.result()
        first = sender.wait_for_progress(timeout_s=progress_timeout_s)
        sender.wait_for_progress(after=first, timeout_s=progress_timeout_s)
        yield LinkedPair(sender, receiver)


def wait_for_records(pair: LinkedPair, count: int, timeout_s: float = 30.0) -> None:
    """Let the pair store ``count`` more records (as reported on the sender's console, about once a second)."""
    start = pair.sender.progress() or 0
    deadline = time.monotonic() + timeout_s
    while (pair.sender.progress() or 0) < start + count:
        if time.monotonic() > deadline:
            raise TestbedError(f"the linked ledger stored fewer than {count} records in {timeout_s:.0f} s")
        time.sleep(0.2)
