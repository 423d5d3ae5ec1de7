"""Restore a set on a host other than the one that captured it: bring its file members over, verified.

The members of a set live in the repository of the host that captured it (``set_hosts``). Restoring elsewhere
copies each file member into this host's repository (``transferred/<set id>/``), hashing while it copies and
comparing with the SHA-256 recorded at capture: a member that does not match fails the job and leaves nothing
behind. The restore then runs over the local copies (``RelocatedCatalog`` hands the restore the set with its
members pointing there), so the new instance never depends on another host's disks. The source is read as a
path: the source repository must be reachable from this host (shared storage, or the test bed's hosts on one
machine); a network transport between agents is not part of this.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from freezeframe.errors import PreflightFailed, VerifyFailed
from freezeframe.incremental import PARENT_KEY
from freezeframe.model import FILE_STORE, STORE_KEY, Member, SnapshotSet

CHUNK = 4 << 20


def _copy_verified(src: Path, dst: Path, expected: str | None, progress: Callable[[int], None]) -> None:
    digest = hashlib.sha256()
    tmp = dst.with_name(dst.name + ".part")
    try:
        with src.open("rb") as reader, tmp.open("wb") as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
                progress(len(chunk))
        if expected is not None and digest.hexdigest() != expected:
            raise VerifyFailed(
                f"member {src.name} arrived with SHA-256 {digest.hexdigest()[:16]}..., recorded {expected[:16]}...; "
                "the source copy is damaged - nothing was restored"
            )
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def transfer_members(snapshot_set: SnapshotSet, into: Path, progress: Callable[[int, int], None]) -> dict[str, Path]:
    """Copy the set's file members into ``into``/<set id>/ (verified); target -> local path. All or nothing."""
    files = [m for m in snapshot_set.members if m.metadata.get(STORE_KEY, FILE_STORE) == FILE_STORE]
    missing = [m.path for m in files if not Path(m.path).is_file()]
    if missing:
        raise PreflightFailed(
            f"set {snapshot_set.id}: the members {', '.join(missing)} are not reachable from this host; the source "
            "repository must be shared with it"
        )
    total = sum(Path(m.path).stat().st_size for m in files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    directory = into / snapshot_set.id
    directory.mkdir(parents=True, exist_ok=True)
    copied: dict[str, Path] = {}
    try:
        for member in files:
            dst = directory / Path(member.path).name
            if not dst.exists():
                _copy_verified(Path(member.path), dst, member.sha256, advance)
            copied[member.target] = dst
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    progress(total, total)
    return copied


def backing_sets(snapshot_set: SnapshotSet, get_set: Callable[[str], SnapshotSet]) -> list[SnapshotSet]:
    """Every set the set's incremental members build on, nearest first: their members are the backing files
    (``../<parent id>/vda.qcow2``), so they travel with the set into ``into``/<parent id>/."""
    found: list[SnapshotSet] = []
    seen = {snapshot_set.id}
    pending = [snapshot_set]
    while pending:
        for member in pending.pop(0).members:
            parent = member.metadata.get(PARENT_KEY)
            if parent and parent not in seen:
                seen.add(parent)
                found.append(get_set(str(parent)))
                pending.append(found[-1])
    return found


def relocated(snapshot_set: SnapshotSet, paths: dict[str, Path]) -> SnapshotSet:
    members: list[Member] = [
        replace(m, path=str(paths[m.target])) if m.target in paths else m for m in snapshot_set.members
    ]
    return replace(snapshot_set, members=members)


class RelocatedCatalog:
    """The catalog, except that one set's file members are read from their transferred copies."""

    def __init__(self, catalog: Any, snapshot_set: SnapshotSet) -> None:
        self._catalog = catalog
        self._set = snapshot_set

    def get_set(self, ref: str) -> SnapshotSet:
        return self._set if ref == self._set.id else self._catalog.get_set(ref)

    def load_sets(self, ids: list[str]) -> list[SnapshotSet]:
        return [self._set if s.id == self._set.id else s for s in self._catalog.load_sets(ids)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._catalog, name)


def discard_copies(into: Path, set_id: str) -> None:
    """The transferred copies of a set whose restore failed (nothing depends on them)."""
    with contextlib.suppress(OSError):
        shutil.rmtree(into / set_id)
