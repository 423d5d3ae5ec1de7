"""Request and response bodies of the HTTP API (pydantic): the contract /openapi.json publishes.

Inputs are strict (unknown fields refused, names and keys to a portable alphabet, sizes bounded) because they
end up as libvirt names, directory names and catalog rows; outputs never carry host paths except for admins.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from freezeframe import validation
from freezeframe.errors import InvalidRequest
from freezeframe.model import Consistency, InstanceState, SetStatus

T = TypeVar("T")

NAME_PATTERN = f"^{validation.NAME_PATTERN}$"
"""Instance, set and image names and backup types: the rule of ``freezeframe.validation`` (CLI and API alike)."""
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""An instance given by name or UUID in a path."""
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
PROJECT_PATTERN = f"^{validation.PROJECT_PATTERN}$"
TARGET_PATTERN = r"^[a-z]{2,4}[a-z0-9]{0,12}$"
META_KEY_PATTERN = f"^{validation.META_KEY_PATTERN}$"


def _checked(check: Callable[[T], T]) -> Callable[[T], T]:
    """A ``freezeframe.validation`` check as a pydantic validator: its one-line message becomes a 422 entry."""

    def validate(value: T) -> T:
        try:
            return check(value)
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from None

    return validate


Name = Annotated[
    str, Field(pattern=NAME_PATTERN, min_length=1, max_length=63), AfterValidator(_checked(validation.validate_name))
]
Project = Annotated[
    str,
    Field(pattern=PROJECT_PATTERN, min_length=1, max_length=128),
    AfterValidator(_checked(validation.validate_project)),
]
BackupType = Annotated[
    str,
    Field(pattern=NAME_PATTERN, min_length=1, max_length=63, examples=["daily"]),
    AfterValidator(_checked(validation.validate_backup_type)),
]
Target = Annotated[str, Field(pattern=TARGET_PATTERN, min_length=2, max_length=16, examples=["vdb"])]
MetaKey = Annotated[str, Field(pattern=META_KEY_PATTERN, min_length=1, max_length=128)]
MetaValue = Annotated[str, Field(max_length=validation.MAX_META_VALUE)]
Metadata = Annotated[
    dict[MetaKey, MetaValue],
    Field(
        max_length=validation.MAX_META_ENTRIES,
        description=f"at most {validation.MAX_META_ENTRIES} entries; keys not 'freezeframe.*'; values printable "
        "text (no NUL or other control characters except tab and newline)",
    ),
    AfterValidator(_checked(validation.validate_metadata)),
]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ----------------------------------------------------------------------------------------------


