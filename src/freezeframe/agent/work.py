"""Run one job that the queue delivered to this host's agent, exactly once.

The queue (procrastinate) hands a job to one worker; the claim here (the ``jobs`` row goes queued -> running only
if it is still queued) makes a second delivery of the same job - a retry after a lost connection, a duplicate in
the queue - a logged no-op. The job then runs through the same boundary as in the embedded service
(``api.jobs.execute``): every outcome is recorded on the row clients read. An agent acts on its own host's
instances only: a job whose instance this host's libvirt does not run fails with ``WrongHost``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import Job, JobStore, ProjectMap
from freezeframe.agent.transfer import (
    RelocatedCatalog,
    backing_sets,
    discard_copies,
    relocated,
    transfer_members,
)
from freezeframe.api.group_cluster import GROUP_JOB_KINDS, run_group_job
from freezeframe.api.jobs import JobContext, execute
from freezeframe.api.projects import ProjectResolver
from freezeframe.api.routes_snapshots import order_from_body, run_snapshot
from freezeframe.api.schemas import RestoreRequest, SnapshotCreate
from freezeframe.errors import CatalogError, InstanceNotFound, InvalidRequest, WrongHost
from freezeframe.model import Instance, SnapshotSet
from freezeframe.service import Freezeframe

log = logging.getLogger("freezeframe.agent")

SNAPSHOT_KINDS = ("snapshot", "backup")
T = TypeVar("T")


@dataclass
class HostWork:
    """This host's name, its service (local libvirt, its repository) and the shared catalog's stores."""

    host: str
    service: Freezeframe
    registry: HostRegistry

    def __post_init__(self) -> None:
        self.store = SteadyJobStore(self.service.catalog)
        self.resolver = ProjectResolver(self.service, ProjectMap(self.service.catalog))

    def run(self, job_id: str) -> bool:
        """Claim and run ``job_id``; False when another delivery already claimed it (nothing is done)."""
        job = outlast_outage(lambda: self.store.claim(job_id, os.getpid()), f"claiming job {job_id}")
        if job is None:
            log.warning("job %s was delivered again but is no longer queued; not running it twice", job_id)
            return False
        routed = outlast_outage(lambda: self.registry.job_host(job_id), f"routing job {job_id}")
        if routed != self.host:
            fail = WrongHost(f"job {job_id} is routed to host {routed!r}, not to {self.host!r}; this agent refuses it")
            execute(self.store, job, _raise(fail))
            return True
        execute(self.store, job, self._body(job))
        return True

    def _body(self, job: Job) -> Callable[[JobContext], dict[str, Any]]:
        if job.kind in SNAPSHOT_KINDS:
            return lambda ctx: self._snapshot(ctx, job)
        if job.kind == "restore":
            return lambda ctx: self._restore(ctx, job)
        if job.kind in GROUP_JOB_KINDS:
            return lambda ctx: run_group_job(self.service, self.registry, self.host, ctx, job)
        return _raise(InvalidRequest(f"jobs of kind {job.kind!r} do not run on agents"))

    def own_instance(self, ref: str) -> Instance:
        """The instance if THIS host runs it; an agent never reaches another host's libvirt."""
        try:
            return self.service.instance(ref)
        except InstanceNotFound:
            raise WrongHost(f"instance {ref} does not run on host {self.host}; it was moved or removed") from None

    def _snapshot(self, ctx: JobContext, job: Job) -> dict[str, Any]:
        instance = self.own_instance(job.instance_uuid or "")
        order = order_from_body(SnapshotCreate.model_validate(job.request))
        set_id = job.set_id or ""
        project = job.project

        def visible(snapshot_set: SnapshotSet) -> bool:
            return project is None or self.resolver.of_set(snapshot_set) == project

        try:
            return run_snapshot(self.service, ctx, instance, order, project, set_id, visible)
        finally:
            if self.service.catalog.load_sets([set_id]):
                self.registry.record_set(set_id, self.host)

    def _restore(self, ctx: JobContext, job: Job) -> dict[str, Any]:
        """Restore here; members captured on another host are transferred (verified) into this repository first."""
        request = RestoreRequest.model_validate(job.request)
        snapshot_set = self.service.catalog.get_set(job.set_id or "")
        source = self.registry.set_host(snapshot_set.id)
        catalog: Any = self.service.catalog
        into = self.service.settings.repository_dir / "transferred"
        if source is not None and source != self.host:
            ctx.phase("transferring")
            for parent in backing_sets(snapshot_set, self.service.catalog.get_set):
                transfer_members(parent, into, ctx.progress)  # kept on failure: other restores may use them
            paths = transfer_members(snapshot_set, into, ctx.progress)
            catalog = RelocatedCatalog(catalog, relocated(snapshot_set, paths))
        ctx.phase("restoring")
        try:
            result = self.service.parts.restore_over(catalog).restore(
                snapshot_set.id, request.name, start=request.start, full=request.full
            )
        except BaseException:
            if catalog is not self.service.catalog:
                discard_copies(into, snapshot_set.id)
            raise
        if job.project is not None:
            ProjectMap(self.service.catalog).assign(result.uuid, result.name, job.project)
        return {
            "instance": {"name": result.name, "uuid": result.uuid},
            "host": self.host,
            "transferred_from": source if source != self.host else None,
            "mode": result.mode,
            "disks": [d.target for d in result.disks],
            "started": result.started,
        }


OUTAGE_S = 60.0
"""How long the agent keeps retrying a catalog write across a database restart before giving up."""


def outlast_outage(call: Callable[[], T], what: str, outage_s: float = OUTAGE_S) -> T:
    """``call`` again while the database is away (a PostgreSQL restart): a job's row must not be left behind."""
    deadline = time.monotonic() + outage_s
    while True:
        try:
            return call()
        except CatalogError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: the catalog is unavailable (%s); retrying", what, exc)
            time.sleep(0.5)


class SteadyJobStore(JobStore):
    """Job rows written through a database restart: every update is retried until the database is back."""

    def update(self, job_id: str, **values: Any) -> None:
        outlast_outage(lambda: JobStore.update(self, job_id, **values), f"updating job {job_id}")


def _raise(exc: Exception) -> Callable[[JobContext], dict[str, Any]]:
    def fail(ctx: JobContext) -> dict[str, Any]:
        raise exc

    return fail
