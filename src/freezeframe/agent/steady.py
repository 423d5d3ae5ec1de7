"""The agent's catalog writes outlast a PostgreSQL restart: no set or job row is left half-way by a short outage.

A snapshot records its set twice: ``creating`` before the guest is touched, then ``available`` (or ``failed``)
in ONE transaction (``SqlCatalog.update_set`` rewrites the row, its members and metadata together). If the
database is away at that moment the flow's write fails, its clean-up write fails as well, and the row would
stay ``creating`` for ever. Here every such write is retried with backoff while the failure is a lost
connection, for at most ``OUTAGE_S``; past that it fails clearly (and ``reconcile`` fails the set later).
Retrying is safe: a set or job update rewrites whole values, and a retried insert that finds the row it
inserted itself (the commit went through, its acknowledgement was lost) is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, TypeVar

from sqlalchemy import exc as sa_errors

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.service_store import RUNNING, Job, JobStore
from freezeframe.errors import CatalogError, SetNotFound
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.wiring import Wiring

log = logging.getLogger("freezeframe.agent")

T = TypeVar("T")

OUTAGE_S = 60.0
"""How long the agent keeps retrying a catalog call across a database restart before giving up."""
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.2, 2.0


def connection_lost(error: CatalogError) -> bool:
    """A failure that a reconnect can cure (server restarting, connection cut), not a refused statement."""
    cause = error.__cause__
    if isinstance(cause, sa_errors.DBAPIError) and cause.connection_invalidated:
        return True
    return isinstance(cause, sa_errors.OperationalError | sa_errors.InterfaceError)


def outlast_outage(call: Callable[[], T], what: str, outage_s: float = OUTAGE_S) -> T:
    """``call`` again, with backoff, while the catalog's database is unreachable, for at most ``outage_s``."""
    deadline = time.monotonic() + outage_s
    pause = FIRST_PAUSE_S
    while True:
        try:
            return call()
        except CatalogError as error:
            if not connection_lost(error):
                raise
            if time.monotonic() + pause > deadline:
                raise CatalogError(
                    f"the catalog stayed unreachable for over {outage_s:.0f} s while {what}: {error}"
                ) from error
            log.warning("%s: the catalog is unavailable (%s); retrying in %.1f s", what, error, pause)
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_S)


class SteadyJobStore(JobStore):
    """Job rows written through a database restart: every claim and update is retried until the database is back."""

    def claim(self, job_id: str, server_pid: int) -> Job | None:
        attempts = 0

        def claim() -> Job | None:
            nonlocal attempts
            attempts += 1
            job = JobStore.claim(self, job_id, server_pid)
            if job is None and attempts > 1:
                mine = JobStore.get(self, job_id)
                if mine.state == RUNNING and mine.server_pid == server_pid:
                    return mine  # the first attempt's claim committed; only its answer was lost
            return job

        return outlast_outage(claim, f"claiming job {job_id}")

    def update(self, job_id: str, **values: Any) -> None:
        outlast_outage(lambda: JobStore.update(self, job_id, **values), f"updating job {job_id}")


class SteadyCatalog(SqlCatalog):
    """The catalog the agent's flow and operations use: the Catalog port's calls outlast an outage."""

    def add_set(self, snapshot_set: SnapshotSet) -> None:
        attempts = 0

        def add() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and SqlCatalog.load_sets(self, [snapshot_set.id]):
                return  # the first attempt committed; only its answer was lost
            SqlCatalog.add_set(self, snapshot_set)

        outlast_outage(add, f"recording set {snapshot_set.id}")

    def update_set(self, snapshot_set: SnapshotSet) -> None:
        what = f"recording set {snapshot_set.id} as {snapshot_set.status}"
        outlast_outage(lambda: SqlCatalog.update_set(self, snapshot_set), what)

    def delete_set(self, set_id: str) -> None:
        attempts = 0

        def delete() -> None:
            nonlocal attempts
            attempts += 1
            try:
                SqlCatalog.delete_set(self, set_id)
            except SetNotFound:
                if attempts == 1:
                    raise  # a retry that finds nothing: the first attempt's delete committed

        outlast_outage(delete, f"deleting set {set_id}")

    def load_sets(self, ids: Sequence[str]) -> list[SnapshotSet]:
        return outlast_outage(lambda: SqlCatalog.load_sets(self, ids), "reading sets")

    def list_sets(
        self,
        instance: str | None = None,
        status: SetStatus | None = None,
        backup_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SnapshotSet]:
        return outlast_outage(
            lambda: SqlCatalog.list_sets(self, instance, status, backup_type, metadata), "listing sets"
        )


class AgentWiring(Wiring):
    """The agent's objects: as the embedded service's, over a catalog that outlasts a database restart."""

    @cached_property
    def catalog(self) -> SqlCatalog:
        return SteadyCatalog(self.settings.catalog_url)
