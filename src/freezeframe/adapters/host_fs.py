"""The HostFilesystems port over util-linux and e2fsprogs: blkid/partx find filesystems, e2fsck -n checks them.

Used by ``verify --boot`` on a raw copy of a powered-off clone's disk; every tool runs read-only.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from freezeframe.errors import HypervisorError
from freezeframe.ports import Filesystem

SECTOR = 512
EXT_TYPES = ("ext2", "ext3", "ext4")


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        raise HypervisorError(f"{argv[0]} is not installed; run scripts/setup-host.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{argv[0]} on {argv[-1]} did not finish within {timeout:g} s") from exc


def _blkid(raw: Path, offset: int) -> dict[str, str]:
    result = _run(["blkid", "-p", "-o", "export", "-O", str(offset), str(raw)], 60)
    if result.returncode not in (0, 2):  # 2: nothing found
        raise HypervisorError(f"blkid {raw} failed: {result.stderr.strip()}")
    values = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


class HostTools:
    """HostFilesystems with blkid, partx and e2fsck."""

    def probe(self, raw: Path) -> list[Filesystem]:
        whole = _blkid(raw, 0)
        if whole.get("TYPE"):
            return [Filesystem(whole["TYPE"], 0, "whole disk")]
        if not whole.get("PTTYPE"):
            return []
        result = _run(["partx", "-g", "-b", "-o", "NR,START,SECTORS", str(raw)], 60)
        if result.returncode != 0:
            raise HypervisorError(f"reading the partitions of {raw} failed: {result.stderr.strip()}")
        found = []
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            start = int(parts[1]) * SECTOR
            probed = _blkid(raw, start)
            if probed.get("TYPE"):
                found.append(Filesystem(probed["TYPE"], start, f"partition {parts[0]}"))
        return found

    def fsck(self, raw: Path, fs: Filesystem) -> tuple[bool | None, str]:
        """``e2fsck -n -f`` (read-only, forced) for ext2/3/4; other types are reported as not checked."""
        if fs.type == "swap":
            return None, "swap: nothing to check"
        if fs.type not in EXT_TYPES:
            return None, f"{fs.type}: no read-only host checker wired in, not checked"
        device = f"{raw}?offset={fs.offset}" if fs.offset else str(raw)
        result = _run(["e2fsck", "-n", "-f", device], 3600)
        if result.returncode == 0:
            summary = (result.stdout.strip().splitlines() or ["clean"])[-1]
            return True, f"e2fsck -n -f: {fs.type} clean ({summary.split(': ', 1)[-1]})"
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        return False, f"e2fsck -n -f exited {result.returncode}: {tail}"
