"""The FastAPI application: ``/v1`` routes over ``Freezeframe`` and ``Lifecycle``, jobs, access control.

Routes are plain ``def`` functions (FastAPI runs them in its thread pool) because everything below them blocks:
SQLite, libvirt, qemu-img. Long operations become jobs (``202`` + ``Location: /v1/jobs/{id}``); reads and
deletes answer directly. ``create_app`` builds the app; its lifespan opens the service, takes the per-home
service lock, repairs what a killed predecessor left, and starts the job workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import libvirt
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from freezeframe import __version__
from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.image_store import StoredImage
from freezeframe.adapters.service_store import FAILED, ImageOwners, Job, JobStore, ProjectMap, SetReader, TokenStore
from freezeframe.api.access import JOB_KEY, PROJECT_KEY, Principal, ProjectResolver, project_from_domain_xml
from freezeframe.api.jobs import JobContext, JobRunner, JobSpec, recover
from freezeframe.api.problems import (
    PROBLEM_JSON,
    TYPE_BASE,
    ApiProblem,
    BodyLimit,
    conflict,
    handle_api_problem,
    handle_freezeframe_error,
    handle_http_exception,
    handle_unexpected,
    handle_validation_error,
    log,
    not_found,
    redact,
    unauthorized,
)
from freezeframe.api.schemas import (
    META_KEY_PATTERN,
    NAME_PATTERN,
    PROJECT_PATTERN,
    REF_PATTERN,
    UUID_PATTERN,
    BackupAction,
    ConsistencyView,
    DiskView,
    ExportRequest,
    HardwareView,
    Health,
    ImageMachine,
    ImagePage,
    ImageView,
    ImportRequest,
    InstanceRef,
    InstanceView,
    JobError,
    JobPage,
    JobView,
    MemberView,
    NicView,
    Problem,
    ProgressView,
    ProjectAssign,
    ProjectView,
    RestoreRequest,
    ServerAction,
    SetDetail,
    SetPage,
    SetView,
    SnapshotCreate,
    VerifyRequest,
)
from freezeframe.config import Settings
from freezeframe.errors import (
    FreezeframeError,
    HypervisorError,
    ImageNotFound,
    InstanceBusy,
    InstanceNotFound,
    JobNotFound,
    NotFound,
    SetHasDependants,
)
from freezeframe.flow import SnapshotRequest
from freezeframe.model import DiskSpec, Hardware, Instance, SetStatus, SnapshotSet
from freezeframe.service import Freezeframe

MAX_BODY_BYTES = 64 * 1024
_UUID_RE = re.compile(UUID_PATTERN)
_SLUGS: dict[str, tuple[int, str]] = {
    "not-found": (404, "Not found"),
    "busy": (409, "Busy"),
    "conflict": (409, "Conflict"),
    "consistency-unavailable": (409, "Consistency level not reachable"),
    "preflight-failed": (409, "Preflight check failed"),
    "invalid-request": (400, "Invalid request"),
    "hypervisor-error": (502, "Hypervisor error"),
    "catalog-unavailable": (503, "Catalog unavailable"),
    "operation-failed": (500, "Operation failed"),
    "interrupted": (500, "Interrupted"),
    "internal-error": (500, "Internal error"),
}
T = TypeVar("T")


@dataclass(frozen=True)
class ApiConfig:
    settings: Settings
    workers: int = 2
    """Jobs running at the same time (each snapshot also holds its instance's lock)."""
    max_body_bytes: int = MAX_BODY_BYTES
    shutdown_grace_s: float = 60.0
    """How long a stop waits for running jobs (longer than the freeze cap, so no guest stays frozen)."""


# ---- the state behind the routes ---------------------------------------------------------------------------


class AppState:
    """One ``Freezeframe`` for the process (catalog engine and libvirt connection are thread-safe)."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self.service = Freezeframe(config.settings)
        self.lifecycle = self.service.lifecycle
        catalog = self.service.catalog
        self.jobs = JobStore(catalog)
        self.tokens = TokenStore(catalog)
        self.projects = ProjectMap(catalog)
        self.portable = self.service.portable
        self.owners = ImageOwners(catalog)
        self.sets = SetReader(catalog)
        self.resolver = ProjectResolver(self.service, self.projects)
        self.runner: JobRunner | None = None
        self._lock_fd: int | None = None

    # ---- start and stop ------------------------------------------------------------------------------

    def start(self) -> None:
        """Service lock, repair, recovery of interrupted jobs, then workers: in that order, before serving."""
        self._take_service_lock()
        reports: list[str] = []
        repair_error: str | None = None
        if self.service.journal.pending():
            try:
                reports += self.service.repair()  # the journal (thaw, abort, fail the set), then lifecycle markers
            except FreezeframeError as exc:
                repair_error = str(exc)
                log.error("repair at start-up failed; run `freezeframe repair` once libvirt answers: %s", exc)
        else:
            try:
                reports += self.lifecycle.repair()
            except FreezeframeError as exc:
                log.warning("lifecycle repair at start-up failed (`freezeframe repair` retries it): %s", exc)
        try:
            reports += self.portable.repair()
        except FreezeframeError as exc:
            log.warning("image store repair at start-up failed: %s", exc)
        for line in reports:
            log.warning("repair at start-up: %s", line)
        for job in recover(self.jobs, reports, repair_error):
            log.warning("job %s (%s) was interrupted by the previous stop; marked failed", job.id, job.kind)
            self._link_interrupted_set(job)
        self._warm_hypervisor()
        self.runner = JobRunner(self.jobs, self.config.workers)

    def _take_service_lock(self) -> None:
        path = self.config.settings.home / "service.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() or "unknown"
            raise InstanceBusy(
                f"another freezeframe service (pid {holder}) already serves {self.config.settings.home}; "
                "stop it first or give this one another --home"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _link_interrupted_set(self, job: Job) -> None:
        """A snapshot cut short before its copy started has not told its job the set id yet: look it up."""
        if job.set_id is None and job.instance_uuid is not None:
            made = self.service.catalog.list_sets(instance=job.instance_uuid, metadata={JOB_KEY: job.id})
            if made:
                self.jobs.update(job.id, set_id=made[0].id)

    def _warm_hypervisor(self) -> None:
        """Connect now so worker threads never race to open the connection; a later call retries if down."""
        try:
            _ = self.service.hypervisor
        except HypervisorError as exc:
            log.warning("libvirt is not reachable yet (%s); instance calls answer 502 until it is", exc)

    def close(self) -> None:
        try:
            if self.runner is not None:
                left = self.runner.shutdown(self.config.shutdown_grace_s)
                if left:
                    log.warning("stopping with jobs still running (%s); the next start repairs them", ", ".join(left))
        finally:
            try:
                self.service.close()
            finally:
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    # ---- lookups with visibility ----------------------------------------------------------------------

    def require_runner(self) -> JobRunner:
        if self.runner is None:
            raise conflict("the service is starting or stopping; retry in a moment")
        return self.runner

    def visible_instances(self, principal: Principal) -> list[tuple[Instance, str | None]]:
        """The domains this token may see, read in full only once they are known to be visible.

        Domains that vanish while they are read (other users' instances come and go) are skipped.
        """
        hypervisor = self.service.hypervisor
        try:
            domains = hypervisor.conn.listAllDomains()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"listing domains failed: {exc.get_error_message()}") from exc
        mapping = self.resolver.mapping_snapshot()
        found = []
        for dom in domains:
            try:
                uuid_ = str(dom.UUIDString())
                project = mapping.get(uuid_) or project_from_domain_xml(dom.XMLDesc(0))
                if principal.sees(project):
                    found.append((hypervisor.lookup(uuid_), project))
            except (NotFound, libvirt.libvirtError):
                continue
            except HypervisorError as exc:
                log.warning("skipping a domain that could not be read: %s", exc)
        return found

    def instance(self, ref: str, principal: Principal) -> tuple[Instance, str | None, str]:
        if len(ref) == 36 and ref.count("-") == 4 and not _UUID_RE.match(ref.lower()):
            raise not_found(f"instance {ref!r}")
        try:
            instance = self.service.hypervisor.lookup(ref.lower() if _UUID_RE.match(ref.lower()) else ref)
        except InstanceNotFound:
            raise not_found(f"instance {ref!r}") from None
        project, source = self.resolver.of_instance(instance)
        if not principal.sees(project):
            raise not_found(f"instance {ref!r}")
        return instance, project, source

    def snapshot_set(self, set_id: str, principal: Principal) -> tuple[SnapshotSet, str | None]:
        found = self.sets.load([set_id])
        if not found:
            raise not_found(f"snapshot set {set_id}")
        snapshot_set = found[0]
        project = self.resolver.of_set(snapshot_set)
        if not principal.sees(project):
            raise not_found(f"snapshot set {set_id}")
        return snapshot_set, project

    def job(self, job_id: str, principal: Principal) -> Job:
        try:
            job = self.jobs.get(job_id)
        except JobNotFound:
            raise not_found(f"job {job_id}") from None
        if not principal.sees(job.project):
            raise not_found(f"job {job_id}")
        return job

    def image_project(self, image: StoredImage, owners: dict[str, str | None] | None = None) -> str | None:
        """Recorded at export by the service; an image the CLI exported follows its source set, if still there."""
        owners = self.owners.all() if owners is None else owners
        if image.id in owners:
            return owners[image.id]
        if image.source_set_id:
            found = self.sets.load([image.source_set_id])
            if found:
                return self.resolver.of_set(found[0])
        return None

    def image(self, image_id: str, principal: Principal) -> tuple[StoredImage, str | None]:
        try:
            image = self.portable.image(image_id)
        except ImageNotFound:
            raise not_found(f"image {image_id}") from None
        project = self.image_project(image)
        if image.id != image_id or not principal.sees(project):
            raise not_found(f"image {image_id}")
        return image, project


def _now() -> datetime:
    return datetime.now(UTC)


# ---- views ---------------------------------------------------------------------------------------------------


def _disk_view(d: DiskSpec, admin: bool) -> DiskView:
    return DiskView(
        target=d.target, device=d.device, bus=d.bus, format=d.format, size=d.virtual_size,
        readonly=d.readonly, shareable=d.shareable, source=d.source_path if admin else None,
    )  # fmt: skip


def instance_view(instance: Instance, project: str | None, admin: bool) -> InstanceView:
    return InstanceView(
        name=instance.name,
        uuid=instance.uuid,
        state=instance.state,
        project=project,
        vcpus=instance.hardware.vcpus,
        memory_kib=instance.hardware.memory_kib,
        disks=[_disk_view(d, admin) for d in instance.hardware.disks],
    )


def _hardware_view(hw: Hardware, admin: bool) -> HardwareView:
    return HardwareView(
        vcpus=hw.vcpus,
        memory_kib=hw.memory_kib,
        arch=hw.arch,
        machine=hw.machine,
        firmware=hw.boot.firmware,
        disks=[_disk_view(d, admin) for d in hw.disks],
        nics=[NicView(model=n.model, source_type=n.source_type, source=n.source) for n in hw.nics],
    )


def set_view(s: SnapshotSet, project: str | None, admin: bool) -> SetView:
    return SetView(**_set_fields(s, project, admin))


def set_detail(s: SnapshotSet, project: str | None, admin: bool) -> SetDetail:
    return SetDetail(**_set_fields(s, project, admin), hardware=_hardware_view(s.hardware, admin))


def _set_fields(s: SnapshotSet, project: str | None, admin: bool) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "status": s.status,
        "project": project,
        "instance": InstanceRef(name=s.instance_name, uuid=s.instance_uuid),
        "instance_state": s.instance_state,
        "consistency": ConsistencyView(requested=s.requested, achieved=s.achieved, reason=s.reason),
        "freeze_window_ms": s.freeze_window_ms,
        "pause_window_ms": s.pause_window_ms,
        "created_at": s.created_at,
        "completed_at": s.completed_at,
        "backup_type": s.backup_type,
        "metadata": dict(s.metadata),
        "error": redact(s.error) if s.error else None,
        "members": [
            MemberView(
                target=m.target,
                bus=m.bus,
                boot_order=m.boot_order,
                size=m.virtual_size,
                format=m.format,
                sha256=m.sha256,
                metadata=dict(m.metadata),
                path=m.path if admin else None,
            )
            for m in s.members
        ],
    }


def job_view(job: Job) -> JobView:
    error = None
    if job.state == FAILED:
        slug = job.error_type or "operation-failed"
        status, title = _SLUGS.get(slug, (500, "Operation failed"))
        error = JobError(type=TYPE_BASE + slug, title=title, status=status, detail=redact(job.error or title))
    total = job.progress_total
    return JobView(
        id=job.id,
        kind=job.kind,
        state=job.state,  # type: ignore[arg-type]
        project=job.project,
        instance=InstanceRef(name=job.instance_name or "", uuid=job.instance_uuid) if job.instance_uuid else None,
        set_id=job.set_id,
        image_id=job.image_id,
        request=job.request,
        progress=ProgressView(
            phase=job.phase,
            done=job.progress_done,
            total=total,
            fraction=round(job.progress_done / total, 4) if total else (1.0 if job.state == "succeeded" else None),
        ),
        result=job.result,
        error=error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def image_view(image: StoredImage, project: str | None, admin: bool) -> ImageView:
    summary = image.summary
    return ImageView(
        id=image.id,
        name=image.name,
        status=image.status,
        project=project,
        set_id=image.source_set_id,
        format="ova",
        disk_format=summary.disk_format,
        ovf_version=summary.ovf_version,
        size=image.size,
        sha256=image.sha256,
        created_at=image.created_at,
        machine=ImageMachine(
            name=summary.machine_name,
            vcpus=summary.vcpus,
            memory_bytes=summary.memory_bytes,
            arch=summary.arch,
            firmware=summary.firmware,
            disks=len(summary.disks),
            nics=len(summary.nics),
        ),
        location=image.location if admin else None,
    )


def _json(model: BaseModel) -> Response:
    """Already a validated model: serialize once (FastAPI would dump, re-validate and dump it again)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


def _page(items: Sequence[T], limit: int, offset: int) -> tuple[list[T], int | None]:
    chunk = list(items[offset : offset + limit])
    return chunk, (offset + limit if offset + limit < len(items) else None)


# ---- dependencies --------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="`freezeframe token create` issues tokens")


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.ff
    return state


def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise unauthorized("send an 'Authorization: Bearer <token>' header; `freezeframe token create` makes one")
    state: AppState = request.app.state.ff
    token = state.tokens.authenticate(credentials.credentials)
    if token is None:
        raise unauthorized("the token is unknown or revoked")
    return Principal.of(token)


StateDep = Annotated[AppState, Depends(get_state)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
InstanceId = Annotated[str, PathParam(pattern=REF_PATTERN, max_length=64, description="instance name or UUID")]
SetId = Annotated[str, PathParam(pattern=UUID_PATTERN, description="snapshot set id")]
JobId = Annotated[str, PathParam(pattern=UUID_PATTERN)]
ImageId = Annotated[str, PathParam(pattern=UUID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "invalid request", 401: "no or bad token", 403: "the token's role does not allow it",
        404: "not found or not visible to this token", 409: "conflict (busy, wrong state)",
        413: "request body too large", 422: "input does not match the schema", 500: "internal error",
        502: "hypervisor error", 503: "catalog unavailable",
    }  # fmt: skip
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        code: {
            "model": Problem,
            "description": descriptions[code],
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for code in sorted({400, 401, 422, 500, 502, 503, *codes})
    }


# ---- jobs that snapshot ----------------------------------------------------------------------------------------


def _root_disk(instance: Instance) -> str | None:
    """The boot disk: lowest boot order, else the first disk (Nova's createImage without all_volumes)."""
    disks = [d for d in instance.hardware.disks if d.device == "disk"]
    booted = sorted((d for d in disks if d.boot_order), key=lambda d: d.boot_order or 0)
    chosen = booted or disks
    return chosen[0].target if chosen else None


def _probe_instance_lock(state: AppState, instance: Instance) -> None:
    """A CLI run on the same instance holds its flock: say so now instead of failing the job later."""
    try:
        with state.service.locks.hold(instance.uuid):
            pass
    except InstanceBusy:
        raise conflict(
            f"another freezeframe process is operating on instance {instance.name}; wait for it to finish"
        ) from None


def submit_snapshot(
    state: AppState, principal: Principal, instance: Instance, project: str | None, body: SnapshotCreate, kind: str
) -> Job:
    known = {d.target for d in instance.hardware.disks if d.device == "disk"}
    unknown = sorted(set(body.exclude_disks) - known)
    if unknown:
        raise ApiProblem(
            400, "invalid-request", "Invalid request",
            f"exclude_disks {', '.join(unknown)}: {instance.name} has no such disk (its disks: "
            f"{', '.join(sorted(known)) or 'none'})",
        )  # fmt: skip
    runner = state.require_runner()
    running = runner.active_job(f"instance:{instance.uuid}")
    if running is not None:
        raise conflict(f"job {running} is still running on this instance; wait for it to finish", job_id=running)
    _probe_instance_lock(state, instance)
    spec = JobSpec(
        kind=kind,
        lock_key=f"instance:{instance.uuid}",
        project=project,
        request=body.model_dump(mode="json"),
        token_id=principal.token_id,
        instance_uuid=instance.uuid,
        instance_name=instance.name,
    )

    def run(ctx: JobContext) -> dict[str, Any]:
        metadata = dict(body.metadata)
        metadata[JOB_KEY] = ctx.id
        if project is not None:
            metadata[PROJECT_KEY] = project
        request = SnapshotRequest(
            instance=instance.uuid,
            consistency=body.consistency,
            require=body.require,
            name=body.name,
            exclude_disks=tuple(body.exclude_disks),
            metadata=metadata,
            backup_type=body.backup_type,
            pause_vcpus=body.pause,
        )
        ctx.phase("snapshotting")

        def progress(done: int, total: int) -> None:
            if ctx.job.set_id is None:
                entry = next((e for e in state.service.journal.pending() if e.instance_uuid == instance.uuid), None)
                if entry is not None:
                    ctx.attach(set_id=entry.set_id)
                ctx.phase("copying")
            ctx.progress(done, total)

        try:
            made = state.service.snapshot(request, progress)
        except FreezeframeError:
            with contextlib.suppress(FreezeframeError):
                mine = state.service.catalog.list_sets(instance=instance.uuid, metadata={JOB_KEY: ctx.id})
                if mine:
                    ctx.attach(set_id=mine[0].id)
            raise
        ctx.attach(set_id=made.id)
        rotated: list[str] = []
        kept: dict[str, str] = {}
        if body.rotation is not None and body.backup_type is not None:
            ctx.phase("rotating")
            rotated, kept = state.lifecycle.rotate(instance.uuid, body.backup_type, body.rotation)
        return {
            "set_id": made.id,
            "status": str(made.status),
            "consistency": str(made.achieved) if made.achieved else None,
            "rotated_out": rotated,
            "kept_in_use": {k: redact(v) for k, v in kept.items()},
        }

    return runner.submit(spec, run)


def _accepted(response: Response, job: Job) -> JobView:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job)


def _set_job_guard(state: AppState, set_id: str) -> JobRunner:
    runner = state.require_runner()
    running = runner.active_job(f"set:{set_id}")
    if running is not None:
        raise conflict(f"job {running} is still running on this snapshot set; wait for it to finish", job_id=running)
    return runner


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
    return _accepted(response, runner.submit(spec, run))


def _set_for_job(state: AppState, principal: Principal, set_id: str) -> tuple[SnapshotSet, str | None, JobRunner]:
    """A job that uses an available set: writers only, the set visible to them, no other job on it."""
    principal.require_write()
    s, project = state.snapshot_set(set_id, principal)
    _require_available(s)
    return s, project, _set_job_guard(state, s.id)


def _require_available(s: SnapshotSet) -> None:
    if s.status is not SetStatus.AVAILABLE:
        raise conflict(f"snapshot set {s.id} is {s.status}; only available sets can be used for this")


def _require_free_name(state: AppState, name: str) -> None:
    if ld.name_taken(state.service.hypervisor.conn, name):
        raise conflict(f"an instance named {name!r} already exists; choose another name")


# ---- routes ---------------------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1")


@router.get("/instances", response_model=list[InstanceView], tags=["instances"], responses=_problems())
def list_instances(state: StateDep, principal: PrincipalDep) -> list[InstanceView]:
    """The instances libvirt has (those of the token's project; all for an admin), with their disks."""
    return [instance_view(i, project, principal.is_admin) for i, project in state.visible_instances(principal)]


@router.get("/instances/{instance_id}", response_model=InstanceView, tags=["instances"], responses=_problems(404))
def get_instance(instance_id: InstanceId, state: StateDep, principal: PrincipalDep) -> InstanceView:
    instance, project, _ = state.instance(instance_id, principal)
    return instance_view(instance, project, principal.is_admin)


@router.put(
    "/instances/{instance_id}/project", response_model=ProjectView, tags=["instances"], responses=_problems(403, 404)
)
def assign_project(
    instance_id: InstanceId, body: ProjectAssign, state: StateDep, principal: PrincipalDep
) -> ProjectView:
    """Admin: put the instance in a project (wins over the project in the domain's metadata)."""
    principal.require_admin()
    instance, _, _ = state.instance(instance_id, principal)
    state.projects.assign(instance.uuid, instance.name, body.project)
    ref = InstanceRef(name=instance.name, uuid=instance.uuid)
    return ProjectView(instance=ref, project=body.project, source="mapping")


@router.delete(
    "/instances/{instance_id}/project", response_model=ProjectView, tags=["instances"], responses=_problems(403, 404)
)
def unassign_project(instance_id: InstanceId, state: StateDep, principal: PrincipalDep) -> ProjectView:
    """Admin: drop the mapping; the project in the domain's metadata (if any) applies again."""
    principal.require_admin()
    instance, _, _ = state.instance(instance_id, principal)
    state.projects.unassign(instance.uuid)
    project, source = state.resolver.of_instance(instance)
    return ProjectView(instance=InstanceRef(name=instance.name, uuid=instance.uuid), project=project, source=source)  # type: ignore[arg-type]


@router.post(
    "/instances/{instance_id}/snapshots",
    status_code=202,
    response_model=JobView,
    tags=["snapshots"],
    responses=_problems(400, 403, 404, 409, 413),
)
def create_snapshot(
    instance_id: InstanceId, body: SnapshotCreate, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """Snapshot every disk of the instance as one set (createBackup semantics with backup_type + rotation)."""
    principal.require_write()
    instance, project, _ = state.instance(instance_id, principal)
    kind = "backup" if body.rotation is not None else "snapshot"
    return _accepted(response, submit_snapshot(state, principal, instance, project, body, kind))


@router.post(
    "/servers/{server_id}/action",
    status_code=202,
    response_model=JobView,
    tags=["snapshots"],
    responses=_problems(400, 403, 404, 409, 413),
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
        exclude: list[str] = []
        if not i.all_volumes:
            root = _root_disk(instance)
            exclude = [d.target for d in instance.hardware.disks if d.device == "disk" and d.target != root]
        request = SnapshotCreate(name=i.name, metadata=i.metadata, exclude_disks=exclude)
        kind = "snapshot"
    return _accepted(response, submit_snapshot(state, principal, instance, project, request, kind))


@router.get("/jobs", response_model=JobPage, tags=["jobs"], responses=_problems())
def list_jobs(
    state: StateDep,
    principal: PrincipalDep,
    job_state: Annotated[str | None, Query(alias="state", pattern="^(queued|running|succeeded|failed)$")] = None,
    kind: Annotated[str | None, Query(pattern="^[a-z]{1,32}$")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobPage:
    jobs = state.jobs.query(projects=principal.visible_projects(), state=job_state, kind=kind)
    chunk, next_offset = _page(jobs, limit, offset)
    items = [job_view(j) for j in chunk]
    return JobPage(items=items, total=len(jobs), limit=limit, offset=offset, next_offset=next_offset)


@router.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=_problems(404))
def get_job(job_id: JobId, state: StateDep, principal: PrincipalDep) -> JobView:
    """State, progress (bytes copied), result (e.g. the set id) or error of a job."""
    return job_view(state.job(job_id, principal))


@router.get("/snapshot-sets", response_model=SetPage, tags=["snapshot sets"], responses=_problems(400))
def list_sets(
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
    limit: Limit = 50,
    offset: Offset = 0,
) -> Response:
    """Newest first; filters combine; ``next_offset`` is null on the last page."""
    wanted: dict[str, str] = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not re.match(META_KEY_PATTERN, key) or len(value) > 1024:
            raise ApiProblem(400, "invalid-request", "Invalid request", f"metadata filter {item[:80]!r}: use KEY=VALUE")
        wanted[key] = value
    entries = state.sets.index(instance=instance, status=status, backup_type=backup_type, metadata=wanted)
    mapping = state.resolver.lazy_mapping()
    visible: list[tuple[str, str | None]] = []
    for entry in entries:
        owner = state.resolver.of_set_parts(entry.instance_uuid, entry.metadata, mapping)
        if principal.sees(owner) and (project is None or owner == project):
            visible.append((entry.id, owner))
    chunk, next_offset = _page(visible, limit, offset)
    owners = dict(chunk)
    page = SetPage(
        items=[set_view(s, owners[s.id], principal.is_admin) for s in state.sets.load([i for i, _ in chunk])],
        total=len(visible),
        limit=limit,
        offset=offset,
        next_offset=next_offset,
    )
    return _json(page)


@router.get("/snapshot-sets/{set_id}", response_model=SetDetail, tags=["snapshot sets"], responses=_problems(404))
def get_set(set_id: SetId, state: StateDep, principal: PrincipalDep) -> Response:
    """The set with its members (each member's metadata carries the set's UUID) and recorded hardware."""
    s, project = state.snapshot_set(set_id, principal)
    return _json(set_detail(s, project, principal.is_admin))


@router.delete("/snapshot-sets/{set_id}", status_code=204, tags=["snapshot sets"], responses=_problems(403, 404, 409))
def delete_set(
    set_id: SetId,
    state: StateDep,
    principal: PrincipalDep,
    force: Annotated[bool, Query(description="flatten copy-on-write dependants first")] = False,
) -> Response:
    """Remove the set and its data; restored instances still on it are a 409 unless ``force``."""
    principal.require_write()
    s, _ = state.snapshot_set(set_id, principal)
    _set_job_guard(state, s.id)
    if s.status is SetStatus.CREATING:
        raise conflict(f"snapshot set {s.id} is still being created; wait for its job to finish")
    try:
        state.lifecycle.delete(s.id, force=force)
    except SetHasDependants as exc:
        names = sorted({d.instance_name for d in exc.dependants})
        raise conflict(
            f"snapshot set {s.id} is still the copy-on-write base of instance(s) {', '.join(names)}; delete with "
            "force=true to copy the data into them first, or remove those instances"
        ) from None
    return Response(status_code=204)


@router.post(
    "/snapshot-sets/{set_id}/restore",
    status_code=202,
    response_model=JobView,
    tags=["snapshot sets"],
    responses=_problems(400, 403, 404, 409, 413),
)
def restore_set(
    set_id: SetId, body: RestoreRequest, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """A new instance (in the set's project) from the set: copy-on-write over the members, or full copies."""
    s, project, runner = _set_for_job(state, principal, set_id)
    _require_free_name(state, body.name)

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("restoring")
        result = state.lifecycle.restore(s.id, body.name, start=body.start, full=body.full)
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
    tags=["snapshot sets"],
    responses=_problems(403, 404, 409, 413),
)
def verify_set(
    set_id: SetId,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    body: Annotated[VerifyRequest | None, Body()] = None,
) -> JobView:
    """Recompute every member's SHA-256 (``boot``: also boot a throw-away clone); the report is the result."""
    s, project, runner = _set_for_job(state, principal, set_id)
    request = body or VerifyRequest()

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("verifying")
        report = state.lifecycle.verify(s.id, boot=request.boot)
        return {
            "ok": report.ok,
            "booted": report.booted,
            "checks": [
                {"subject": c.subject, "check": c.what, "ok": c.ok, "detail": redact(c.detail)} for c in report.checks
            ],
        }

    return _submit_set_job(response, runner, principal, s, project, "verify", request, run)


@router.post(
    "/snapshot-sets/{set_id}/export",
    status_code=202,
    response_model=JobView,
    tags=["images"],
    responses=_problems(403, 404, 409, 413),
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


@router.get("/images", response_model=ImagePage, tags=["images"], responses=_problems())
def list_images(state: StateDep, principal: PrincipalDep, limit: Limit = 50, offset: Offset = 0) -> ImagePage:
    """The image store's packages this token may see, newest first."""
    owners = state.owners.all()
    visible = []
    for image in state.portable.images():
        project = state.image_project(image, owners)
        if principal.sees(project):
            visible.append((image, project))
    chunk, next_offset = _page(visible, limit, offset)
    return ImagePage(
        items=[image_view(i, p, principal.is_admin) for i, p in chunk],
        total=len(visible),
        limit=limit,
        offset=offset,
        next_offset=next_offset,
    )


@router.get("/images/{image_id}", response_model=ImageView, tags=["images"], responses=_problems(404))
def get_image(image_id: ImageId, state: StateDep, principal: PrincipalDep) -> ImageView:
    image, project = state.image(image_id, principal)
    return image_view(image, project, principal.is_admin)


@router.get(
    "/images/{image_id}/file",
    tags=["images"],
    response_class=StreamingResponse,
    responses={
        200: {"description": "the OVA package", "content": {"application/x-tar": {}}},
        **_problems(404, 409),
    },
)
def download_image(image_id: ImageId, state: StateDep, principal: PrincipalDep) -> StreamingResponse:
    """The OVA itself (a tar: descriptor, SHA-256 manifest, disks), streamed from the image store."""
    image, _ = state.image(image_id, principal)
    store = state.portable.store

    def chunks() -> Iterator[bytes]:
        with store.get_stream(image.id) as stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    headers = {"Content-Disposition": f'attachment; filename="{image.filename}"', "Content-Length": str(image.size)}
    return StreamingResponse(chunks(), media_type="application/x-tar", headers=headers)


@router.delete("/images/{image_id}", status_code=204, tags=["images"], responses=_problems(403, 404, 409))
def delete_image(image_id: ImageId, state: StateDep, principal: PrincipalDep) -> Response:
    """Remove the package from the image store (refused while an import reads it)."""
    principal.require_write()
    image, _ = state.image(image_id, principal)
    running = state.require_runner().active_job(f"image:{image.id}")
    if running is not None:
        raise conflict(f"image {image.id} is in use by job {running}; wait for it to finish", job_id=running)
    state.portable.delete_image(image.id)
    state.owners.forget(image.id)
    return Response(status_code=204)


@router.post(
    "/images/{image_id}/import",
    status_code=202,
    response_model=JobView,
    tags=["images"],
    responses=_problems(400, 403, 404, 409, 413),
)
def import_image(
    image_id: ImageId, body: ImportRequest, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """A new instance (in the image's project) from the OVA: its disks copied out, the domain defined."""
    principal.require_write()
    image, project = state.image(image_id, principal)
    runner = state.require_runner()
    _require_free_name(state, body.name)

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("importing")
        made = state.portable.import_package(image.id, body.name, start=body.start, progress=ctx.progress)
        if project is not None:
            state.projects.assign(made.uuid, made.name, project)
        return {
            "instance": {"name": made.name, "uuid": made.uuid},
            "origin": made.origin,
            "disks": [d.target for d in made.disks],
            "started": made.started,
            "warnings": [redact(w) for w in made.warnings],
            "left_out": {k: redact(v) for k, v in made.left_out.items()},
        }

    spec = JobSpec(
        kind="import", lock_key=f"image:{image.id}", project=project, request=body.model_dump(mode="json"),
        token_id=principal.token_id, set_id=image.source_set_id, image_id=image.id,
    )  # fmt: skip
    return _accepted(response, runner.submit(spec, run))


# ---- the app ----------------------------------------------------------------------------------------------------


def create_app(config: ApiConfig) -> FastAPI:
    """The ASGI app; the service opens in its lifespan, so building the app touches nothing."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState(config)
        try:
            await run_in_threadpool(state.start)
        except BaseException:
            await run_in_threadpool(state.close)
            raise
        app.state.ff = state
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(
        title="freezeframe",
        version=__version__,
        summary="Instance-level snapshot sets of libvirt/QEMU VMs: every disk at one point in time.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_exception_handler(ApiProblem, handle_api_problem)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(FreezeframeError, handle_freezeframe_error)
    app.add_exception_handler(Exception, handle_unexpected)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def health() -> Health:
        """Unauthenticated liveness: the service has started (repair at start-up is done)."""
        return Health(status="ok", version=__version__)

    app.include_router(router)
    return app
