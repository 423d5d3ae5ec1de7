"""Read files out of guest disk images without booting, and judge the ledger workload's two disks.

The ledger writer appends record i to the journal disk, then writes i to the state disk, fsyncing each, so any
set of images captured at one instant satisfies ``state <= last_journal <= state + 1``. Images captured at
different instants (a naive per-disk snapshot) break it, which is what the tests need to see.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RECORD = 20
"""Ledger records are ``%019llu\\n``."""
JOURNAL_PATH = "/ledger/journal"
STATE_PATH = "/ledger/state"
EVENTS_PATH = "/ledger/app-events"
QCOW2_MAGIC = b"QFI\xfb"
_SAFE_GUEST_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")


class ImageReadError(RuntimeError):
    """The image could not be converted, repaired or read."""


@dataclass
class LedgerVerdict:
    ok: bool
    state: int | None
    last_journal: int | None
    reason: str
    app_events: list[str] = field(default_factory=list)
    journal_records: int = 0


def image_format(image: Path) -> str:
    """Probe qcow2 vs raw by magic, so a guest cannot make a raw disk look like qcow2 to qemu-img."""
    with image.open("rb") as fh:
        return "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"


def _run(argv: list[str], *, ok_codes: Iterable[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(argv, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{argv[0]} is not installed (qemu-utils / e2fsprogs)") from exc
    if proc.returncode not in tuple(ok_codes):
        err = proc.stderr.decode(errors="replace").strip()[-600:]
        raise ImageReadError(f"{' '.join(argv)} exited {proc.returncode}: {err}")
    return proc


@contextlib.contextmanager
def raw_copy(image: Path, *, tmp_dir: Path | None = None, replay_journal: bool = True) -> Iterator[Path]:
    """A throw-away raw copy of ``image`` with its ext4 journal replayed.

    Without the replay, data fsynced by the guest may still sit only in the ext4 journal and debugfs would
    read stale blocks. ``-U`` lets this read an image a running domain holds open.
    """
    if not image.is_file():
        raise FileNotFoundError(f"disk image {image} does not exist")
    work = Path(tempfile.mkdtemp(prefix="ff-image-", dir=tmp_dir))
    try:
        raw = work / "disk.raw"
        _run(["qemu-img", "convert", "-U", "-f", image_format(image), "-O", "raw", str(image), str(raw)])
        if replay_journal:
            replay_ext4_journal(raw)
        yield raw
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replay_ext4_journal(raw: Path) -> None:
    """Replay the ext4 journal of a throw-away raw image in place (it changes the image: never a guest's disk)."""
    # 0: clean, 1: errors fixed, 2: fixed (reboot advised). Anything else: not a usable ext4.
    _run(["e2fsck", "-fy", str(raw)], ok_codes=(0, 1, 2))


def read_raw_files(raw: Path, paths: Iterable[str]) -> dict[str, bytes | None]:
    """Files from an ext4 raw image in one debugfs run; ``None`` for a file that does not exist."""
    wanted = list(dict.fromkeys(paths))
    for p in wanted:
        if not _SAFE_GUEST_PATH.match(p):
            raise ValueError(f"guest path {p!r} must be absolute and free of spaces and quotes")
    work = Path(tempfile.mkdtemp(prefix="ff-debugfs-", dir=raw.parent))
    try:
        outs = {p: work / f"f{i}" for i, p in enumerate(wanted)}
        script = work / "commands"
        script.write_text("".join(f"dump {p} {out}\n" for p, out in outs.items()))
        _run(["debugfs", "-f", str(script), str(raw)])
        return {p: out.read_bytes() if out.is_file() else None for p, out in outs.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_guest_files(image: Path, paths: Iterable[str], *, tmp_dir: Path | None = None) -> dict[str, bytes | None]:
    """Several files from one disk image (qcow2 or raw) at the cost of one conversion."""
    with raw_copy(image, tmp_dir=tmp_dir) as raw:
        return read_raw_files(raw, paths)


def read_guest_file(image: Path, path: str, *, tmp_dir: Path | None = None) -> bytes:
    """One file from the ext4 filesystem on a disk image; FileNotFoundError if it is not there."""
    data = read_guest_files(image, [path], tmp_dir=tmp_dir)[path]
    if data is None:
        raise FileNotFoundError(f"{path} not found in the filesystem of {image}")
    return data


def _parse_record(raw: bytes) -> int | None:
    if len(raw) != RECORD or raw[-1:] != b"\n" or not raw[:-1].isdigit():
        return None
    return int(raw[:-1])


def judge_ledger(journal: bytes | None, state: bytes | None, app_events: bytes | None = None) -> LedgerVerdict:
    """The verdict from the raw file contents (``None`` = file missing); pure so it can be unit tested."""
    events = [line for line in (app_events or b"").decode(errors="replace").splitlines() if line.strip()]

    def bad(reason: str, st: int | None = None, last: int | None = None, n: int = 0) -> LedgerVerdict:
        return LedgerVerdict(False, st, last, reason, events, n)

    if journal is None:
        return bad(f"{JOURNAL_PATH} is missing from the journal disk")
    if state is None:
        return bad(f"{STATE_PATH} is missing from the state disk")

    complete = len(journal) // RECORD
    notes: list[str] = []
    if len(journal) % RECORD:
        notes.append(f"ignored a torn trailing record of {len(journal) % RECORD} bytes")
    records: list[int] = []
    for k in range(complete):
        value = _parse_record(journal[k * RECORD : (k + 1) * RECORD])
        if value is None:
            if k == complete - 1:
                notes.append("ignored an unreadable trailing record")
                break
            return bad(f"journal record #{k} is corrupt", n=k)
        if records and value != records[-1] + 1:
            return bad(f"journal record #{k} is {value}, expected {records[-1] + 1}", last=value, n=k)
        records.append(value)
    last = records[-1] if records else 0

    if len(state) == 0:
        st = 0
    else:
        parsed = _parse_record(state[:RECORD])
        if parsed is None:
            return bad(f"state file is corrupt: {state[:RECORD]!r}", last=last, n=len(records))
        st = parsed

    suffix = f" ({'; '.join(notes)})" if notes else ""
    if st > last:
        reason = (
            f"state {st} is ahead of the last journal record {last}: "
            "the state disk was captured later than the journal disk"
        )
        return bad(reason + suffix, st, last, len(records))
    if last > st + 1:
        reason = (
            f"last journal record {last} is more than one ahead of state {st}: "
            "the journal disk was captured later than the state disk"
        )
        return bad(reason + suffix, st, last, len(records))
    return LedgerVerdict(True, st, last, f"consistent: state {st}, last journal {last}{suffix}", events, len(records))


def check_ledger(journal_image: Path, state_image: Path, *, tmp_dir: Path | None = None) -> LedgerVerdict:
    """Judge a journal disk image (vdb) and a state disk image (vdc) of the ledger workload."""
    return _judge_both(
        lambda: read_guest_files(journal_image, [JOURNAL_PATH, EVENTS_PATH], tmp_dir=tmp_dir),
        lambda: read_guest_files(state_image, [STATE_PATH], tmp_dir=tmp_dir),
    )


def check_raw_ledger(journal_raw: Path, state_raw: Path) -> LedgerVerdict:
    """``check_ledger`` for throw-away raw copies the caller made (e.g. exported RBD snapshots): their journals are
    replayed in place, which saves converting each image a second time."""

    def replayed(raw: Path, paths: list[str]) -> dict[str, bytes | None]:
        replay_ext4_journal(raw)
        return read_raw_files(raw, paths)

    return _judge_both(
        lambda: replayed(journal_raw, [JOURNAL_PATH, EVENTS_PATH]), lambda: replayed(state_raw, [STATE_PATH])
    )


def _judge_both(
    journal_files: Callable[[], dict[str, bytes | None]], state_files: Callable[[], dict[str, bytes | None]]
) -> LedgerVerdict:
    """The two disks are read at once (each is a few qemu-img/e2fsck/debugfs runs): every ledger check in the suite
    waits on it."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ledger") as pool:
        journal, state = pool.submit(journal_files), pool.submit(state_files)
        files, state_file = journal.result(), state.result()[STATE_PATH]
    return judge_ledger(files[JOURNAL_PATH], state_file, files[EVENTS_PATH])
