"""What the image store knows about each package it keeps: the records in the catalog's ``stored_images`` table.

Any store backend (the directory store today, an object store later) keeps its records here, so listing images
needs no I/O on the packages. The packages themselves are ``image_store``'s business.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, delete, insert, or_, select, update

from freezeframe.adapters.catalog import MIN_PREFIX, SqlCatalog
from freezeframe.adapters.catalog_schema import STORED_IMAGES as IMAGES
from freezeframe.errors import ImageNotFound, InvalidRequest
from freezeframe.ports import (
    IMAGE_AVAILABLE,
    IMAGE_DELETING,
    ImageDisk,
    ImageNic,
    ImageSummary,
    NewImage,
    StoredImage,
)

STORE_ENV = "FREEZEFRAME_IMAGE_STORE"
AVAILABLE = IMAGE_AVAILABLE
DELETING = IMAGE_DELETING

__all__ = ["AVAILABLE", "DELETING", "ImageDisk", "ImageNic", "ImageRecords", "ImageSummary", "NewImage", "StoredImage"]


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
