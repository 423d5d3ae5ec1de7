"""``/v1/remotes`` (off-site copy targets; admin to change, any token to read) and
``POST /v1/snapshot-sets/{id}/copies`` (copy a set to a remote, as a job)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from freezeframe.api.deps import PrincipalDep, SetId, StateDep, accepted, problems
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.api.problems import conflict
from freezeframe.api.schemas import NAME_PATTERN, JobView
from freezeframe.model import SetStatus
from freezeframe.ports.remote import RemoteSpec

router = APIRouter(prefix="/v1")
TAGS: list[str | Enum] = ["remotes"]
RemoteName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63, description="remote name")]


class RemoteRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    url: str = Field(max_length=300, description="s3://BUCKET[/PREFIX]")
    endpoint: str | None = Field(default=None, max_length=300)
    region: str | None = Field(default=None, max_length=32)
    key_file: str | None = Field(default=None, max_length=4096, description="absolute path of a 32-byte key")


class RemoteView(BaseModel):
    name: str
    url: str
    endpoint: str | None
    region: str | None
    encrypted: bool
    sets: list[str] = []


class CopyRequest(BaseModel):
    remote: str = Field(pattern=NAME_PATTERN, max_length=63)


def remote_view(spec: RemoteSpec, sets: list[str] | None = None) -> RemoteView:
    return RemoteView(name=spec.name, url=spec.url, endpoint=spec.endpoint, region=spec.region,
                      encrypted=spec.encrypted, sets=sets or [])  # fmt: skip


@router.get("/remotes", response_model=list[RemoteView], tags=TAGS)
def list_remotes(state: StateDep, principal: PrincipalDep) -> list[RemoteView]:
    return [remote_view(s) for s in state.service.offsite.remotes()]


@router.post("/remotes", status_code=201, response_model=RemoteView, tags=TAGS, responses=problems(403, 409))
def add_remote(body: RemoteRequest, state: StateDep, principal: PrincipalDep) -> RemoteView:
    """Credentials are never part of a remote: the service's AWS environment/config supplies them."""
    principal.require_admin()
    spec = state.service.offsite.add_remote(body.name, body.url, body.endpoint, body.region, body.key_file)
    return remote_view(spec)


@router.get("/remotes/{name}", response_model=RemoteView, tags=TAGS, responses=problems(404))
def show_remote(name: RemoteName, state: StateDep, principal: PrincipalDep) -> RemoteView:
    offsite = state.service.offsite
    spec = offsite.remote(name)
    visible = {s.id for s in state.service.list_sets() if principal.sees(state.resolver.of_set(s))}
    return remote_view(spec, [c.set_id for c in offsite.copies() if c.remote == spec.name and c.set_id in visible])


@router.delete("/remotes/{name}", status_code=204, tags=TAGS, responses=problems(403, 404))
def remove_remote(name: RemoteName, state: StateDep, principal: PrincipalDep) -> Response:
    principal.require_admin()
    state.service.offsite.remove_remote(name)
    return Response(status_code=204)


@router.post(
    "/snapshot-sets/{set_id}/copies", status_code=202, response_model=JobView, tags=TAGS,
    responses=problems(403, 404, 409),
)  # fmt: skip
def copy_set(set_id: SetId, body: CopyRequest, response: Response, state: StateDep, principal: PrincipalDep) -> JobView:
    """Copy the set (and the sets it builds on) to the remote: only what is not there is sent."""
    principal.require_write()
    s, project = state.snapshot_set(set_id, principal)
    if s.status is not SetStatus.AVAILABLE:
        raise conflict(f"snapshot set {s.id} is {s.status}; only available sets are copied")
    state.service.offsite.remote(body.remote)

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("uploading")
        return state.service.offsite.copy(s.id, body.remote, ctx.progress).to_dict()

    spec = JobSpec(
        kind="copy", lock_key=f"set:{s.id}", project=project, request=body.model_dump(mode="json"),
        token_id=principal.token_id, instance_uuid=s.instance_uuid, instance_name=s.instance_name, set_id=s.id,
    )  # fmt: skip
    return accepted(response, state.require_runner().submit(spec, run))
