"""The operations, as the Python API. The CLI and the HTTP API are thin layers over this class.

``freezeframe.wiring`` builds it (``wiring.open_service(settings)``); it holds no construction of its own.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from freezeframe.config import Settings
from freezeframe.flow import SnapshotFlow, SnapshotRequest
from freezeframe.model import Instance, SetStatus, SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.set_query import Cursor, SetFilter, SetPage

if TYPE_CHECKING:
    from freezeframe.adapters.catalog import SqlCatalog
    from freezeframe.adapters.journal import FileJournal
    from freezeframe.adapters.libvirt_hypervisor import LibvirtHypervisor
    from freezeframe.adapters.locks import FileLocks
    from freezeframe.adapters.qemu_img import QemuImg
    from freezeframe.adapters.repository import DirectoryRepository
    from freezeframe.lifecycle import Lifecycle
    from freezeframe.portable import Portable
    from freezeframe.wiring import Wiring


class Freezeframe:
    """Entry point of the Python API: ``with wiring.open_service() as ff: ff.snapshot(SnapshotRequest("vm1"))``."""

    def __init__(self, settings: Settings, parts: Wiring | None = None) -> None:
        if parts is None:  # ``Freezeframe(settings)`` as before; the objects still come from wiring
            from freezeframe.wiring import Wiring

            parts = Wiring(settings)
        self.settings = settings
        self.parts = parts

    @classmethod
    @contextmanager
    def open(cls, settings: Settings | None = None) -> Iterator[Freezeframe]:
        """Same as ``wiring.open_service(settings)``."""
        service = cls(settings or Settings.from_env())
        try:
            yield service
        finally:
            service.close()

    def close(self) -> None:
        self.parts.close()

    # ---- the parts other layers read -----------------------------------------------------------------------

    @property
    def catalog(self) -> SqlCatalog:
        return self.parts.catalog

    @property
    def repository(self) -> DirectoryRepository:
        return self.parts.repository

    @property
    def journal(self) -> FileJournal:
        return self.parts.journal

    @property
    def locks(self) -> FileLocks:
        return self.parts.locks

    @property
    def images(self) -> QemuImg:
        return self.parts.images

    @property
    def hypervisor(self) -> LibvirtHypervisor:
        """Connected on first use, so catalog-only commands work without libvirt."""
        return self.parts.hypervisor

    def flow(self) -> SnapshotFlow:
        return self.parts.flow()

    # ---- operations ------------------------------------------------------------------------------

    def snapshot(
        self, request: SnapshotRequest, progress: ProgressCallback | None = None, wait: bool = True
    ) -> SnapshotSet:
        """With ``wait=False`` the call returns once the point in time is fixed and the guest released; a
        detached ``freezeframe _complete`` process (holding the instance lock) waits for the copy and records it.
        """
        return self.flow().snapshot(request, progress, handoff=None if wait else self._detach_completion)

    def complete(self, set_id: str, lock_fd: int) -> SnapshotSet:
        from freezeframe.adapters.locks import FileLocks

        with FileLocks.adopt(lock_fd):
            return self.flow().complete(set_id)

    def _detach_completion(self, snapshot_set: SnapshotSet, lock_fd: int) -> None:
        logs = self.settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "freezeframe.cli", "_complete", snapshot_set.id, "--lock-fd", str(lock_fd),
            "--home", str(self.settings.home), "--connect", self.settings.libvirt_uri,
        ]  # fmt: skip
        with (logs / f"{snapshot_set.id}.log").open("ab") as log_file:
            subprocess.Popen(
                argv, pass_fds=(lock_fd,), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip

    def check_not_busy(self, instance_uuid: str) -> None:
        """Raise InstanceBusy when another operation holds the instance's lock (it is not kept)."""
        with self.locks.hold(instance_uuid):
            pass

    @property
    def lifecycle(self) -> Lifecycle:
        """Restore, revert, delete, backup rotation and verify."""
        return self.parts.lifecycle

    @property
    def portable(self) -> Portable:
        """Export to OVA, the image store and import."""
        return self.parts.portable(self)

    def repair(self, instance: str | None = None) -> list[str]:
        reports = self.flow().repair(instance)
        return reports if instance is not None else reports + self.lifecycle.repair() + self.portable.repair()

    def instances(self) -> list[Instance]:
        return self.hypervisor.list_instances()

    def instance(self, ref: str) -> Instance:
        return self.hypervisor.lookup(ref)

    def list_sets(
        self,
        instance: str | None = None,
        status: SetStatus | None = None,
        backup_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SnapshotSet]:
        return self.catalog.list_sets(instance=instance, status=status, backup_type=backup_type, metadata=metadata)

    def page_sets(self, wanted: SetFilter, limit: int, cursor: Cursor | None = None) -> SetPage:
        return self.catalog.page_sets(wanted, limit, cursor)

    def iter_sets(self, wanted: SetFilter, cursor: Cursor | None = None) -> Iterator[SnapshotSet]:
        return self.catalog.iter_sets(wanted, cursor)

    def count_sets(self, wanted: SetFilter, bound: int | None = None, cursor: Cursor | None = None) -> int:
        return self.catalog.count_sets(wanted, bound, cursor)

    def show(self, ref: str) -> SnapshotSet:
        return self.catalog.get_set(ref)
