"""What the HTTP service keeps in the catalog beside the sets: jobs, API tokens, project mappings, image owners.

The rows are declared with the catalog's (``catalog_schema``: one Alembic history, revision 0003, covers them) and
each store works over a ``SqlCatalog``'s connections, like ``RestoreLog``: the Catalog port stays unchanged and
the CLI and the service read and write the same SQLite file (WAL) at the same time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, delete, insert, select, update

from freezeframe.adapters.catalog import SqlCatalog, upsert
from freezeframe.adapters.catalog_schema import IMAGE_OWNERS, INSTANCE_PROJECTS, JOBS, TOKENS
from freezeframe.errors import InvalidRequest, JobNotFound, TokenNotFound
from freezeframe.validation import validate_project, validate_text

ROLES = ("admin", "member", "reader")
"""admin: every project and the project mapping; member: act on its project; reader: look only."""

TOKEN_PREFIX = "ffk"
_DUMMY_HASH = hashlib.sha256(b"freezeframe: no such token").hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


# ---- jobs -------------------------------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    kind: str
    state: str
    project: str | None
    lock_key: str
    request: dict[str, Any]
    created_at: datetime
    instance_uuid: str | None = None
    instance_name: str | None = None
    set_id: str | None = None
    image_id: str | None = None
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None
    phase: str | None = None
    progress_done: int = 0
    progress_total: int = 0
    token_id: str | None = None
    server_pid: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
FINISHED_STATES = (SUCCEEDED, FAILED)


def _job(row: Row[Any]) -> Job:
    """A row of ``jobs`` (its columns are the fields of Job)."""
    values = dict(row._mapping)
    values["request"] = dict(values["request"])
    values["result"] = dict(values["result"]) if values["result"] is not None else None
    return Job(**values)


class JobStore:
    """Jobs as rows; every state change is its own short transaction so readers never wait on a worker."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def add(self, job: Job) -> None:
        with self._catalog.connect(f"recording job {job.id}", write=True) as connection:
            connection.execute(insert(JOBS).values(**{**vars(job), "request": dict(job.request)}))

    def get(self, job_id: str) -> Job:
        with self._catalog.connect(f"looking up job {job_id}", write=False) as connection:
            row = connection.execute(select(JOBS).where(JOBS.c.id == job_id)).first()
            if row is None:
                raise JobNotFound(f"no job {job_id}")
            return _job(row)

    def update(self, job_id: str, **values: Any) -> None:
        """Set the given columns (state, phase, progress_done, set_id, result, error, ...)."""
        unknown = set(values) - set(JOBS.c.keys())
        if unknown:
            raise InvalidRequest(f"jobs have no column(s) {', '.join(sorted(unknown))}")
        with self._catalog.connect(f"updating job {job_id}", write=True) as connection:
            connection.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values))

    def query(
        self,
        projects: Sequence[str] | None = None,
        state: str | None = None,
        kind: str | None = None,
    ) -> list[Job]:
        """Newest first; ``projects=None`` means every project (admin), ``[]`` none."""
        query = select(JOBS)
        if projects is not None:
            query = query.where(JOBS.c.project.in_(list(projects)))
        if state is not None:
            query = query.where(JOBS.c.state == state)
        if kind is not None:
            query = query.where(JOBS.c.kind == kind)
        query = query.order_by(JOBS.c.created_at.desc(), JOBS.c.id)
        with self._catalog.connect("listing jobs", write=False) as connection:
            return [_job(row) for row in connection.execute(query)]

    def claim(self, job_id: str, server_pid: int) -> Job | None:
        """queued -> running, only if still queued: a second delivery of the same job claims nothing (None)."""
        where = (JOBS.c.id == job_id) & (JOBS.c.state == QUEUED)
        with self._catalog.connect(f"claiming job {job_id}", write=True) as connection:
            values = {"state": RUNNING, "started_at": _now(), "server_pid": server_pid}
            if connection.execute(update(JOBS).where(where).values(**values)).rowcount != 1:
                return None
            return _job(connection.execute(select(JOBS).where(JOBS.c.id == job_id)).one())

    def locked_on(self, prefix: str) -> list[Job]:
        """Jobs whose lock key starts with ``prefix`` (a group's coordinators, a group set's shares), oldest first."""
        where = JOBS.c.lock_key.startswith(prefix, autoescape=True)
        with self._catalog.connect(f"listing the jobs locked on {prefix}", write=False) as connection:
            return [_job(row) for row in connection.execute(select(JOBS).where(where).order_by(JOBS.c.created_at))]

    def unfinished(self) -> list[Job]:
        query = select(JOBS).where(JOBS.c.state.in_([QUEUED, RUNNING])).order_by(JOBS.c.created_at)
        with self._catalog.connect("listing unfinished jobs", write=False) as connection:
            return [_job(row) for row in connection.execute(query)]


