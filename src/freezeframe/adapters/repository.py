"""The Repository port on a local directory: one folder per set, one qcow2 image per member."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from freezeframe.durable import sha256_file, write_atomically
from freezeframe.errors import CaptureFailed, InsufficientSpace
from freezeframe.model import DiskSpec, SnapshotSet
from freezeframe.ports import CaptureTarget

MEMBER_FORMAT = "qcow2"
MANIFEST = "set.json"


class DirectoryRepository:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def set_dir(self, set_id: str) -> Path:
        return self.root / set_id

    def prepare(self, set_id: str, disks: Sequence[DiskSpec]) -> list[CaptureTarget]:
        """Pre-created targets let the backup job start with REUSE_EXTERNAL, shortening the freeze window."""
        directory = self.set_dir(set_id)
        directory.mkdir(parents=True, exist_ok=False)
        targets = []
        try:
            for disk in disks:
                path = self.member_path(set_id, disk.target)
                argv = ["qemu-img", "create", "-q", "-f", MEMBER_FORMAT, str(path), str(disk.virtual_size)]
                result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
                if result.returncode != 0:
                    if "No space left" in result.stderr:
                        raise InsufficientSpace(f"repository {self.root} is full: {result.stderr.strip()}")
                    raise CaptureFailed(f"cannot create member image {path}: {result.stderr.strip()}")
                targets.append(CaptureTarget(disk=disk, path=path, format=MEMBER_FORMAT))
        except BaseException:
            self.remove(set_id)
            raise
        return targets

    def existing_targets(self, set_id: str, disks: Sequence[DiskSpec]) -> list[CaptureTarget]:
        paths = [(d, self.member_path(set_id, d.target)) for d in disks]
        return [CaptureTarget(disk=d, path=p, format=MEMBER_FORMAT) for d, p in paths if p.is_file()]

    def member_path(self, set_id: str, target: str) -> Path:
        return self.set_dir(set_id) / f"{target}.{MEMBER_FORMAT}"

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def remove(self, set_id: str) -> None:
        shutil.rmtree(self.set_dir(set_id), ignore_errors=True)

    def exists(self, set_id: str) -> bool:
        return self.set_dir(set_id).is_dir()

    def checksum(self, path: Path) -> str:
        return sha256_file(path)

    def write_manifest(self, snapshot_set: SnapshotSet) -> None:
        """A set.json beside the data lets anyone tell which images belong together without the catalog."""
        record = {
            "set_id": snapshot_set.id,
            "name": snapshot_set.name,
            "instance": {"name": snapshot_set.instance_name, "uuid": snapshot_set.instance_uuid},
            "consistency": {
                "requested": str(snapshot_set.requested),
                "achieved": str(snapshot_set.achieved) if snapshot_set.achieved else None,
                "reason": snapshot_set.reason,
            },
            "created_at": snapshot_set.created_at.isoformat(),
            "completed_at": snapshot_set.completed_at.isoformat() if snapshot_set.completed_at else None,
            "members": [
                {"target": m.target, "file": Path(m.path).name, "sha256": m.sha256, "metadata": m.metadata}
                for m in snapshot_set.members
            ],
            "hardware": snapshot_set.hardware.to_dict(),
        }
        path = self.set_dir(snapshot_set.id) / MANIFEST
        try:
            write_atomically(path, json.dumps(record, indent=2, sort_keys=True).encode(), 0o644)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InsufficientSpace(f"repository {self.root} is full writing {path}") from exc
            raise
