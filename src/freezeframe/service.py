"""The operations, as the Python API. The CLI and the HTTP API are thin layers over this class."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.libvirt_hypervisor import LibvirtHypervisor
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.config import Settings
from freezeframe.flow import FlowSettings, SnapshotFlow, SnapshotRequest
from freezeframe.lifecycle import Lifecycle
from freezeframe.model import Instance, SetStatus, SnapshotSet
from freezeframe.portable import Portable
from freezeframe.ports import ProgressCallback


class Freezeframe:
    """Entry point of the Python API: ``with Freezeframe.open() as ff: ff.snapshot(SnapshotRequest("vm1"))``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.catalog = SqlCatalog(settings.catalog_url)
        self.images = QemuImg()
        self.repository = DirectoryRepository(settings.repository_dir, self.images)
        self.journal = FileJournal(settings.journal_dir)
        self.locks = FileLocks(settings.locks_dir)
        self._hypervisor: LibvirtHypervisor | None = None

    @classmethod
    @contextmanager
    def open(cls, settings: Settings | None = None) -> Iterator[Freezeframe]:
        service = cls(settings or Settings.from_env())
        try:
            yield service
        finally:
            service.close()

    def close(self) -> None:
        if self._hypervisor is not None:
            self._hypervisor.close()
        self.catalog.close()

    @property
    def hypervisor(self) -> LibvirtHypervisor:
        """Connected on first use, so catalog-only commands work without libvirt."""
        if self._hypervisor is None:
            self._hypervisor = LibvirtHypervisor(
                self.settings.libvirt_uri, self.images, self.settings.agent_timeout_s
            )
        return self._hypervisor

    def flow(self) -> SnapshotFlow:
        hold = float(os.environ.get("FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S", "0"))
        return SnapshotFlow(
            self.hypervisor,
            self.catalog,
            self.repository,
            self.journal,
            self.locks,
            FlowSettings(freeze_cap_s=self.settings.freeze_cap_s, hold_in_window_s=hold),
        )

    # ---- operations ------------------------------------------------------------------------------

    def snapshot(
        self, request: SnapshotRequest, progress: ProgressCallback | None = None, wait: bool = True
    ) -> SnapshotSet:
        """With ``wait=False`` the call returns once the point in time is fixed and the guest released; a
        detached ``freezeframe _complete`` process (holding the instance lock) waits for the copy and records it.
        """
        return self.flow().snapshot(request, progress, handoff=None if wait else self._detach_completion)

    def complete(self, set_id: str, lock_fd: int) -> SnapshotSet:
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

    @property
    def lifecycle(self) -> Lifecycle:
        """Restore, revert, delete, backup rotation and verify over this service."""
        return Lifecycle(self)

    @property
    def portable(self) -> Portable:
        """Export to OVA, the image store and import over this service."""
        from freezeframe import wiring

        return wiring.portable(self)

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

    def show(self, ref: str) -> SnapshotSet:
        return self.catalog.get_set(ref)


def settings_for(home: Path | None = None, uri: str | None = None, freeze_cap_s: float | None = None) -> Settings:
    settings = Settings.from_env(home=home, libvirt_uri=uri)
    return settings if freeze_cap_s is None else replace(settings, freeze_cap_s=freeze_cap_s)
