"""What the image store knows about each package it keeps: the records in the catalog's ``stored_images`` table.

Any store backend (the directory store today, an object store later) keeps its records here, so listing images
needs no I/O on the packages. The packages themselves are ``image_store``'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, insert, or_, select, update

from freezeframe.adapters.catalog import MIN_PREFIX, SqlCatalog
from freezeframe.adapters.catalog_schema import STORED_IMAGES as IMAGES
from freezeframe.errors import ImageNotFound, InvalidRequest

STORE_ENV = "FREEZEFRAME_IMAGE_STORE"
AVAILABLE = "available"
DELETING = "deleting"


# ---- records ------------------------------------------------------------------------------------------------


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
    status: str = AVAILABLE
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


def _from_row(row: Row[Any]) -> StoredImage:
    return StoredImage(
        id=row.id,
        name=row.name,
        filename=row.filename,
        store=row.store,
        size=row.size,
        sha256=row.sha256,
        created_at=row.created_at,
        summary=ImageSummary.from_dict(row.summary),
        source_set_id=row.source_set_id,
        status=row.status,
    )


class ImageRecords:
    """The ``stored_images`` table over a SqlCatalog's connections; any store backend keeps its records here."""

    def __init__(self, catalog: SqlCatalog, store: str) -> None:
        self._catalog = catalog
        self.store = store

    def add(self, image: StoredImage) -> None:
        with self._catalog.connect(f"recording image {image.id}", write=True) as connection:
            connection.execute(
                insert(IMAGES).values(
                    id=image.id,
                    name=image.name,
                    status=image.status,
                    store=image.store,
                    filename=image.filename,
                    source_set_id=image.source_set_id,
                    size=image.size,
                    sha256=image.sha256,
                    created_at=image.created_at,
                    summary=image.summary.to_dict(),
                )
            )

    def find(self, ref: str) -> StoredImage:
        """By full id, unique id prefix (at least 4 characters) or unique name, within this store."""
        with self._catalog.connect(f"looking up image {ref!r}", write=False) as connection:
            row = connection.execute(select(IMAGES).where(IMAGES.c.id == ref)).first()
            if row is not None and row.store == self.store:
                return _from_row(row)
            conditions = [IMAGES.c.name == ref]
            if len(ref) >= MIN_PREFIX:
                conditions += [IMAGES.c.id.startswith(p, autoescape=True) for p in {ref, ref.lower()}]
            query = (
                select(IMAGES)
                .where(IMAGES.c.store == self.store, or_(*conditions))
                .order_by(IMAGES.c.created_at.desc(), IMAGES.c.id)
            )
            rows = list(connection.execute(query))
            others = 0 if rows else len(list(connection.scalars(select(IMAGES.c.id).where(or_(*conditions)))))
        if not rows:
            elsewhere = f"; {others} image(s) of another store match (see {STORE_ENV})" if others else ""
            raise ImageNotFound(
                f"no stored image matches {ref!r} in {self.store} (give an id, an id prefix of at least "
                f"{MIN_PREFIX} characters, or a name; `freezeframe images list`){elsewhere}"
            )
        if len(rows) > 1:
            candidates = ", ".join(f"{r.id} ({r.name})" for r in rows)
            raise InvalidRequest(f"{ref!r} matches several stored images: {candidates}; use the full id")
        return _from_row(rows[0])

    def all(self, status: str | None = None) -> list[StoredImage]:
        query = select(IMAGES).where(IMAGES.c.store == self.store)
        if status is not None:
            query = query.where(IMAGES.c.status == status)
        query = query.order_by(IMAGES.c.created_at.desc(), IMAGES.c.id)
        with self._catalog.connect("listing stored images", write=False) as connection:
            return [_from_row(row) for row in connection.execute(query)]

    def ids(self) -> set[str]:
        with self._catalog.connect("listing stored images", write=False) as connection:
            return set(connection.scalars(select(IMAGES.c.id).where(IMAGES.c.store == self.store)))

    def mark(self, image_id: str, status: str) -> None:
        with self._catalog.connect(f"marking image {image_id} {status}", write=True) as connection:
            connection.execute(update(IMAGES).where(IMAGES.c.id == image_id).values(status=status))

    def remove(self, image_id: str) -> None:
        with self._catalog.connect(f"deleting image {image_id}", write=True) as connection:
            connection.execute(delete(IMAGES).where(IMAGES.c.id == image_id))
