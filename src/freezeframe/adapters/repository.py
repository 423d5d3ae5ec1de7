"""The Repository port and the ``file`` MemberStore on a local directory: one folder per set, one qcow2 per member.

Capture writes into images ``prepare`` made; restore makes copy-on-write children whose backing file is the
member (or standalone copies); export, extract and revert read the member as a pinned qcow2 image.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from freezeframe.durable import sha256_file, write_atomically
from freezeframe.errors import CaptureFailed, HypervisorError, InsufficientSpace, PreflightFailed
from freezeframe.model import FILE_STORE, DiskSpec, Member, SnapshotSet
from freezeframe.ports import MANIFEST, CaptureTarget, ImageRef, Images, ProgressCallback
from freezeframe.serialize import set_to_dict

MEMBER_FORMAT = "qcow2"
RESTORED_FORMAT = "qcow2"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
"""Guest disks are nobody else's business: folders 0700, data files 0600 (issue 17 item 3)."""


class DirectoryRepository:
    def __init__(self, root: Path, images: Images) -> None:
        self.root = root
        self.images = images
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)

    def set_dir(self, set_id: str) -> Path:
        return self.root / set_id

    # ---- capture (Repository) -----------------------------------------------------------------------------

    def prepare(
        self, set_id: str, disks: Sequence[DiskSpec], parents: Mapping[str, str] | None = None
    ) -> list[CaptureTarget]:
        """Pre-created targets let the backup job start with REUSE_EXTERNAL, shortening the freeze window.

        An incremental target's backing file is named relative to the set's folder (``../PARENT/vda.qcow2``), so
        the repository can move as a whole.
        """
        directory = self.set_dir(set_id)
        directory.mkdir(parents=True, mode=PRIVATE_DIR)
        targets = []
        try:
            for disk in disks:
                path = self.member_path(set_id, disk.target)
                parent = (parents or {}).get(disk.target)
                backing = None
                if parent is not None:
                    relative = os.path.relpath(Path(parent).resolve(), directory.resolve())
                    backing = ImageRef(Path(relative), MEMBER_FORMAT)
                try:
                    self.images.create(path, MEMBER_FORMAT, disk.virtual_size, backing=backing)
                except InsufficientSpace as exc:
                    raise InsufficientSpace(f"repository {self.root} is full: {exc}") from exc
                except HypervisorError as exc:
                    raise CaptureFailed(f"cannot create member image {path}: {exc}") from exc
                path.chmod(PRIVATE_FILE)
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
        return self.set_dir(set_id).exists()

    def checksum(self, path: Path) -> str:
        return sha256_file(path)

    def written_bytes(self, path: Path) -> int:
        return path.stat().st_blocks * 512

    def drop_zeros(self, targets: Sequence[CaptureTarget]) -> None:
        """A raw block device (an LVM volume) cannot say which of its blocks hold no data, so QEMU's backup job
        copies every block and its zeros land in the member as data; libvirt gives the backup target no
        ``detect-zeroes``. ``qemu-img convert`` detects zeroed 4 KiB runs and leaves them out: the member ends as
        small as the device's data. A raw or qcow2 *file* reports its holes and needs none of this."""
        for target in targets:
            if target.disk.source_type != "block" or target.disk.format != "raw":
                continue
            sparse = target.path.with_name(f".{target.path.name}.sparse")
            try:
                self.images.convert(ImageRef(target.path, MEMBER_FORMAT), ImageRef(sparse, MEMBER_FORMAT))
                sparse.chmod(PRIVATE_FILE)
                sparse.replace(target.path)
            except HypervisorError as exc:
                raise CaptureFailed(f"cannot drop the zeros of member {target.path}: {exc}") from exc
            finally:
                sparse.unlink(missing_ok=True)

    def write_manifest(self, snapshot_set: SnapshotSet) -> None:
        """A set.json beside the data lets anyone tell which images belong together without the catalog."""
        record = set_to_dict(snapshot_set)
        for member in record["members"]:
            member["file"] = Path(member["path"]).name  # the folder stays understandable when moved
        path = self.set_dir(snapshot_set.id) / MANIFEST
        try:
            write_atomically(path, json.dumps(record, indent=2, sort_keys=True).encode(), 0o600)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InsufficientSpace(f"repository {self.root} is full writing {path}") from exc
            raise

    def manifest_checksums(self, set_id: str) -> dict[str, str | None]:
        path = self.set_dir(set_id) / MANIFEST
        try:
            record = json.loads(path.read_text())
            return {str(m["target"]): m.get("sha256") for m in record.get("members", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PreflightFailed(f"{path} is missing or unreadable ({exc})") from exc


class FileMembers:
    """The MemberStore of kind ``file``: a member is a qcow2 file (in the directory repository)."""

    def __init__(self, images: Images) -> None:
        self.images = images

    @property
    def kind(self) -> str:
        return FILE_STORE

    def present(self, member: Member) -> bool:
        return Path(member.path).is_file()

    def source(self, member: Member) -> ImageRef:
        return ImageRef(Path(member.path), member.format)

    def restore(self, member: Member, dst: Path, *, full: bool, progress: ProgressCallback | None = None) -> ImageRef:
        target = ImageRef(dst, RESTORED_FORMAT)
        if full:
            self.images.convert(self.source(member), target, progress=progress)
        else:
            self.images.create(dst, RESTORED_FORMAT, backing=ImageRef(Path(member.path).resolve(), member.format))
        dst.chmod(PRIVATE_FILE)
        return target

    def base_of(self, member: Member) -> str:
        return str(Path(member.path).resolve())

    def checksum(self, member: Member) -> str:
        return sha256_file(Path(member.path))

    def remove(self, member: Member) -> None:
        Path(member.path).unlink(missing_ok=True)
