"""What happens to a set after it is taken, as one object for the CLI and the HTTP API: ``ff.lifecycle``.

The operations themselves live in ``freezeframe.ops`` (one module each, over ports only); this façade keeps the
calls and result types the CLI and the API use in one place, and runs their repairs in order.
"""

from __future__ import annotations

from pathlib import Path

from freezeframe.errors import SetHasDependants, VerifyFailed
from freezeframe.incremental import AUTO, DEFAULT_MAX_CHAIN
from freezeframe.model import Consistency, SnapshotSet
from freezeframe.ops.instances import InstanceBuilder
from freezeframe.ops.restore import COW, FULL, Restore, RestoredDisk, RestoreResult
from freezeframe.ops.retention import BackupResult, DeleteResult, Dependant, Retention, Visible
from freezeframe.ops.revert import Revert, RevertResult
from freezeframe.ops.verify import Check, Verify, VerifyReport
from freezeframe.ports import ProgressCallback, Restores


class Lifecycle:
    """Restore, extract, discard, revert, delete, backup with rotation, verify and their repair."""

    def __init__(
        self,
        restore: Restore,
        revert: Revert,
        retention: Retention,
        verify: Verify,
        builder: InstanceBuilder,
        restores: Restores,
    ) -> None:
        self._restore = restore
        self._revert = revert
        self._retention = retention
        self._verify = verify
        self._builder = builder
        self._restores = restores

    def restore(
        self,
        set_ref: str,
        name: str,
        *,
        start: bool = False,
        full: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreResult:
        return self._restore.restore(set_ref, name, start=start, full=full, progress=progress)

    def extract(self, set_ref: str, target: str, to: Path, fmt: str = "qcow2") -> Path:
        return self._restore.extract(set_ref, target, to, fmt)

    def discard(self, name: str) -> list[str]:
        return self._restore.discard(name)

    def revert(self, set_ref: str, *, safety: bool = True) -> RevertResult:
        return self._revert.revert(set_ref, safety=safety)

    def delete(self, set_ref: str, *, force: bool = False) -> DeleteResult:
        return self._retention.delete(set_ref, force=force)

    def dependants(self, snapshot_set: SnapshotSet) -> list[Dependant]:
        return self._retention.dependants(snapshot_set)

    def backup(
        self,
        instance: str,
        backup_type: str,
        rotation: int,
        *,
        metadata: dict[str, str] | None = None,
        consistency: Consistency = Consistency.FILESYSTEM,
        require: bool = False,
        name: str | None = None,
        set_id: str | None = None,
        visible: Visible | None = None,
        progress: ProgressCallback | None = None,
        mode: str = AUTO,
        max_chain: int = DEFAULT_MAX_CHAIN,
    ) -> BackupResult:
        return self._retention.backup(
            instance, backup_type, rotation, metadata=metadata, consistency=consistency, require=require, name=name,
            set_id=set_id, visible=visible, progress=progress, mode=mode, max_chain=max_chain,
        )  # fmt: skip

    def rotate(
        self, instance_uuid: str, backup_type: str, rotation: int, *, visible: Visible | None = None
    ) -> tuple[list[str], dict[str, str]]:
        return self._retention.rotate(instance_uuid, backup_type, rotation, visible=visible)

    def verify(self, set_ref: str, *, boot: bool = False) -> VerifyReport:
        return self._verify.verify(set_ref, boot=boot)

    def repair(self) -> list[str]:
        """Finish or undo what killed operations left: half-made instances, reverts, deletes, stale restore rows."""
        reports = self._builder.repair() + self._revert.repair() + self._retention.repair()
        stale = [
            r.id
            for r in self._restores.all()
            if r.id is not None and not r.path.startswith("rbd:") and not Path(r.path).exists()
        ]  # RBD clones (rbd:POOL/IMAGE) are not files: discard removes them
        if stale:
            self._restores.remove_ids(stale)
            reports.append(f"forgot {len(stale)} restore record(s) whose disks no longer exist")
        return reports


__all__ = [
    "COW",
    "FULL",
    "BackupResult",
    "Check",
    "DeleteResult",
    "Dependant",
    "Lifecycle",
    "RestoreResult",
    "RestoredDisk",
    "RevertResult",
    "SetHasDependants",
    "VerifyFailed",
    "VerifyReport",
]