# ---- tokens -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    id: str
    project: str | None
    """The project a member or reader token is scoped to; always None for admin tokens (they are global)."""
    role: str
    created_at: datetime
    description: str | None = None
    revoked_at: datetime | None = None
    ignored_project: str | None = None
    """An admin token created by an older freezeframe with a project: the project never limited it."""

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class IssuedToken:
    """A new token: ``secret`` (the whole bearer string) is shown once and never stored."""

    token: Token
    secret: str = field(repr=False)


def _token(row: Row[Any]) -> Token:
    return _scoped(row.id, row.project, row.role, _aware(row.created_at) or _now(), row.description, row.revoked_at)


def _scoped(
    token_id: str, project: str | None, role: str, created: datetime, description: str | None, revoked: datetime | None
) -> Token:
    """Admin tokens are global: a project stored with one (older versions allowed it) is reported as ignored."""
    if role == "admin" and project is not None:
        return Token(token_id, None, role, created, description, _aware(revoked), ignored_project=project)
    return Token(token_id, project, role, created, description, _aware(revoked))


def check_token_scope(role: str, project: str | None) -> None:
    """The one rule for every way a token is made (CLI ``token create``, tests, any API path)."""
    if role not in ROLES:
        raise InvalidRequest(f"role {role!r} is not one of {', '.join(ROLES)}")
    if role == "admin" and project is not None:
        raise InvalidRequest(
            "an admin token is global (it sees and changes every project); leave out --project, "
            "or make a member token for that project"
        )
    if role != "admin" and not project:
        raise InvalidRequest(f"a {role} token needs --project: it sees and acts on that project only")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """Bearer tokens ``ffk_<id>_<secret>``: the id finds the row, the secret is compared by hash in constant time."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def create(self, role: str, project: str | None, description: str | None = None) -> IssuedToken:
        check_token_scope(role, project)
        if project is not None:
            validate_project(project)
        if description is not None:
            validate_text(description, "token description", limit=256)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = _now()
        with self._catalog.connect("creating a token", write=True) as connection:
            connection.execute(
                insert(TOKENS).values(
                    id=token_id,
                    secret_sha256=_hash(secret),
                    project=project,
                    role=role,
                    description=description,
                    created_at=now,
                    revoked_at=None,
                )
            )
        return IssuedToken(Token(token_id, project, role, now, description), f"{TOKEN_PREFIX}_{token_id}_{secret}")

    def authenticate(self, bearer: str) -> Token | None:
        """The active token for this bearer string, or None; unknown ids cost the same hash compare."""
        prefix, _, rest = bearer.partition("_")
        token_id, _, secret = rest.partition("_")
        table = TOKENS
        row = None
        if prefix == TOKEN_PREFIX and token_id and secret:
            with self._catalog.connect("checking a token", write=False) as connection:
                row = connection.execute(select(table).where(table.c.id == token_id)).mappings().first()
        expected = row["secret_sha256"] if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(expected, _hash(secret))
        if row is None or not matches or row["revoked_at"] is not None:
            return None
        return _scoped(
            row["id"], row["project"], row["role"], _aware(row["created_at"]) or _now(), row["description"],
            row["revoked_at"],
        )  # fmt: skip

    def all(self, include_revoked: bool = True) -> list[Token]:
        query = select(TOKENS).order_by(TOKENS.c.created_at, TOKENS.c.id)
        if not include_revoked:
            query = query.where(TOKENS.c.revoked_at.is_(None))
        with self._catalog.connect("listing tokens", write=False) as connection:
            return [_token(row) for row in connection.execute(query)]

    def revoke(self, token_id: str) -> Token:
        """Idempotent: revoking a revoked token keeps its first revocation time."""
        if token_id.startswith(f"{TOKEN_PREFIX}_"):
            token_id = token_id.split("_")[1]
        with self._catalog.connect(f"revoking token {token_id}", write=True) as connection:
            row = connection.execute(select(TOKENS).where(TOKENS.c.id == token_id)).first()
            if row is None:
                raise TokenNotFound(f"no token with id {token_id!r}; `freezeframe token list` shows the ids")
            if row.revoked_at is None:
                connection.execute(update(TOKENS).where(TOKENS.c.id == token_id).values(revoked_at=_now()))
                row = connection.execute(select(TOKENS).where(TOKENS.c.id == token_id)).one()
            return _token(row)


# ---- instance -> project mapping --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectAssignment:
    instance_uuid: str
    instance_name: str
    project: str
    assigned_at: datetime


class ProjectMap:
    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def assign(self, instance_uuid: str, instance_name: str, project: str) -> ProjectAssignment:
        now = _now()
        with self._catalog.connect(f"assigning {instance_name} to {project}", write=True) as connection:
            values = {"instance_name": instance_name, "project": project, "assigned_at": now}
            upsert(connection, INSTANCE_PROJECTS, {"instance_uuid": instance_uuid}, values)
        return ProjectAssignment(instance_uuid, instance_name, project, now)

    def unassign(self, instance_uuid: str) -> bool:
        with self._catalog.connect(f"unassigning {instance_uuid}", write=True) as connection:
            query = delete(INSTANCE_PROJECTS).where(INSTANCE_PROJECTS.c.instance_uuid == instance_uuid)
            return bool(getattr(connection.execute(query), "rowcount", 0))

    def all(self) -> dict[str, ProjectAssignment]:
        with self._catalog.connect("reading the project mapping", write=False) as connection:
            return {
                r.instance_uuid: ProjectAssignment(r.instance_uuid, r.instance_name, r.project, r.assigned_at)
                for r in connection.execute(select(INSTANCE_PROJECTS).order_by(INSTANCE_PROJECTS.c.instance_name))
            }

    def get(self, instance_uuid: str) -> str | None:
        with self._catalog.connect("reading the project mapping", write=False) as connection:
            where = INSTANCE_PROJECTS.c.instance_uuid == instance_uuid
            project: str | None = connection.scalar(select(INSTANCE_PROJECTS.c.project).where(where))
            return project


# ---- image owners ---------------------------------------------------------------------------------------


class ImageOwners:
    """The project of each image the service exported (CLI exports have none: they follow their source set)."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def record(self, image_id: str, project: str | None, set_id: str | None) -> None:
        with self._catalog.connect(f"recording the owner of image {image_id}", write=True) as connection:
            # created_at is the first record's: an update keeps it.
            where = IMAGE_OWNERS.c.image_id == image_id
            if connection.execute(update(IMAGE_OWNERS).where(where).values(project=project, set_id=set_id)).rowcount:
                return
            values = {"project": project, "set_id": set_id}
            upsert(connection, IMAGE_OWNERS, {"image_id": image_id}, {**values, "created_at": _now()})

    def all(self) -> dict[str, str | None]:
        """image id -> project, for every image the service recorded."""
        with self._catalog.connect("reading image owners", write=False) as connection:
            return {r.image_id: r.project for r in connection.execute(select(IMAGE_OWNERS))}

    def forget(self, image_id: str) -> None:
        with self._catalog.connect(f"forgetting the owner of image {image_id}", write=True) as connection:
            connection.execute(delete(IMAGE_OWNERS).where(IMAGE_OWNERS.c.image_id == image_id))


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
