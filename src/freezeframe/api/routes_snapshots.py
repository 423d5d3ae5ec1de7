"""Taking sets: ``POST /v1/instances/{id}/snapshots`` and Nova's ``POST /v1/servers/{id}/action``.

The route checks who may ask and what was asked, assigns the set's id, and queues a job that hands the request
to ``freezeframe.ops.compute``; capture, recording and rotation are the service's.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Response

from freezeframe.adapters.service_store import Job
from freezeframe.api.access import Principal
from freezeframe.api.cluster import Inventory
from freezeframe.api.deps import InstanceId, PrincipalDep, StateDep, accepted, problems
from freezeframe.api.glance_results import GlancePublisher
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.api.problems import conflict, redact
from freezeframe.api.projects import JOB_KEY, PROJECT_KEY
from freezeframe.api.schemas import BackupAction, JobView, ServerAction, SnapshotCreate
from freezeframe.api.state import AppState
from freezeframe.model import Instance
from freezeframe.ops.compute import Order, Visible, check_order, image_exclusions, take
from freezeframe.service import Freezeframe

router = APIRouter(prefix="/v1", tags=["snapshots"])


def order_from_body(body: SnapshotCreate) -> Order:
    return Order(
        name=body.name,
        consistency=body.consistency,
        require=body.require,
        exclude_disks=tuple(body.exclude_disks),
        metadata=dict(body.metadata),
        backup_type=body.backup_type,
        rotation=body.rotation,
        pause=body.pause,
        mode=body.mode,
        max_chain=body.max_chain,
    )


def submit_snapshot(
    state: AppState, principal: Principal, instance: Instance, project: str | None, body: SnapshotCreate, kind: str
) -> Job:
    """Refuse what cannot succeed now (bad disks, a busy instance), then queue the job under a new set id."""
    return submit_order(state, principal, instance, project, order_from_body(body), body.model_dump(mode="json"), kind)


def submit_order(
    state: AppState,
    principal: Principal,
    instance: Instance,
    project: str | None,
    order: Order,
    request: dict[str, Any],
    kind: str,
    set_id: str | None = None,
    publisher: GlancePublisher | None = None,
) -> Job:
    """An already validated ``Order`` (``request``: what the client sent, kept in the job row) as a job."""
    check_order(instance, order)
    set_id = set_id or str(uuid.uuid4())
    spec = JobSpec(
        kind=kind, lock_key=f"instance:{instance.uuid}", project=project, request=request,
        token_id=principal.token_id, instance_uuid=instance.uuid, instance_name=instance.name, set_id=set_id,
    )  # fmt: skip
    if state.cluster is not None and isinstance(state.inventory, Inventory):
        return state.cluster.submit(spec, state.inventory.host_of(instance))
    runner = state.require_runner()
    running = runner.active_job(spec.lock_key)
    if running is not None:
        raise conflict(f"job {running} is still running on this instance; wait for it to finish", job_id=running)
    state.service.check_not_busy(instance.uuid)
    visible = state.visible_sets(principal)

    def run(ctx: JobContext) -> dict[str, Any]:
        return run_snapshot(state.service, ctx, instance, order, project, set_id, visible, publisher)

    return runner.submit(spec, run)


def run_snapshot(
    service: Freezeframe,
    ctx: JobContext,
    instance: Instance,
    order: Order,
    project: str | None,
    set_id: str,
    visible: Visible,
    publisher: GlancePublisher | None = None,
) -> dict[str, Any]:
    """The body of a snapshot job, wherever it runs (the service's workers, or the agent of the instance's host);
    with a ``publisher`` the set also becomes a Glance image."""
    metadata = {**order.metadata, JOB_KEY: ctx.id}
    if project is not None:
        metadata[PROJECT_KEY] = project
    ctx.phase("snapshotting")

    def progress(done: int, total: int) -> None:
        if ctx.job.phase != "copying":
            ctx.phase("copying")
        ctx.progress(done, total)

    published: dict[str, Any] = {}
    try:
        if publisher is not None:
            publisher.prepare()
        made = take(service, instance, replace(order, metadata=metadata), set_id=set_id, visible=visible,
                    progress=progress)  # fmt: skip
        if publisher is not None:
            ctx.phase("uploading")
            published = publisher.publish(made)
    except BaseException:
        if publisher is not None:
            publisher.discard()  # a failed request leaves no image behind, as Nova's
        raise
    return {
        **published,
        "set_id": made.snapshot_set.id,
        "status": str(made.snapshot_set.status),
        "consistency": str(made.snapshot_set.achieved) if made.snapshot_set.achieved else None,
        "rotated_out": made.rotated,
        "kept_in_use": {k: redact(v) for k, v in made.kept.items()},
    }


@router.post(
    "/instances/{instance_id}/snapshots",
    status_code=202,
    response_model=JobView,
    responses=problems(400, 403, 404, 409, 413),
)
def create_snapshot(
    instance_id: InstanceId, body: SnapshotCreate, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """Snapshot every disk of the instance as one set (createBackup semantics with backup_type + rotation)."""
    principal.require_write()
    instance, project, _ = state.instance(instance_id, principal)
    kind = "backup" if body.rotation is not None else "snapshot"
    return accepted(response, submit_snapshot(state, principal, instance, project, body, kind))


@router.post(
    "/servers/{server_id}/action",
    status_code=202,
    response_model=JobView,
    responses=problems(400, 403, 404, 409, 413),
)
def server_action(
    server_id: InstanceId, body: ServerAction, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """The OpenStack proposal's shapes: ``{"createBackup": {...}}`` or ``{"createImage": {..., "all_volumes"}}``."""
    principal.require_write()
    instance, project, _ = state.instance(server_id, principal)
    if isinstance(body, BackupAction):
        b = body.createBackup
        request = SnapshotCreate(name=b.name, metadata=b.metadata, backup_type=b.backup_type, rotation=b.rotation)
        kind = "backup"
    else:
        i = body.createImage
        excluded = list(image_exclusions(instance, i.all_volumes))
        request = SnapshotCreate(name=i.name, metadata=i.metadata, exclude_disks=excluded)
        kind = "snapshot"
    return accepted(response, submit_snapshot(state, principal, instance, project, request, kind))
