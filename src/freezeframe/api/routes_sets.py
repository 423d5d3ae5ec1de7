"""``/v1/snapshot-sets``: list, show and delete sets; restore, verify and export them as jobs."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import AwareDatetime, BaseModel

from freezeframe.api.access import Principal
from freezeframe.api.deps import Limit, PrincipalDep, SetId, StateDep, accepted, json_response, problems
from freezeframe.api.host_jobs import submit_restore_to_host, submit_to_members_host
from freezeframe.api.jobs import JobContext, JobRunner, JobSpec
from freezeframe.api.problems import conflict, invalid, redact
from freezeframe.api.schemas import (
    NAME_PATTERN,
    PROJECT_PATTERN,
    REF_PATTERN,
    ExportRequest,
    JobView,
    RestoreRequest,
    RevertRequest,
    SetDetail,
    SetPage,
    VerifyRequest,
)
from freezeframe.api.set_jobs import run_revert, run_verify
from freezeframe.api.state import AppState
from freezeframe.api.views import job_view, set_detail, set_view
from freezeframe.errors import InvalidRequest, SetHasDependants
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.set_query import Cursor, SetFilter
from freezeframe.validation import validate_metadata

router = APIRouter(prefix="/v1")
TAGS: list[str | Enum] = ["snapshot sets"]


def _metadata_filter(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` filters, held to the metadata rules (reserved ``freezeframe.*`` keys may be searched)."""
    wanted: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise invalid(f"metadata filter {item[:80]!r}: use KEY=VALUE")
        wanted[key] = value
    try:
        return validate_metadata(wanted, allow_reserved=True)
    except InvalidRequest as exc:
        raise invalid(f"metadata filter: {exc}") from None


@router.get("/snapshot-sets", response_model=SetPage, tags=TAGS, responses=problems(400))
def list_sets(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    instance: Annotated[str | None, Query(pattern=REF_PATTERN, max_length=64)] = None,
    status: SetStatus | None = None,
    backup_type: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    metadata: Annotated[
        list[str] | None,
        Query(description="KEY=VALUE; repeat for several (all must match)", max_length=16),
    ] = None,
    project: Annotated[str | None, Query(pattern=PROJECT_PATTERN, max_length=128)] = None,
    group: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    kind: Annotated[Literal["full", "incremental"] | None, Query()] = None,
    host: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    since: Annotated[AwareDatetime | None, Query(description="created at or after (ISO 8601 with zone)")] = None,
    until: Annotated[AwareDatetime | None, Query(description="created before (ISO 8601 with zone)")] = None,
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
    count: Annotated[bool, Query(description="also count every matching set (reads them all)")] = False,
) -> Response:
    """Newest first; filters combine, in the catalog's database; keyset pages: pass ``next_cursor`` (or follow
    ``next``) for the next page, null on the last one. ``total`` only with ``count=true``."""
    scope = principal.project if not principal.is_admin else project
    if not principal.is_admin and (principal.project is None or project not in (None, principal.project)):
        return json_response(SetPage(items=[], limit=limit, next_cursor=None, next=None, total=0 if count else None))
    try:
        after = Cursor.decode(cursor) if cursor is not None else None
        wanted = SetFilter(
            instance=instance, status=status, backup_type=backup_type, metadata=_metadata_filter(metadata or []),
            project=scope, project_instances=state.resolver.instances_of(scope) if scope else (), group=group,
            kind=kind, host=host, since=since, until=until,
        )  # fmt: skip
    except InvalidRequest as exc:
        raise invalid(str(exc)) from None
    catalog = state.service.catalog
    found = catalog.page_sets(wanted, limit, after)
    items = [set_view(s, state.resolver.of_set(s), principal.is_admin) for s in found.sets]
    link = None
    if found.next_cursor is not None:
        link = str(request.url.include_query_params(cursor=found.next_cursor).remove_query_params("count"))
    total = catalog.count_sets(wanted) if count else None
    return json_response(SetPage(items=items, limit=limit, next_cursor=found.next_cursor, next=link, total=total))


