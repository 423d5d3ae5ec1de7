"""Which instances were built from which set members (lifecycle's restores), over a ``SqlCatalog``'s connections.

Kept apart from the Catalog port so that port stays unchanged; the rows are declared in ``catalog_schema``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, delete, insert, or_, select, update

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import RESTORES
from freezeframe.model import RestoreRecord


class RestoreLog:
    """The ``restores`` table over a SqlCatalog's connections; kept apart so the Catalog port stays unchanged."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def add(self, records: Sequence[RestoreRecord]) -> None:
        with self._catalog.connect("recording restored disks", write=True) as connection:
            if records:
                rows = [{k: v for k, v in vars(r).items() if k != "id"} for r in records]
                connection.execute(insert(RESTORES), rows)

    def bind_uuid(self, instance_name: str, instance_uuid: str) -> None:
        """Known only once libvirt has defined the instance, after the rows were written."""
        with self._catalog.connect(f"recording the UUID of {instance_name}", write=True) as connection:
            connection.execute(
                update(RESTORES)
                .where(RESTORES.c.instance_name == instance_name, RESTORES.c.instance_uuid.is_(None))
                .values(instance_uuid=instance_uuid)
            )

    def for_set(self, set_id: str) -> list[RestoreRecord]:
        query = select(RESTORES).where(RESTORES.c.set_id == set_id).order_by(RESTORES.c.id)
        with self._catalog.connect(f"listing restores of set {set_id}", write=False) as connection:
            return [_restore_record(row) for row in connection.execute(query)]

    def for_instance(self, ref: str) -> list[RestoreRecord]:
        """By instance name or UUID."""
        query = (
            select(RESTORES)
            .where(or_(RESTORES.c.instance_name == ref, RESTORES.c.instance_uuid == ref))
            .order_by(RESTORES.c.id)
        )
        with self._catalog.connect(f"listing restores of {ref}", write=False) as connection:
            return [_restore_record(row) for row in connection.execute(query)]

    def all(self) -> list[RestoreRecord]:
        with self._catalog.connect("listing restores", write=False) as connection:
            return [_restore_record(row) for row in connection.execute(select(RESTORES).order_by(RESTORES.c.id))]

    def remove_instance(self, instance_name: str) -> None:
        with self._catalog.connect(f"forgetting restores of {instance_name}", write=True) as connection:
            connection.execute(delete(RESTORES).where(RESTORES.c.instance_name == instance_name))

    def remove_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._catalog.connect("forgetting restored disks", write=True) as connection:
            connection.execute(delete(RESTORES).where(RESTORES.c.id.in_(list(ids))))


def _restore_record(row: Row[Any]) -> RestoreRecord:
    return RestoreRecord(
        set_id=row.set_id,
        instance_name=row.instance_name,
        target=row.target,
        path=row.path,
        mode=row.mode,
        created_at=row.created_at,
        instance_uuid=row.instance_uuid,
        id=row.id,
    )
