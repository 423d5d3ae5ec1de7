"""The job queue of a multi-host deployment: procrastinate on the catalog's PostgreSQL database.

A job is two rows written in ONE transaction: freezeframe's ``jobs`` row (what clients read: state, phase,
progress, result, error) plus its route, and procrastinate's queue row on the queue of the host that runs the
instance (``host.<name>``). Procrastinate gives the delivery guarantees: a queue row is fetched by one worker
only (``FOR UPDATE SKIP LOCKED``), ``lock`` (the instance's key) runs one job per instance at a time, and
``queueing_lock`` refuses a second waiting job for the same instance (``InstanceBusy`` here, 409 in the API).
Because the rows are written together, an accepted request always has a job and a job never lacks its queue row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import procrastinate
from procrastinate import exceptions as queue_errors
from procrastinate.schema import SchemaManager
from sqlalchemy.engine import Connection, make_url

from freezeframe.errors import CatalogError, InstanceBusy

RUN_JOB_TASK = "freezeframe.run_job"
REAP_TASK = "freezeframe.fail_jobs_of_down_hosts"
CONTROL_QUEUE = "control"
"""Every agent also serves this queue: the periodic reaper of jobs routed to hosts that went down."""
SCHEMA_LOCK = 0x66726565
"""pg_advisory_xact_lock key: one process at a time applies procrastinate's schema."""


def queue_of(host: str) -> str:
    return f"host.{host}"


def conninfo(catalog_url: str) -> str:
    """libpq's form of the catalog's SQLAlchemy URL (``postgresql+psycopg://`` -> ``postgresql://``)."""
    url = make_url(catalog_url)
    if url.get_backend_name() != "postgresql":
        raise CatalogError(
            f"a multi-host deployment needs its catalog on PostgreSQL (FREEZEFRAME_CATALOG_URL is {url.drivername})"
        )
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_schema(connection: Connection) -> None:
    """Procrastinate's tables, applied once per database (an advisory lock serialises concurrent starts)."""
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        cursor.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = cursor.fetchone()
        if row is not None and row[0]:
            return
    schema = SchemaManager.get_schema()
    with raw.cursor() as cursor:
        cursor.execute(schema)


class JobQueue:
    """The API's side: defer a job to a host's queue inside the caller's catalog transaction."""

    def __init__(self, catalog_url: str) -> None:
        self.app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=conninfo(catalog_url)))

    def defer(self, connection: Connection, *, job_id: str, host: str, lock_key: str) -> int:
        """Queue ``job_id`` on ``host``'s queue in ``connection``'s transaction; ``InstanceBusy`` if a job for
        the same instance is already waiting."""
        raw = connection.connection.driver_connection
        deferrer = self.app.configure_task(
            RUN_JOB_TASK, queue=queue_of(host), lock=lock_key, queueing_lock=lock_key, connection=raw
        )
        with _busy_as_conflict(lock_key):
            return deferrer.defer(job_id=job_id)

    def cancel(self, queue_job_id: int) -> bool:
        """Withdraw a job that no worker has fetched yet (True) - not one already running."""
        with self.opened():
            return self.app.job_manager.cancel_job_by_id(queue_job_id)

    @contextlib.contextmanager
    def opened(self) -> Iterator[procrastinate.App]:
        with self.app.open() as app:
            yield app


@contextlib.contextmanager
def _busy_as_conflict(lock_key: str) -> Iterator[None]:
    try:
        yield
    except queue_errors.AlreadyEnqueued:
        what = lock_key.split(":")[0]
        raise InstanceBusy(
            f"a job for this {what} is already waiting in its host's queue; wait for it to start"
        ) from None
    except queue_errors.ConnectorException as exc:
        raise CatalogError(f"the job queue did not take the job: {exc}") from exc