@router.get("/snapshot-sets/{set_id}", response_model=SetDetail, tags=TAGS, responses=problems(404))
def get_set(set_id: SetId, state: StateDep, principal: PrincipalDep) -> Response:
    """The set with its members (each member's metadata carries the set's UUID) and recorded hardware."""
    s, project = state.snapshot_set(set_id, principal)
    return json_response(set_detail(s, project, principal.is_admin))


def _set_job_guard(state: AppState, set_id: str) -> JobRunner:
    runner = state.require_runner()
    running = runner.active_job(f"set:{set_id}")
    if running is not None:
        raise conflict(f"job {running} is still running on this snapshot set; wait for it to finish", job_id=running)
    return runner


@router.delete(
    "/snapshot-sets/{set_id}",
    status_code=204,
    tags=TAGS,
    responses={**problems(403, 404, 409), 202: {"model": JobView, "description": "multi-host: queued on a host"}},
)
def delete_set(
    set_id: SetId,
    state: StateDep,
    principal: PrincipalDep,
    force: Annotated[bool, Query(description="flatten copy-on-write dependants first")] = False,
) -> Response:
    """Remove the set and its data; restored instances still on it are a 409 unless ``force``. In a multi-host
    deployment the agent of the host holding the members deletes it: 202 and the job."""
    if state.cluster is not None:
        job = submit_to_members_host(state, principal, set_id, "delete", {"force": force})
        response = json_response(job_view(job))
        response.status_code, response.headers["Location"] = 202, f"/v1/jobs/{job.id}"
        return response
    principal.require_write()
    s, _ = state.snapshot_set(set_id, principal)
    _set_job_guard(state, s.id)
    if s.status is SetStatus.CREATING:
        raise conflict(f"snapshot set {s.id} is still being created; wait for its job to finish")
    try:
        state.service.lifecycle.delete(s.id, force=force)
    except SetHasDependants as exc:
        names = sorted({d.instance_name for d in exc.dependants})
        raise conflict(
            f"snapshot set {s.id} is still the copy-on-write base of instance(s) {', '.join(names)}; delete with "
            "force=true to copy the data into them first, or remove those instances"
        ) from None
    return Response(status_code=204)


def _set_for_job(state: AppState, principal: Principal, set_id: str) -> tuple[SnapshotSet, str | None, JobRunner]:
    """A job that uses an available set: writers only, the set visible to them, no other job on it."""
    principal.require_write()
    s, project = state.snapshot_set(set_id, principal)
    if s.status is not SetStatus.AVAILABLE:
        raise conflict(f"snapshot set {s.id} is {s.status}; only available sets can be used for this")
    return s, project, _set_job_guard(state, s.id)


def _submit_set_job(
    response: Response,
    runner: JobRunner,
    principal: Principal,
    s: SnapshotSet,
    project: str | None,
    kind: str,
    request: BaseModel,
    run: Callable[[JobContext], dict[str, Any]],
) -> JobView:
    """Every job that works on one set: locked on the set, owned by the set's project."""
    spec = JobSpec(
        kind=kind, lock_key=f"set:{s.id}", project=project, request=request.model_dump(mode="json"),
        token_id=principal.token_id, instance_uuid=s.instance_uuid, instance_name=s.instance_name, set_id=s.id,
    )  # fmt: skip
    return accepted(response, runner.submit(spec, run))


