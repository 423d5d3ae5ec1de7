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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import Job, ProjectMap
from freezeframe.agent.steady import SteadyJobStore, outlast_outage
from freezeframe.agent.transfer import (
    RelocatedCatalog,
    backing_sets,
    discard_copies,
    relocated,
    transfer_members,
)
from freezeframe.api.group_cluster import GROUP_JOB_KINDS, run_group_job
from freezeframe.api.jobs import JobContext, execute
from freezeframe.api.policy_cluster import run_on_host
from freezeframe.api.projects import ProjectResolver
from freezeframe.api.routes_snapshots import order_from_body, run_snapshot
from freezeframe.api.schemas import RestoreRequest, SnapshotCreate
from freezeframe.api.set_jobs import ON_MEMBERS_HOST, run_delete, run_revert, run_verify
from freezeframe.errors import InstanceNotFound, InvalidRequest, WrongHost
from freezeframe.model import Instance, SnapshotSet
from freezeframe.scheduling import JOB_KIND as POLICY_JOB
from freezeframe.service import Freezeframe

log = logging.getLogger("freezeframe.agent")

SNAPSHOT_KINDS = ("snapshot", "backup")


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
        job = self.store.claim(job_id, os.getpid())
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
        if job.kind in ON_MEMBERS_HOST:
            return lambda ctx: self._on_members(ctx, job)
        if job.kind == POLICY_JOB:
            return lambda ctx: run_on_host(self.service, self.registry, self.host, ctx, job)
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
                outlast_outage(lambda: self.registry.record_set(set_id, self.host), f"recording the host of {set_id}")

    def _on_members(self, ctx: JobContext, job: Job) -> dict[str, Any]:
        """Verify, revert or delete a set whose members this host's repository holds (the same bodies as the
        embedded service's jobs); a revert also needs the instance here."""
        set_id, request = job.set_id or "", job.request
        holder = self.registry.set_host(set_id)
        if holder != self.host:
            raise WrongHost(f"the members of set {set_id} are on host {holder!r}, not on {self.host!r}; refused")
        if job.kind == "verify":
            return run_verify(self.service, ctx, set_id, boot=bool(request.get("boot", False)))
        if job.kind == "delete":
            deleted = run_delete(self.service, ctx, set_id, force=bool(request.get("force", False)))
            outlast_outage(lambda: self.registry.forget_set(set_id), f"forgetting where set {set_id} was")
            return deleted
        self.own_instance(job.instance_uuid or "")
        reverted = run_revert(self.service, ctx, set_id, safety=bool(request.get("safety", True)))
        if (safety := reverted["safety_set_id"]) is not None:
            outlast_outage(lambda: self.registry.record_set(safety, self.host), f"recording the host of {safety}")
        return reverted

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


def _raise(exc: Exception) -> Callable[[JobContext], dict[str, Any]]:
    def fail(ctx: JobContext) -> dict[str, Any]:
        raise exc

    return fail
