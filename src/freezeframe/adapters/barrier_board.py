"""The barrier board of group snapshots across hosts, in the shared catalog (PostgreSQL in a multi-host deployment).

Two small tables: one row per (group set, host, phase) reached, and the first abort of a group set. Both writes
are ``INSERT .. ON CONFLICT DO NOTHING``, so arriving twice is harmless and the first abort's reason is the one
every host reads. The job queue still delivers the shares (procrastinate); this board only lets them meet.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, delete, select
from sqlalchemy.engine import Connection

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import GROUP_BARRIER_ABORTS, GROUP_BARRIER_ARRIVALS
from freezeframe.ports.barrier import BarrierState


class SqlBarrierBoard:
    def __init__(self, catalog: SqlCatalog) -> None:
        self.catalog = catalog

    def arrive(self, group_set_id: str, host: str, phase: str) -> None:
        with self.catalog.connect(f"group set {group_set_id}: {host} reached {phase}", write=True) as connection:
            _insert_once(connection, GROUP_BARRIER_ARRIVALS, group_set_id=group_set_id, host=host, phase=phase,
                         arrived_at=datetime.now(UTC))  # fmt: skip

    def abort(self, group_set_id: str, host: str, reason: str) -> None:
        with self.catalog.connect(f"group set {group_set_id}: {host} aborts", write=True) as connection:
            _insert_once(connection, GROUP_BARRIER_ABORTS, group_set_id=group_set_id, host=host, reason=reason,
                         aborted_at=datetime.now(UTC))  # fmt: skip

    def state(self, group_set_id: str) -> BarrierState:
        arrivals, aborts = GROUP_BARRIER_ARRIVALS.c, GROUP_BARRIER_ABORTS.c
        with self.catalog.connect(f"reading the barrier of group set {group_set_id}", write=False) as connection:
            rows = connection.execute(
                select(arrivals.phase, arrivals.host).where(arrivals.group_set_id == group_set_id)
            )
            arrived: dict[str, set[str]] = {}
            for phase, host in rows:
                arrived.setdefault(str(phase), set()).add(str(host))
            abort = connection.execute(
                select(aborts.host, aborts.reason).where(aborts.group_set_id == group_set_id)
            ).first()
        return BarrierState(
            {p: frozenset(h) for p, h in arrived.items()},
            abort.host if abort else None,
            abort.reason if abort else None,
        )

    def forget(self, group_set_id: str) -> None:
        with self.catalog.connect(f"dropping the barrier of group set {group_set_id}", write=True) as connection:
            for table in (GROUP_BARRIER_ARRIVALS, GROUP_BARRIER_ABORTS):
                connection.execute(delete(table).where(table.c.group_set_id == group_set_id))


def _insert_once(connection: Connection, table: Table, **values: Any) -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    if connection.dialect.name == "postgresql":
        connection.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing())
    else:
        connection.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing())