@router.post(
    "/snapshot-sets/{set_id}/restore",
    status_code=202,
    response_model=JobView,
    tags=TAGS,
    responses=problems(400, 403, 404, 409, 413),
)
def restore_set(
    set_id: SetId, body: RestoreRequest, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """A new instance (in the set's project) from the set: copy-on-write over the members, or full copies."""
    if state.cluster is not None:
        return accepted(response, submit_restore_to_host(state, principal, set_id, body))
    if body.host is not None:
        raise InvalidRequest("host: only a multi-host deployment (serve --multi-host) restores onto another host")
    s, project, runner = _set_for_job(state, principal, set_id)
    state.require_free_name(body.name)

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("restoring")
        result = state.service.lifecycle.restore(s.id, body.name, start=body.start, full=body.full)
        if project is not None:
            state.projects.assign(result.uuid, result.name, project)
        return {
            "instance": {"name": result.name, "uuid": result.uuid},
            "mode": result.mode,
            "disks": [d.target for d in result.disks],
            "started": result.started,
            "left_out": {k: redact(v) for k, v in result.left_out.items()},
        }

    return _submit_set_job(response, runner, principal, s, project, "restore", body, run)


@router.post(
    "/snapshot-sets/{set_id}/verify",
    status_code=202,
    response_model=JobView,
    tags=TAGS,
    responses=problems(403, 404, 409, 413),
)
def verify_set(
    set_id: SetId,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    body: Annotated[VerifyRequest | None, Body()] = None,
) -> JobView:
    """Recompute every member's SHA-256 (``boot``: also boot a throw-away clone); the report is the result."""
    request = body or VerifyRequest()
    if state.cluster is not None:
        return accepted(response, submit_to_members_host(state, principal, set_id, "verify", request.model_dump()))
    s, project, runner = _set_for_job(state, principal, set_id)

    def run(ctx: JobContext) -> dict[str, Any]:
        return run_verify(state.service, ctx, s.id, boot=request.boot)

    return _submit_set_job(response, runner, principal, s, project, "verify", request, run)


@router.post(
    "/snapshot-sets/{set_id}/revert",
    status_code=202,
    response_model=JobView,
    tags=TAGS,
    responses=problems(403, 404, 409, 413),
)
def revert_set(
    set_id: SetId,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    body: Annotated[RevertRequest | None, Body()] = None,
) -> JobView:
    """Roll the shut-off instance back to the set, all disks together (a safety set of its state first)."""
    request = body or RevertRequest()
    if state.cluster is not None:
        return accepted(response, submit_to_members_host(state, principal, set_id, "revert", request.model_dump()))
    s, project, runner = _set_for_job(state, principal, set_id)
    spec = JobSpec(
        kind="revert", lock_key=f"instance:{s.instance_uuid}", project=project, request=request.model_dump(),
        token_id=principal.token_id, instance_uuid=s.instance_uuid, instance_name=s.instance_name, set_id=s.id,
    )  # fmt: skip
    if (running := runner.active_job(spec.lock_key)) is not None:
        raise conflict(f"job {running} is still running on this instance; wait for it to finish", job_id=running)
    return accepted(
        response, runner.submit(spec, lambda ctx: run_revert(state.service, ctx, s.id, safety=request.safety))
    )


@router.post(
    "/snapshot-sets/{set_id}/export",
    status_code=202,
    response_model=JobView,
    tags=["images"],
    responses=problems(403, 404, 409, 413),
)
def export_set(
    set_id: SetId,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    body: Annotated[ExportRequest | None, Body()] = None,
) -> JobView:
    """Package the set as an OVA image (``GET /v1/images/{image_id}``); the job's ``image_id`` names it."""
    s, project, runner = _set_for_job(state, principal, set_id)
    request = body or ExportRequest()

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("exporting")
        exported = state.portable.export_to_store(
            s.id,
            name=request.name,
            disk_format=request.disk_format,
            ovf_version=request.ovf_version,
            progress=ctx.progress,
            manifest_digest=request.manifest_digest,
        )
        assert exported.image is not None
        state.owners.record(exported.image.id, project, s.id)
        ctx.attach(image_id=exported.image.id)
        return {
            "image_id": exported.image.id,
            "size": exported.size,
            "disk_format": exported.disk_format,
            "ovf_version": exported.ovf_version,
            "disks": [d.target for d in exported.disks],
        }

    return _submit_set_job(response, runner, principal, s, project, "export", request, run)
