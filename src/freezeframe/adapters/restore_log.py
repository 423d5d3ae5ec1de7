"""Which instances were built from which set members (lifecycle's restores), over a ``SqlCatalog``'s sessions.

Kept apart from the Catalog port so that port stays unchanged; the rows are declared in ``catalog_schema``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, or_, select, update

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import RestoreRow


@dataclass(frozen=True)
class RestoreRecord:
    """A restored disk: ``mode`` is ``cow`` (qcow2 overlay whose backing file is the member) or ``full``."""

    set_id: str
    instance_name: str
    target: str
    path: str
    mode: str
    created_at: datetime
    instance_uuid: str | None = None
    id: int | None = None


class RestoreLog:
    """The ``restores`` table over a SqlCatalog's engine; kept apart so the Catalog port stays unchanged."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def add(self, records: Sequence[RestoreRecord]) -> None:
        with self._catalog._session("recording restored disks", write=True) as session:
            session.add_all(
                RestoreRow(
                    set_id=r.set_id,
                    instance_name=r.instance_name,
                    instance_uuid=r.instance_uuid,
                    target=r.target,
                    path=r.path,
                    mode=r.mode,
                    created_at=r.created_at,
                )
                for r in records
            )

    def bind_uuid(self, instance_name: str, instance_uuid: str) -> None:
        """Known only once libvirt has defined the instance, after the rows were written."""
        with self._catalog._session(f"recording the UUID of {instance_name}", write=True) as session:
            session.execute(
                update(RestoreRow)
                .where(RestoreRow.instance_name == instance_name, RestoreRow.instance_uuid.is_(None))
                .values(instance_uuid=instance_uuid)
            )

    def for_set(self, set_id: str) -> list[RestoreRecord]:
        query = select(RestoreRow).where(RestoreRow.set_id == set_id).order_by(RestoreRow.id)
        with self._catalog._session(f"listing restores of set {set_id}", write=False) as session:
            return [_restore_record(row) for row in session.scalars(query)]

    def for_instance(self, ref: str) -> list[RestoreRecord]:
        """By instance name or UUID."""
        query = (
            select(RestoreRow)
            .where(or_(RestoreRow.instance_name == ref, RestoreRow.instance_uuid == ref))
            .order_by(RestoreRow.id)
        )
        with self._catalog._session(f"listing restores of {ref}", write=False) as session:
            return [_restore_record(row) for row in session.scalars(query)]

    def all(self) -> list[RestoreRecord]:
        with self._catalog._session("listing restores", write=False) as session:
            return [_restore_record(row) for row in session.scalars(select(RestoreRow).order_by(RestoreRow.id))]

    def remove_instance(self, instance_name: str) -> None:
        with self._catalog._session(f"forgetting restores of {instance_name}", write=True) as session:
            session.execute(delete(RestoreRow).where(RestoreRow.instance_name == instance_name))

    def remove_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._catalog._session("forgetting restored disks", write=True) as session:
            session.execute(delete(RestoreRow).where(RestoreRow.id.in_(list(ids))))


def _restore_record(row: RestoreRow) -> RestoreRecord:
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
