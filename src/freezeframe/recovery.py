"""What makes the flow safe to kill: thaw until confirmed, undo an I/O-error pause, and repair what a dead process
left (thaw/resume its guest, abort its copy, remove its data and snapshots, fail its set).

A mixin of ``SnapshotFlow``: the flow's collaborators are declared here so each half reads on its own.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Protocol

from freezeframe.errors import FreezeframeError, InstanceBusy, NotFound
from freezeframe.model import Instance, InstanceState, SetStatus
from freezeframe.ports import Catalog, Hypervisor, InstanceLocks, Journal, JournalEntry, Repository
from freezeframe.ports.volumes import Volumes
from freezeframe.volume_members import remove_volumes, retry_leftovers

log = logging.getLogger("freezeframe.flow")


class _RetrySettings(Protocol):
    @property
    def thaw_retry_s(self) -> float: ...


class Recovery:
    hypervisor: Hypervisor
    catalog: Catalog
    repository: Repository
    journal: Journal
    locks: InstanceLocks
    volumes: Volumes | None
    settings: _RetrySettings

    # ---- guest safety ------------------------------------------------------------------------------

    def _unblock(self, instance: Instance) -> None:
        """A full target fails guest writes under copy-before-write and QEMU pauses the guest: undo that."""
        try:
            if self.hypervisor.paused_by_io_error(instance):
                log.warning("%s was paused by an I/O error during the capture: aborting it, resuming", instance.name)
                if self.hypervisor.capture_in_flight(instance):
                    self.hypervisor.abort_capture(instance)
                self.hypervisor.resume(instance)
        except FreezeframeError:
            log.exception("could not resume %s after an I/O error", instance.name)

    def ensure_thawed(self, instance: Instance) -> bool:
        """Thaw until the agent confirms it, for a bounded time; False leaves the job to `repair`.

        The agent runs commands in order, so a thaw that succeeds comes after any freeze sent before it,
        even one whose reply timed out: success means the guest is thawed.
        """
        deadline = time.monotonic() + self.settings.thaw_retry_s
        while True:
            try:
                self.hypervisor.thaw(instance)
                return True
            except FreezeframeError as exc:
                if self._stopped(instance):
                    log.warning("%s stopped while frozen: no filesystem is left to thaw", instance.name)
                    return True
                log.warning("thaw of %s not confirmed yet: %s", instance.name, exc)
            if time.monotonic() > deadline:
                log.error("could not confirm %s thawed; `freezeframe repair` will retry", instance.name)
                return False
            time.sleep(0.5)
            self._unblock(instance)

    def _stopped(self, instance: Instance) -> bool:
        """A guest that shut down (or was destroyed) holds no frozen filesystem: there is nothing to thaw."""
        try:
            return self.hypervisor.state(instance) is InstanceState.SHUTOFF
        except NotFound:
            return True
        except FreezeframeError:
            return False

    # ---- repair --------------------------------------------------------------------------------------

    def repair(self, instance_ref: str | None = None) -> list[str]:
        """Finish what killed processes left: thaw/resume guests, abort copies, fail and clean their sets."""
        wanted_uuid = self.hypervisor.lookup(instance_ref).uuid if instance_ref else None
        reports = []
        for entry in self.journal.pending():
            if wanted_uuid and entry.instance_uuid != wanted_uuid:
                continue
            try:
                with self.locks.hold(entry.instance_uuid):
                    reports.extend(self.repair_locked(entry.instance_uuid))
            except InstanceBusy:
                reports.append(f"{entry.instance_name}: an operation is still running (pid {entry.pid}); left alone")
        if wanted_uuid is None:
            reports.extend(retry_leftovers(self.volumes, self.catalog))
        return reports

    def repair_locked(self, instance_uuid: str) -> list[str]:
        """With the instance's lock held, any journal entry for it belongs to a process that died."""
        return [self._repair_entry(e) for e in self.journal.pending() if e.instance_uuid == instance_uuid]

    def _repair_entry(self, entry: JournalEntry) -> str:
        done: list[str] = []
        try:
            instance: Instance | None = self.hypervisor.lookup(entry.instance_uuid)
        except NotFound:
            instance = None
        if instance is not None:
            if entry.capture_started and self.hypervisor.capture_in_flight(instance):
                self.hypervisor.abort_capture(instance)
                done.append("aborted the copy")
            if entry.paused and self.hypervisor.state(instance) is InstanceState.PAUSED:
                self.hypervisor.resume(instance)
                done.append("resumed the vCPUs")
            if entry.froze and self.hypervisor.state(instance) is InstanceState.RUNNING:
                if not self.ensure_thawed(instance):
                    return f"{entry.instance_name}: guest agent still not answering; run `freezeframe repair` again"
                done.append("thawed the filesystems")
        self.repository.remove(entry.set_id)
        try:
            snapshot_set = self.catalog.get_set(entry.set_id)
        except NotFound:
            snapshot_set = None
        if snapshot_set is not None and snapshot_set.status is not SetStatus.FAILED:
            snapshot_set.status = SetStatus.FAILED
            snapshot_set.members = []
            snapshot_set.completed_at = datetime.now(UTC)
            snapshot_set.error = (
                f"interrupted: freezeframe process {entry.pid} stopped during '{entry.phase}'; repaired"
            )
            self.catalog.update_set(snapshot_set)
        if not remove_volumes(self.volumes, entry.set_id, entry, self.catalog):
            done.append("its RBD snapshots cannot be removed now (repair retries them)")
        done.append(f"marked set {entry.set_id} failed and removed its data")
        self.journal.clear(entry.instance_uuid)
        return f"{entry.instance_name}: " + ", ".join(done)
