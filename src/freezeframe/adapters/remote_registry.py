"""The RemoteRegistry port over the catalog: remotes and which sets have copies where (tables ``remotes``,
``set_copies``, revision 0008). A remote's row holds no credential: boto3 finds them; ``key_file`` is a path."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import REMOTES, SET_COPIES
from freezeframe.errors import InvalidRequest, RemoteNotFound
from freezeframe.ports.remote import CopyRecord, RemoteSpec


def _spec(row: Any) -> RemoteSpec:
    return RemoteSpec(**dict(row._mapping))


class CatalogRemotes:
    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def add(self, spec: RemoteSpec) -> None:
        values = {**vars(spec), "created_at": spec.created_at or datetime.now(UTC)}
        with self._catalog.connect(f"adding remote {spec.name}", write=True) as connection:
            if connection.scalar(select(REMOTES.c.name).where(REMOTES.c.name == spec.name)) is not None:
                raise InvalidRequest(f"remote {spec.name} exists already; remove it first to change it")
            connection.execute(insert(REMOTES).values(**values))

    def get(self, name: str) -> RemoteSpec:
        with self._catalog.connect(f"reading remote {name}", write=False) as connection:
            row = connection.execute(select(REMOTES).where(REMOTES.c.name == name)).first()
        if row is None:
            raise RemoteNotFound(f"no remote named {name}; `freezeframe remote list` shows them")
        return _spec(row)

    def all(self) -> list[RemoteSpec]:
        with self._catalog.connect("listing remotes", write=False) as connection:
            return [_spec(r) for r in connection.execute(select(REMOTES).order_by(REMOTES.c.name))]

    def remove(self, name: str) -> None:
        self.get(name)
        with self._catalog.connect(f"removing remote {name}", write=True) as connection:
            connection.execute(delete(SET_COPIES).where(SET_COPIES.c.remote == name))
            connection.execute(delete(REMOTES).where(REMOTES.c.name == name))

    def record_copy(self, record: CopyRecord) -> None:
        with self._catalog.connect(f"recording the copy of {record.set_id}", write=True) as connection:
            connection.execute(
                delete(SET_COPIES).where(SET_COPIES.c.set_id == record.set_id, SET_COPIES.c.remote == record.remote)
            )
            connection.execute(insert(SET_COPIES).values(**vars(record)))

    def forget_copy(self, set_id: str, remote: str) -> None:
        with self._catalog.connect(f"forgetting the copy of {set_id}", write=True) as connection:
            connection.execute(delete(SET_COPIES).where(SET_COPIES.c.set_id == set_id, SET_COPIES.c.remote == remote))

    def copies(self, set_ids: Sequence[str] | None = None) -> list[CopyRecord]:
        query = select(SET_COPIES).order_by(SET_COPIES.c.copied_at)
        if set_ids is not None:
            query = query.where(SET_COPIES.c.set_id.in_(list(set_ids)))
        with self._catalog.connect("listing copies", write=False) as connection:
            return [CopyRecord(**dict(r._mapping)) for r in connection.execute(query)]
