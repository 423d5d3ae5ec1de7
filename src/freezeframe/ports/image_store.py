"""The image store: where exported packages are kept, and the records that describe them."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

IMAGE_AVAILABLE = "available"
IMAGE_DELETING = "deleting"


@dataclass(frozen=True)
class ImageDisk:
    """One disk of a stored package, in the descriptor's order."""

    target: str | None
    capacity: int
    format: str | None
    file_size: int | None
    controller: str | None


@dataclass(frozen=True)
class ImageNic:
    network: str | None
    model: str | None


@dataclass(frozen=True)
class ImageSummary:
    """What the package's descriptor says, so a listing needs no package I/O."""

    machine_name: str
    vcpus: int
    memory_bytes: int
    ovf_version: int
    disk_format: str
    disks: tuple[ImageDisk, ...] = ()
    nics: tuple[ImageNic, ...] = ()
    arch: str | None = None
    firmware: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine_name": self.machine_name,
            "vcpus": self.vcpus,
            "memory_bytes": self.memory_bytes,
            "ovf_version": self.ovf_version,
            "disk_format": self.disk_format,
            "arch": self.arch,
            "firmware": self.firmware,
            "disks": [vars(d) for d in self.disks],
            "nics": [vars(n) for n in self.nics],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSummary:
        return cls(
            machine_name=str(data.get("machine_name", "")),
            vcpus=int(data["vcpus"]),
            memory_bytes=int(data["memory_bytes"]),
            ovf_version=int(data["ovf_version"]),
            disk_format=str(data["disk_format"]),
            arch=data.get("arch"),
            firmware=data.get("firmware"),
            disks=tuple(ImageDisk(**d) for d in data.get("disks", ())),
            nics=tuple(ImageNic(**n) for n in data.get("nics", ())),
        )


@dataclass(frozen=True)
class NewImage:
    """What the caller knows about a package it hands to ``put_file``."""

    name: str
    filename: str
    summary: ImageSummary
    source_set_id: str | None = None


@dataclass(frozen=True)
class StoredImage:
    id: str
    name: str
    filename: str
    store: str
    """The store's URI (``file:///var/lib/freezeframe/images``); a record belongs to exactly one store."""
    size: int
    sha256: str
    created_at: datetime
    summary: ImageSummary
    source_set_id: str | None = None
    status: str = IMAGE_AVAILABLE
    location: str = ""
    """Where the package is, for people (a path for the directory store)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "source_set_id": self.source_set_id,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "filename": self.filename,
            "store": self.store,
            "location": self.location,
            "summary": self.summary.to_dict(),
        }


class ImageStore(Protocol):
    """Where exported packages are kept; every method either completes or leaves the store as it was."""

    uri: str

    def staging(self, filename: str) -> AbstractContextManager[Path]:
        """A fresh local path (not yet existing) to write a package to before ``put_file``; removed on exit.

        The directory store hands out a path on its own filesystem so that ``put_file`` is a rename.
        """

    def put_file(self, path: Path, new: NewImage) -> StoredImage:
        """Store the package at ``path`` (moved when it came from ``staging``, else copied) and record it."""

    def get_stream(self, image_id: str) -> AbstractContextManager[IO[bytes]]:
        """The package's bytes as a readable binary stream."""

    def local_file(self, image_id: str) -> AbstractContextManager[Path]:
        """A seekable local file holding the package for the duration of the block (remote stores download)."""

    def find(self, ref: str) -> StoredImage: ...

    def list_images(self) -> list[StoredImage]:
        """Available images of this store, newest first."""

    def delete(self, image_id: str) -> StoredImage:
        """Mark deleting, remove the data, remove the record; an interruption is finished by ``repair``."""

    def repair(self) -> list[str]:
        """Finish interrupted deletes and remove half-written packages; return what was done."""