class SnapshotCreate(_Input):
    """A snapshot set of the instance; with ``backup_type`` + ``rotation`` it is Nova's createBackup."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"dependentRequired": {"rotation": ["backup_type"]}})

    name: Name | None = None
    consistency: Consistency = Consistency.FILESYSTEM
    require: bool = Field(default=False, description="fail instead of falling back to crash consistency")
    exclude_disks: list[Target] = Field(default_factory=list, max_length=32)
    metadata: Metadata = Field(default_factory=dict)
    backup_type: BackupType | None = None
    rotation: int | None = Field(default=None, ge=0, le=1000, description="keep the newest N sets of this backup_type")
    pause: bool = Field(default=False, description="also pause the vCPUs around the capture")
    mode: Literal["auto", "full", "incremental"] = Field(
        default="auto", description="auto: only changed blocks where a trustworthy parent set exists, else full"
    )
    max_chain: int = Field(default=7, ge=0, le=1000, description="auto copies a disk in full after N incrementals")

    @model_validator(mode="after")
    def _rotation_needs_type(self) -> SnapshotCreate:
        if self.rotation is not None and self.backup_type is None:
            raise ValueError("rotation needs backup_type: it keeps the newest sets of that type")
        return self


class CreateBackup(_Input):
    name: Name
    backup_type: BackupType
    rotation: int = Field(ge=0, le=1000)
    metadata: Metadata = Field(default_factory=dict)


class CreateImage(_Input):
    name: Name
    metadata: Metadata = Field(default_factory=dict)
    all_volumes: bool = Field(default=True, description="false: the root disk only")


class BackupAction(_Input):
    createBackup: CreateBackup  # the wire names are Nova's


class ImageAction(_Input):
    createImage: CreateImage


ServerAction = Annotated[
    BackupAction | ImageAction,
    Field(description='The OpenStack proposal\'s call shapes: {"createBackup": {...}} or {"createImage": {...}}'),
]


class RestoreRequest(_Input):
    name: Name = Field(description="name of the new instance")
    start: bool = False
    full: bool = Field(default=False, description="independent copies instead of copy-on-write over the members")
    host: Name | None = Field(
        default=None,
        description="multi-host deployments: the host to restore on (default: the host holding the set's members); "
        "members captured elsewhere are transferred there and verified first",
    )


class VerifyRequest(_Input):
    boot: bool = Field(default=False, description="also boot a throw-away clone and check its filesystems")


class RevertRequest(_Input):
    safety: bool = Field(default=True, description="first take a safety set of the instance's current disks")


class ExportRequest(_Input):
    name: Name | None = Field(default=None, description="image name (default: the set's name)")
    format: Literal["ova"] = "ova"
    disk_format: Literal["qcow2", "vmdk"] = "qcow2"
    ovf_version: Literal[1, 2] = Field(default=1, description="1: what virt-v2v and most tools read")
    manifest_digest: Literal["sha1", "sha256"] | None = Field(
        default=None, description="manifest algorithm; default sha1 for OVF 1.x (what its readers expect), sha256 for 2"
    )


class ImportRequest(_Input):
    name: Name = Field(description="name of the new instance")
    start: bool = False
    storage: Literal["file", "rbd"] = Field("file", description="qcow2 files, or new Ceph RBD images in `pool`")
    pool: Name | None = Field(None, description="the Ceph pool of the RBD images (with storage rbd)")

    @model_validator(mode="after")
    def _storage(self) -> ImportRequest:
        _checked(lambda pool: validation.validate_import_storage(self.storage, pool))(self.pool)
        return self


class ProjectAssign(_Input):
    project: Project


# ---- responses ---------------------------------------------------------------------------------------------


class InstanceRef(BaseModel):
    name: str
    uuid: str


class DiskView(BaseModel):
    target: str
    device: str
    bus: str
    format: str
    size: int
    readonly: bool
    shareable: bool
    source: str | None = Field(default=None, description="host path; admins only")


class NicView(BaseModel):
    model: str | None
    source_type: str
    source: str | None


class InstanceView(BaseModel):
    name: str
    uuid: str
    state: InstanceState
    project: str | None
    vcpus: int
    memory_kib: int
    disks: list[DiskView]


class HardwareView(BaseModel):
    vcpus: int
    memory_kib: int
    arch: str
    machine: str | None
    firmware: str
    disks: list[DiskView]
    nics: list[NicView]


class ConsistencyView(BaseModel):
    requested: Consistency
    achieved: Consistency | None
    reason: str | None


class MemberView(BaseModel):
    target: str
    bus: str
    boot_order: int | None
    size: int
    format: str
    sha256: str | None
    metadata: dict[str, str] = Field(description="carries freezeframe.set_uuid, the set's id")
    path: str | None = Field(default=None, description="host path; admins only")


class SetView(BaseModel):
    id: str
    name: str
    status: SetStatus
    project: str | None
    instance: InstanceRef
    instance_state: InstanceState | None
    consistency: ConsistencyView
    freeze_window_ms: float | None
    pause_window_ms: float | None
    created_at: datetime
    completed_at: datetime | None
    backup_type: str | None
    metadata: dict[str, str]
    error: str | None
    members: list[MemberView]


class SetDetail(SetView):
    hardware: HardwareView


class SetPage(BaseModel):
    """A keyset page: ``next_cursor`` (and the ``next`` URL) lead to the following page; null on the last."""

    items: list[SetView]
    limit: int
    next_cursor: str | None
    next: str | None
    total: int | None
    """Every matching set; only when asked for (``count=true``): counting reads them all."""


class ProgressView(BaseModel):
    phase: str | None
    done: int
    total: int
    fraction: float | None


class JobError(BaseModel):
    type: str
    title: str
    status: int
    detail: str


class JobView(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed"]
    project: str | None
    instance: InstanceRef | None
    set_id: str | None
    image_id: str | None
    request: dict[str, Any]
    progress: ProgressView
    result: dict[str, Any] | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[JobView]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class ImageMachine(BaseModel):
    """What the package's descriptor says about the machine."""

    name: str
    vcpus: int
    memory_bytes: int
    arch: str | None
    firmware: str | None
    disks: int
    nics: int


class ImageView(BaseModel):
    id: str
    name: str
    status: str
    project: str | None
    set_id: str | None
    format: Literal["ova"]
    disk_format: str
    ovf_version: int
    size: int
    sha256: str
    created_at: datetime
    machine: ImageMachine
    location: str | None = Field(default=None, description="where the store keeps it; admins only")


class ImagePage(BaseModel):
    items: list[ImageView]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class ProjectView(BaseModel):
    instance: InstanceRef
    project: str | None
    source: Literal["mapping", "metadata", "none"]


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class FieldError(BaseModel):
    loc: list[str]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    job_id: str | None = Field(default=None, description="409: the job already running on this instance or set")
    errors: list[FieldError] | None = Field(default=None, description="422: each invalid field")
