"""The ChangePacker port for RBD members: the extents librbd reports changed between two snapshots of one image
(``diff_iterate``, what ``rbd diff --from-snap`` prints), written into a zstd-compressed qcow2 over the previous
copy's object.

The object is made with ``qemu-img create -u -b ../<previous set>/<target>.qcow2`` (the parent is on the remote,
not here) and filled with ``qemu-io`` compressed writes (``write -c -s CHUNK``) of the changed ranges, widened to
whole 64 KiB clusters (compressed writes go by cluster) and read from the new snapshot 4 MiB at a time through a
temporary file: memory stays bounded whatever the image size. A discarded range is read back as zeros, so it is
written as (compressed) zero data over the parent. The diff is computed here with the rbd bindings' diff_iterate
(the rbd helper's ``changed_extents`` was not on main when this was written).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from freezeframe.adapters.rbd_members import parse_source
from freezeframe.adapters.rbd_volumes import RbdVolumes
from freezeframe.errors import HypervisorError
from freezeframe.model import Member
from freezeframe.volume_members import RBD_SNAPSHOT_KEY

CLUSTER = 64 * 1024
CHUNK = 4 * 1024 * 1024
WRITES_PER_CALL = 16


def widened(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Changed ranges grown to whole clusters, merged, cut into CHUNK-sized writes (pure)."""
    ranges: list[list[int]] = []
    for offset, length in sorted(extents):
        start = offset - offset % CLUSTER
        end = min(size, -(-(offset + length) // CLUSTER) * CLUSTER)
        if ranges and start <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], end)
        else:
            ranges.append([start, end])
    return [(pos, min(CHUNK, end - pos)) for start, end in ranges for pos in range(start, end, CHUNK)]


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or "error" in done.stdout.lower():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise HypervisorError(f"{what} failed: {detail[0]}")


class RbdDiffPacker:
    def __init__(self, volumes: RbdVolumes) -> None:
        self.volumes = volumes

    @staticmethod
    def _snap(member: Member) -> tuple[str, str]:
        volume, snap = parse_source(member.path)
        return volume, member.metadata.get(RBD_SNAPSHOT_KEY, snap)

    def pack_changes(self, member: Member, since: Member, dst: Path, backing_name: str) -> int:
        """Write the object; returns the bytes of guest data it holds (the widened changed ranges)."""
        volume, snap = self._snap(member)
        _, previous = self._snap(since)
        partial = dst.with_name(dst.name + ".part")
        try:
            with self.volumes.cluster() as handle, self.volumes.image(handle, volume, snap, read_only=True) as img:
                size = int(img.size())
                found: list[tuple[int, int]] = []
                img.diff_iterate(0, size, previous, lambda off, length, _exists: found.append((off, length)))
                writes = widened(found, size)
                _run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "-u", "-b",
                      backing_name, "-F", "qcow2", str(partial), str(size)], f"creating {dst.name}")  # fmt: skip
                for batch in _batches(writes):
                    self._write(img, partial, batch)
            partial.rename(dst)
        finally:
            partial.unlink(missing_ok=True)
        return sum(length for _, length in writes)

    @staticmethod
    def _write(img: object, target: Path, batch: list[tuple[int, int]]) -> None:
        spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(target)}}
        with tempfile.TemporaryDirectory(prefix="ff-rbd-diff-", dir=target.parent) as tmp:
            commands: list[str] = []
            for n, (offset, length) in enumerate(batch):
                chunk = Path(tmp) / f"{n}.bin"
                chunk.write_bytes(img.read(offset, length))  # type: ignore[attr-defined]
                commands += ["-c", f"write -c -q -s {chunk} {offset} {length}"]
            _run(["qemu-io", *commands, "json:" + json.dumps(spec)], f"writing changed ranges into {target.name}")


def _batches(writes: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(writes), WRITES_PER_CALL):
        yield writes[start : start + WRITES_PER_CALL]
