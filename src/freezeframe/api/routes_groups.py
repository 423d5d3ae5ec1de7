"""``/v1/groups`` and ``/v1/group-sets``: consistency groups over the HTTP API (admin tokens only: a group may
span projects, and one point in time across them is an operator's decision).

A group snapshot is a job (``202`` + ``Location: /v1/jobs/{id}``) whose result names the group set; reads and
deletes answer directly. Bodies are checked by the same rules as the CLI's (``freezeframe.validation``).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from freezeframe.api.deps import PrincipalDep, StateDep, accepted, problems
from freezeframe.api.group_cluster import submit_group_snapshot
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.api.problems import conflict
from freezeframe.api.schemas import NAME_PATTERN, REF_PATTERN, UUID_PATTERN, ExportRequest, JobView, Metadata, Name
from freezeframe.group_flow import GroupRequest
from freezeframe.model import Consistency
from freezeframe.serialize_groups import group_set_summary, group_set_to_dict, group_to_dict

router = APIRouter(prefix="/v1", tags=["groups"])
GroupName = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=63, description="group name")]
GroupSetId = Annotated[str, PathParam(pattern=UUID_PATTERN, description="group set id")]
InstanceRef = Annotated[str, Field(pattern=REF_PATTERN, max_length=64)]


class GroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    instances: list[InstanceRef] = Field(default_factory=list, max_length=64)


class GroupInstances(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[InstanceRef] = Field(min_length=1, max_length=64)


class GroupSnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    consistency: Consistency = Consistency.FILESYSTEM
    require: bool = Field(default=False, description="fail the whole group set instead of letting a member fall back")
    metadata: Metadata = Field(default_factory=dict)


@router.get("/groups", responses=problems(403))
def list_groups(state: StateDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    principal.require_admin()
    return [group_to_dict(g) for g in state.service.groups.list_groups()]


@router.post("/groups", status_code=201, responses=problems(400, 403, 404))
def create_group(body: GroupCreate, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    principal.require_admin()
    return group_to_dict(state.service.groups.create(body.name, body.instances, state.inventory.instance))


@router.get("/groups/{name}", responses=problems(403, 404))
def get_group(name: GroupName, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    principal.require_admin()
    return group_to_dict(state.service.groups.show(name))


@router.post("/groups/{name}/instances", responses=problems(400, 403, 404))
def add_instances(name: GroupName, body: GroupInstances, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    principal.require_admin()
    return group_to_dict(state.service.groups.add(name, body.instances, state.inventory.instance))


@router.delete("/groups/{name}/instances/{instance}", responses=problems(400, 403, 404))
def remove_instance(
    name: GroupName,
    instance: Annotated[str, PathParam(pattern=REF_PATTERN, max_length=64)],
    state: StateDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    principal.require_admin()
    return group_to_dict(state.service.groups.remove(name, [instance]))


@router.delete("/groups/{name}", status_code=204, responses=problems(403, 404))
def delete_group(name: GroupName, state: StateDep, principal: PrincipalDep) -> Response:
    principal.require_admin()
    state.service.groups.delete(name)
    return Response(status_code=204)


@router.post(
    "/groups/{name}/snapshots", status_code=202, response_model=JobView, responses=problems(400, 403, 404, 409)
)
def snapshot_group(
    name: GroupName, body: GroupSnapshotCreate, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """Every instance of the group at one point in time, as one group set (a job; its result names the set)."""
    principal.require_admin()
    group = state.service.groups.show(name)
    if state.cluster is not None:
        job = submit_group_snapshot(state.cluster, group, body.model_dump(mode="json"), principal.token_id)
        return accepted(response, job)
    runner = state.require_runner()
    running = runner.active_job(f"group:{name}")
    if running is not None:
        raise conflict(f"job {running} is still snapshotting this group; wait for it to finish", job_id=running)
    group_set_id = str(uuid.uuid4())
    request = GroupRequest(name, body.consistency, body.require, name=body.name, metadata=dict(body.metadata),
                           group_set_id=group_set_id)  # fmt: skip
    spec = JobSpec(kind="groupsnapshot", lock_key=f"group:{group.name}", project=None,
                   request=body.model_dump(mode="json"), token_id=principal.token_id)  # fmt: skip

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("snapshotting")
        view = state.service.groups.snapshot(request, ctx.progress)
        g = view.group_set
        return {"group_set_id": g.id, "status": str(g.status), "consistency": str(g.achieved) if g.achieved else None,
                "set_ids": [s.id for s in view.sets]}  # fmt: skip

    return accepted(response, runner.submit(spec, run))


@router.post(
    "/group-sets/{group_set_id}/export",
    status_code=202,
    response_model=JobView,
    tags=["images"],
    responses=problems(400, 403, 404, 409),
)
def export_group_set(
    group_set_id: GroupSetId,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    body: Annotated[ExportRequest | None, Body()] = None,
) -> JobView:
    """Every set of the group set as ONE OVA image (an OVF VirtualSystemCollection) in the image store; the job's
    ``image_id`` names it (``GET /v1/images/{image_id}``)."""
    principal.require_admin()
    group_set = state.service.groups.usable(group_set_id).group_set
    runner = state.require_runner()
    request = body or ExportRequest()
    spec = JobSpec(kind="groupexport", lock_key=f"groupset:{group_set.id}", project=None,
                   request=request.model_dump(mode="json"), token_id=principal.token_id)  # fmt: skip

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("exporting")
        exported = state.portable.export_group_set_to_store(
            group_set.id, name=request.name, disk_format=request.disk_format, ovf_version=request.ovf_version,
            progress=ctx.progress, manifest_digest=request.manifest_digest,
        )  # fmt: skip
        image = exported.package.image
        assert image is not None
        state.owners.record(image.id, None, None)
        ctx.attach(image_id=image.id)
        return {"image_id": image.id, "size": exported.package.size, "set_ids": [s.set_id for s in exported.sets],
                "disk_format": exported.package.disk_format, "ovf_version": exported.package.ovf_version}  # fmt: skip

    return accepted(response, runner.submit(spec, run))


@router.get("/group-sets", responses=problems(403))
def list_group_sets(state: StateDep, principal: PrincipalDep, group: str | None = None) -> list[dict[str, Any]]:
    principal.require_admin()
    return [group_set_summary(g) for g in state.service.groups.list_sets(group)]


@router.get("/group-sets/{group_set_id}", responses=problems(403, 404))
def get_group_set(group_set_id: GroupSetId, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    """The group set with every one of its sets."""
    principal.require_admin()
    return group_set_to_dict(state.service.groups.show_set(group_set_id), hardware=False)


@router.delete("/group-sets/{group_set_id}", status_code=204, responses=problems(400, 403, 404, 409))
def delete_group_set(group_set_id: GroupSetId, state: StateDep, principal: PrincipalDep) -> Response:
    principal.require_admin()
    state.service.groups.delete_set(group_set_id)
    return Response(status_code=204)
