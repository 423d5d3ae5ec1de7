"""A new instance, or nothing: its folder, its disks and its domain, all undone when any step fails.

Restore, verify's throw-away clone and import build instances the same way: claim the folder (with a marker that
lets ``repair`` remove a half-made instance after a SIGKILL), make the disks, define the domain last, start it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from freezeframe.errors import FreezeframeError, InstanceBusy, InvalidRequest
from freezeframe.model import DiskSpec, Member, SnapshotSet
from freezeframe.ops.common import Holds, Lazy, Markers, Stores
from freezeframe.ports import DomainDisk, DomainPlan, Domains, ImageRef, ProgressCallback, Restores
from freezeframe.ports.volumes import CLONE_SUFFIX, RBD_PREFIX, ClonedMembers
from freezeframe.signals import deferred_signals

log = logging.getLogger(__name__)
MARKER = "restore"


@dataclass
class Build:
    """An instance being built: the domain's UUID once it is defined."""

    name: str
    directory: Path
    uuid: str | None = None


def member_disks_into(
    directory: Path,
    disks: Sequence[tuple[DiskSpec, Member]],
    stores: Stores,
    *,
    full: bool,
    progress: ProgressCallback | None = None,
) -> list[ImageRef]:
    """One disk per member in ``directory``: copy-on-write children, or with ``full`` standalone copies."""
    total = sum(m.virtual_size for _, m in disks)
    done = 0
    made = []
    for spec, member in disks:

        def report(n: int, _total: int, offset: int = done, size: int = member.virtual_size) -> None:
            if progress is not None:
                progress(offset + min(n, size), total)

        dst = directory / f"{spec.target}.qcow2"
        made.append(stores.of(member).restore(member, dst, full=full, progress=report if full else None))
        done += member.virtual_size
    if progress is not None:
        progress(total, total)
    return made


def domain_plan(
    build: Build,
    snapshot_set: SnapshotSet,
    disks: Sequence[tuple[DiskSpec, Member]],
    restored: Sequence[ImageRef],
    *,
    domain_type: str,
    without_network: bool = False,
) -> DomainPlan:
    """The set's recorded machine over the restored disks."""
    return DomainPlan(
        name=build.name,
        hardware=snapshot_set.hardware,
        disks=tuple(DomainDisk(s, r.path, r.format) for (s, _), r in zip(disks, restored, strict=True)),
        directory=build.directory,
        nics=() if without_network else None,
        domain_type=domain_type,
    )


class InstanceBuilder:
    def __init__(
        self, domains: Lazy[Domains], markers: Markers, restores: Restores, holds: Holds, stores: Stores | None = None
    ) -> None:
        self.domains = domains
        self.markers = markers
        self.restores = restores
        self.holds = holds
        self.stores = stores
        """Where backend clones (RBD) of a half-made instance are removed from: not from its folder."""

    @contextlib.contextmanager
    def building(self, name: str, directory: Path, *, forget_restores: bool) -> Iterator[Build]:
        """Claim ``directory`` for instance ``name``; if the block raises, remove all it made (and its rows)."""
        marker = self._claim(name, directory)
        build = Build(name, directory)
        try:
            yield build
        except BaseException:
            with deferred_signals():
                self.undo(name, directory, build.uuid, forget_restores=forget_restores)
                marker.unlink(missing_ok=True)
            raise
        marker.unlink(missing_ok=True)

    def define(self, build: Build, plan: DomainPlan, *, start: bool = False) -> str:
        build.uuid = self.domains().define(plan)
        self.markers.write(MARKER, build.name, {"name": build.name, "dir": str(build.directory), "uuid": build.uuid})
        if start:
            self.domains().start(build.uuid)
        return build.uuid

    def _claim(self, name: str, directory: Path) -> Path:
        directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise InvalidRequest(
                f"{directory} already exists (left by an earlier instance named {name}?); "
                "remove it or choose another name"
            ) from None
        return self.markers.write(MARKER, name, {"name": name, "dir": str(directory), "uuid": None})

    def undo(self, name: str, directory: Path, uuid: str | None, *, forget_restores: bool) -> None:
        """Best effort, each step on its own, so one failing step does not keep the others from running."""
        try:
            if uuid is not None:
                self.domains().remove(uuid)
            else:  # defined but killed before the marker learnt the UUID: only a domain whose disks are ours
                self.remove_domain_in(name, directory)
        except FreezeframeError:
            log.exception("could not remove the half-made domain %s", name)
        if self.stores is not None:
            try:
                remove_backend_clones(self.stores, directory)
            except FreezeframeError:
                log.exception("could not remove the backend clones of the half-made instance %s", name)
        shutil.rmtree(directory, ignore_errors=True)
        if forget_restores:
            try:
                self.restores.remove_instance(name)
            except FreezeframeError:
                log.exception("could not forget the restore rows of %s", name)

    def remove_domain_in(self, name: str, directory: Path) -> bool:
        """Remove the domain called ``name`` only if every disk of it lives in ``directory``, or is an RBD image noted
        there (``<target>.rbd``) — so it is ours."""
        uuid = self.domains().uuid_of(name)
        if uuid is None:
            return False
        sources = self.domains().disk_sources(uuid)
        noted = {f"{RBD_PREFIX}{p.read_text().strip()}" for p in directory.glob(f"*{CLONE_SUFFIX}")}
        if sources and all(s in noted or Path(s).resolve().parent == directory.resolve() for s in sources.values()):
            return self.domains().remove(uuid)
        return False

    def repair(self) -> list[str]:
        """Remove every instance an interrupted restore, verify or import left half-made."""
        reports = []
        for path in self.markers.all():
            data = self.markers.read(path)
            if data is None or data.get("kind") != MARKER:
                continue
            name = str(data.get("name"))
            try:
                with self.holds.name(name):
                    self.undo(name, Path(str(data["dir"])), data.get("uuid"), forget_restores=True)
                    path.unlink(missing_ok=True)
                    reports.append(f"{name}: removed an instance an interrupted restore/verify/import left half-made")
            except InstanceBusy:
                reports.append(f"{path.name}: its operation is still running; left alone")
        return reports


def remove_backend_clones(stores: Stores, directory: Path, recorded: Sequence[str] = ()) -> list[str]:
    """RBD clones made for the instance in ``directory`` (noted there as ``<target>.rbd``, or recorded as
    ``rbd:POOL/IMAGE`` restore paths): they live in the volume backend, so removing the folder does not remove them."""
    noted = [p.read_text().strip() for p in directory.glob(f"*{CLONE_SUFFIX}")] if directory.is_dir() else []
    clones = list(dict.fromkeys([r[len(RBD_PREFIX) :] for r in recorded if r.startswith(RBD_PREFIX)] + noted))
    cloned = [s for s in stores.by_kind.values() if isinstance(s, ClonedMembers)]
    if not cloned:
        return []
    for clone in clones:
        cloned[0].remove_clone(clone)
    return [f"removed RBD image {c}" for c in clones]
