"""The operations, as the Python API. The CLI and the HTTP API are thin layers over this class."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.libvirt_hypervisor import LibvirtHypervisor
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.config import Settings
from freezeframe.flow import FlowSettings, SnapshotFlow, SnapshotRequest
from freezeframe.model import Instance, SetStatus, SnapshotSet
from freezeframe.ports import ProgressCallback


class Freezeframe:
    """Entry point of the Python API: ``with Freezeframe.open() as ff: ff.snapshot(SnapshotRequest("vm1"))``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.catalog = SqlCatalog(settings.catalog_url)
        self.repository = DirectoryRepository(settings.repository_dir)
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
            self._hypervisor = LibvirtHypervisor(self.settings.libvirt_uri, self.settings.agent_timeout_s)
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

    def snapshot(self, request: SnapshotRequest, progress: ProgressCallback | None = None) -> SnapshotSet:
        return self.flow().snapshot(request, progress)

    def repair(self, instance: str | None = None) -> list[str]:
        return self.flow().repair(instance)

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
        return self.catalog.list_sets(
            instance=instance, status=status, backup_type=backup_type, metadata=metadata
        )

    def show(self, ref: str) -> SnapshotSet:
        return self.catalog.get_set(ref)


def settings_for(
    home: Path | None = None, uri: str | None = None, freeze_cap_s: float | None = None
) -> Settings:
    settings = Settings.from_env(home=home, libvirt_uri=uri)
    return settings if freeze_cap_s is None else replace(settings, freeze_cap_s=freeze_cap_s)
