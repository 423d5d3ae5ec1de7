"""The API's side of a multi-host deployment (``freezeframe serve --multi-host``): stateless, several replicas.

The API holds no libvirt connection and runs no job itself. It finds instances in what the agents report
(``Inventory``, over the host registry), and turns each accepted request into a job row, its route and a queue
row on the instance's host's queue - in one catalog transaction (``ClusterJobs.submit``), so two replicas
accepting requests at the same time never lose or duplicate one. A host that is down refuses new jobs at once
(``HostUnavailable``, 503).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, insert, select

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import JOB_ROUTES, JOBS
from freezeframe.adapters.host_registry import UP, HostRecord, HostRegistry
from freezeframe.adapters.job_queue import JobQueue, ensure_schema
from freezeframe.adapters.service_store import QUEUED, RUNNING, Job
from freezeframe.agent.inventory import instance_from_record
from freezeframe.api.jobs import JobSpec
from freezeframe.errors import HostUnavailable, InstanceBusy, InstanceNotFound, InvalidRequest
from freezeframe.model import Instance, SnapshotSet


class Inventory:
    """Instances as the hosts last reported them: what ``ProjectResolver`` and the routes look up."""

    def __init__(self, registry: HostRegistry) -> None:
        self.registry = registry

    def instances(self) -> list[Instance]:
        seen: dict[str, Instance] = {}
        for host in self.registry.hosts():
            for record in host.instances:
                uuid_ = str(record.get("uuid"))
                if uuid_ not in seen or host.state == UP:
                    seen[uuid_] = instance_from_record(record)
        return sorted(seen.values(), key=lambda i: (i.name, i.uuid))

    def instance(self, ref: str) -> Instance:
        return instance_from_record(self.registry.locate(ref)[1])

    def host_of(self, instance: Instance) -> HostRecord:
        try:
            return self.registry.locate(instance.uuid)[0]
        except InstanceNotFound:
            raise HostUnavailable(f"no host reports instance {instance.name} any more") from None


def _unfinished(lock_key: str) -> ColumnElement[bool]:
    return (JOBS.c.lock_key == lock_key) & JOBS.c.state.in_([QUEUED, RUNNING])


class ClusterJobs:
    """Accept jobs for agents: refuse a busy instance or a down host, else record + route + queue at once."""

    def __init__(self, catalog: SqlCatalog, catalog_url: str, registry: HostRegistry) -> None:
        self.catalog = catalog
        self.registry = registry
        self.queue = JobQueue(catalog_url)
        with catalog.connect("preparing the job queue", write=True) as connection:
            ensure_schema(connection)

    def submit(self, spec: JobSpec, host: HostRecord) -> Job:
        if host.state != UP:
            raise HostUnavailable(
                f"host {host.name}, which runs this instance, is {host.state} (last heartbeat "
                f"{host.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC); retry when its agent is back"
                if host.last_heartbeat
                else f"host {host.name}, which runs this instance, has no running agent"
            )
        job = Job(
            id=str(uuid.uuid4()), kind=spec.kind, state=QUEUED, project=spec.project, lock_key=spec.lock_key,
            request=spec.request, created_at=datetime.now(UTC), instance_uuid=spec.instance_uuid,
            instance_name=spec.instance_name, set_id=spec.set_id, image_id=spec.image_id, token_id=spec.token_id,
            server_pid=os.getpid(),
        )  # fmt: skip
        with self.catalog.connect(f"queueing job {job.id} on host {host.name}", write=True) as connection:
            # Replicas accepting requests for one instance take turns here (until commit): the check below then
            # sees every job the others accepted, whether or not a worker has fetched it yet.
            connection.execute(select(func.pg_advisory_xact_lock(func.hashtext(spec.lock_key))))
            running = connection.scalar(select(JOBS.c.id).where(_unfinished(spec.lock_key)).limit(1))
            if running is not None:
                what = spec.lock_key.split(":")[0]
                raise InstanceBusy(f"job {running} is still running on this {what}; wait for it to finish")
            connection.execute(insert(JOBS).values(**{**vars(job), "request": dict(job.request)}))
            queue_job_id = self.queue.defer(connection, job_id=job.id, host=host.name, lock_key=spec.lock_key)
            connection.execute(insert(JOB_ROUTES).values(job_id=job.id, host=host.name, queue_job_id=queue_job_id))
        return job

    def submit_restore(
        self, snapshot_set: SnapshotSet, request: dict[str, Any], *, project: str | None, token_id: str | None
    ) -> Job:
        """A restore on ``request["host"]`` (default: the host holding the members), locked on the set."""
        host = request.get("host") or self.registry.set_host(snapshot_set.id)
        if host is None:
            raise InvalidRequest(f"set {snapshot_set.id} was not captured by an agent: say which host restores it")
        return self.submit_on_set("restore", snapshot_set, request, host, project=project, token_id=token_id)

    def members_host(self, snapshot_set: SnapshotSet) -> str:
        """The host whose repository holds the set's members: where verify, revert and delete run."""
        host = self.registry.set_host(snapshot_set.id)
        if host is None:
            raise InvalidRequest(
                f"set {snapshot_set.id} was not captured by an agent, so no host holds its members; "
                "work on it with the freezeframe that made it"
            )
        return host

    def submit_on_set(
        self, kind: str, snapshot_set: SnapshotSet, request: dict[str, Any], host: str, *,
        project: str | None, token_id: str | None, lock_key: str | None = None,
    ) -> Job:  # fmt: skip
        """A job of ``kind`` on the set, run by ``host``'s agent; locked on the set unless ``lock_key`` says."""
        spec = JobSpec(
            kind=kind, lock_key=lock_key or f"set:{snapshot_set.id}", project=project, request=request,
            token_id=token_id, instance_uuid=snapshot_set.instance_uuid, instance_name=snapshot_set.instance_name,
            set_id=snapshot_set.id,
        )  # fmt: skip
        return self.submit(spec, self.registry.host(str(host)))
