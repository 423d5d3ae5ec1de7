"""The hosts of a multi-host deployment, as catalog rows: enrolment keys, heartbeats, what each host runs.

An admin enrols a host (``freezeframe hosts enroll NAME``: a key shown once, only its SHA-256 stored); the host's
agent presents that key on every registration and heartbeat, so an agent cannot speak for another host. Each
heartbeat carries the instances the host runs (name, UUID, state, hardware), which is how the stateless API finds
an instance by name or UUID on whichever host runs it without a libvirt connection of its own; a host whose
heartbeat is older than ``stale_after_s`` is ``down`` and gets no new jobs. Also here: the host each job was
routed to and the host whose repository holds each set's file members.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import HOSTS, JOB_ROUTES, SET_HOSTS, SETS
from freezeframe.errors import AgentNotAuthorized, HostNotFound, InstanceNotFound
from freezeframe.validation import validate_int, validate_name

UP, DOWN, STOPPED, ENROLLED = "up", "down", "stopped", "enrolled"
STALE_AFTER_S = 15
"""Three missed heartbeats (every 5 s): the host is down (``FREEZEFRAME_HOST_STALE_S`` changes it)."""
STALE_ENV = "FREEZEFRAME_HOST_STALE_S"
_DUMMY = hashlib.sha256(b"freezeframe: no such host").hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class HostRecord:
    name: str
    uri: str | None
    state: str
    """up (heartbeat fresh), down (stale), stopped (its agent signed off) or enrolled (never started)."""
    last_heartbeat: datetime | None
    instance_count: int
    free_bytes: int | None
    repository: str | None
    instances: list[dict[str, Any]]

    def runs(self, ref: str) -> dict[str, Any] | None:
        """The reported instance whose UUID or name is ``ref``."""
        for found in self.instances:
            if ref in (found.get("uuid"), found.get("name")):
                return found
        return None


class HostRegistry:
    """Rows of ``hosts``, ``job_routes`` and ``set_hosts``; each call its own short transaction."""

    def __init__(self, catalog: SqlCatalog, stale_after_s: float | None = None) -> None:
        self._catalog = catalog
        env = os.environ.get(STALE_ENV)
        from_env = validate_int(env, STALE_ENV, 2, 3600) if env else STALE_AFTER_S
        self.stale_after_s = float(from_env) if stale_after_s is None else stale_after_s

    # ---- enrolment and the agent's side ----------------------------------------------------------------

    def enroll(self, name: str) -> str:
        """A new key for host ``name`` (enrolling again replaces the old key); returns the key, shown once."""
        validate_name(name, "host name")
        key = f"ffh_{name}_{secrets.token_urlsafe(32)}"
        with self._catalog.connect(f"enrolling host {name}", write=True) as connection:
            where = HOSTS.c.name == name
            if connection.execute(update(HOSTS).where(where).values(key_sha256=_hash(key))).rowcount == 0:
                connection.execute(
                    insert(HOSTS).values(
                        name=name,
                        key_sha256=_hash(key),
                        state=ENROLLED,
                        instance_count=0,
                        instances=[],
                        enrolled_at=_now(),
                    )
                )
        return key

    def authenticate(self, name: str, key: str | None) -> None:
        """The key must be the one enrolled for ``name``; same cost whether the host exists or not."""
        with self._catalog.connect(f"authenticating the agent of {name}", write=False) as connection:
            stored = connection.scalar(select(HOSTS.c.key_sha256).where(HOSTS.c.name == name))
        matches = hmac.compare_digest(stored or _DUMMY, _hash(key or ""))
        if stored is None or not key or not matches:
            raise AgentNotAuthorized(
                f"the agent of host {name!r} is not authorized: FREEZEFRAME_AGENT_KEY must hold the key from "
                f"`freezeframe hosts enroll {name}`"
            )

    def heartbeat(
        self, name: str, key: str | None, *, uri: str, repository: str, free_bytes: int | None,
        instances: list[dict[str, Any]], agent_pid: int | None,
    ) -> None:  # fmt: skip
        """Register or refresh: the agent is up, runs these instances, has this much repository space."""
        self.authenticate(name, key)
        values = dict(
            uri=uri, state=UP, repository=repository, free_bytes=free_bytes, instance_count=len(instances),
            instances=instances, agent_pid=agent_pid, last_heartbeat=_now(),
        )  # fmt: skip
        with self._catalog.connect(f"heartbeat of host {name}", write=True) as connection:
            connection.execute(update(HOSTS).where(HOSTS.c.name == name).values(**values))

    def sign_off(self, name: str, key: str | None) -> None:
        self.authenticate(name, key)
        with self._catalog.connect(f"signing off host {name}", write=True) as connection:
            connection.execute(update(HOSTS).where(HOSTS.c.name == name).values(state=STOPPED))

    # ---- the API's side ------------------------------------------------------------------------------------

    def hosts(self) -> list[HostRecord]:
        with self._catalog.connect("listing hosts", write=False) as connection:
            rows = list(connection.execute(select(HOSTS).order_by(HOSTS.c.name)))
        now = _now()
        return [self._record(row, now) for row in rows]

    def _record(self, row: Any, now: datetime) -> HostRecord:
        beat: datetime | None = row.last_heartbeat
        if beat is not None and beat.tzinfo is None:
            beat = beat.replace(tzinfo=UTC)
        state = row.state
        if state == UP and (beat is None or now - beat > timedelta(seconds=self.stale_after_s)):
            state = DOWN
        return HostRecord(
            row.name, row.uri, state, beat, row.instance_count, row.free_bytes, row.repository, list(row.instances)
        )

    def host(self, name: str) -> HostRecord:
        for record in self.hosts():
            if record.name == name:
                return record
        raise HostNotFound(f"no host {name!r}; `freezeframe hosts list` shows the enrolled hosts")

    def locate(self, ref: str) -> tuple[HostRecord, dict[str, Any]]:
        """The host that runs instance ``ref`` (name or UUID): among several reports (a moved instance), the
        freshest heartbeat of a host that is up wins."""
        found = [(h, i) for h in self.hosts() if (i := h.runs(ref)) is not None]
        if not found:
            raise InstanceNotFound(f"no host runs an instance {ref!r}")
        epoch = datetime.min.replace(tzinfo=UTC)
        found.sort(key=lambda hi: (hi[0].state == UP, hi[0].last_heartbeat or epoch), reverse=True)
        return found[0]

    # ---- where jobs ran and where sets live ------------------------------------------------------------------

    def route(self, job_id: str, host: str, queue_job_id: int | None = None) -> None:
        with self._catalog.connect(f"routing job {job_id}", write=True) as connection:
            where = JOB_ROUTES.c.job_id == job_id
            if connection.execute(update(JOB_ROUTES).where(where).values(queue_job_id=queue_job_id)).rowcount == 0:
                connection.execute(insert(JOB_ROUTES).values(job_id=job_id, host=host, queue_job_id=queue_job_id))

    def job_route(self, job_id: str) -> tuple[str, int | None] | None:
        """(host, queue job id) of a routed job; None for a job of the embedded service."""
        with self._catalog.connect(f"reading the route of job {job_id}", write=False) as connection:
            row = connection.execute(select(JOB_ROUTES).where(JOB_ROUTES.c.job_id == job_id)).first()
            return None if row is None else (row.host, row.queue_job_id)

    def job_host(self, job_id: str) -> str | None:
        with self._catalog.connect(f"reading the host of job {job_id}", write=False) as connection:
            host: str | None = connection.scalar(select(JOB_ROUTES.c.host).where(JOB_ROUTES.c.job_id == job_id))
            return host

    def record_set(self, set_id: str, host: str) -> None:
        """Where the set's file members live, and the set row's ``host`` column that ``list --host`` filters on."""
        with self._catalog.connect(f"recording the host of set {set_id}", write=True) as connection:
            if connection.scalar(select(SET_HOSTS.c.host).where(SET_HOSTS.c.set_id == set_id)) is None:
                connection.execute(insert(SET_HOSTS).values(set_id=set_id, host=host))
            connection.execute(update(SETS).where(SETS.c.id == set_id).values(host=host))

    def forget_set(self, set_id: str) -> None:
        """The set was deleted: no host holds its members any more."""
        with self._catalog.connect(f"forgetting the host of set {set_id}", write=True) as connection:
            connection.execute(delete(SET_HOSTS).where(SET_HOSTS.c.set_id == set_id))

    def set_host(self, set_id: str) -> str | None:
        with self._catalog.connect(f"reading the host of set {set_id}", write=False) as connection:
            host: str | None = connection.scalar(select(SET_HOSTS.c.host).where(SET_HOSTS.c.set_id == set_id))
            return host
