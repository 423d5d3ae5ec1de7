"""CLI commands of the HTTP service: ``serve``, ``token create|list|revoke``, ``project assign|unassign|list``.

``register(app)`` adds them to the main Typer app; shared options and output helpers come from cli_common and
cli_output. The web stack and the service stores are imported when a command runs, not when the CLI starts.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from freezeframe.cli_common import ConnectOpt, HomeOpt, JsonOpt, open_service, print_json, settings_for
from freezeframe.cli_output import Col, print_table, say
from freezeframe.errors import InvalidRequest
from freezeframe.validation import validate_project, validate_text

DESCRIPTION_MAX = 256


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"
    READER = "reader"


# ---- serve -------------------------------------------------------------------------------------------------


def serve(
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=1, max=65535, help="TCP port")] = 8774,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", metavar="FILE", help="PEM certificate (with --tls-key)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", metavar="FILE", help="PEM private key")] = None,
    insecure_listen: Annotated[
        bool, typer.Option("--insecure-listen", help="allow clear-text HTTP beyond loopback (TLS terminated in front)")
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", metavar="N", min=1, max=64, help="jobs running at the same time")
    ] = 2,
    max_body: Annotated[
        int, typer.Option("--max-body", metavar="BYTES", min=1024, max=16 << 20, help="request body limit")
    ] = 64 * 1024,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            "--shutdown-grace", metavar="SECONDS", min=0, max=3600, help="how long a stop waits for running jobs"
        ),
    ] = 60.0,
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="LEVEL", help="debug | info | warning | error")
    ] = "info",
    multi_host: Annotated[
        bool,
        typer.Option("--multi-host", help="a stateless API replica: agents run the jobs (PostgreSQL catalog)"),
    ] = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, routes under /v1) until SIGINT/SIGTERM."""
    from freezeframe.api.app import ApiConfig
    from freezeframe.api.server import serve as run_server

    if log_level not in ("debug", "info", "warning", "error"):
        raise InvalidRequest(f"--log-level {log_level!r}: use debug, info, warning or error")
    config = ApiConfig(
        settings=settings_for(home, connect),
        workers=workers,
        max_body_bytes=max_body,
        shutdown_grace_s=shutdown_grace,
        multi_host=multi_host,
    )
    run_server(
        config, host, port, tls_cert=tls_cert, tls_key=tls_key, insecure_listen=insecure_listen, log_level=log_level
    )


# ---- tokens --------------------------------------------------------------------------------------------------

token_app = typer.Typer(
    help="API bearer tokens (stored hashed; the secret is shown once).", no_args_is_help=True, rich_markup_mode=None
)


@token_app.command("create")
def token_create(
    role: Annotated[Role, typer.Option("--role", help="what it may do")],
    project: Annotated[
        str | None,
        typer.Option("--project", metavar="PROJECT", help="the project it sees and acts on (not needed for admin)"),
    ] = None,
    description: Annotated[
        str | None, typer.Option("--description", metavar="TEXT", help="who or what uses it")
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Issue a token; send it as 'Authorization: Bearer <token>'."""
    from freezeframe.adapters.service_store import TokenStore

    if project is not None:
        validate_project(project)
    if description is not None:
        validate_text(description, "--description", DESCRIPTION_MAX)
    with open_service(home, None) as service:
        issued = TokenStore(service.catalog).create(str(role), project, description)
    if as_json:
        print_json({"id": issued.token.id, "token": issued.secret, "role": issued.token.role, "project": project})
        return
    say(f"token {issued.token.id} ({issued.token.role}, project {project or 'all'}); shown only now:")
    sys.stdout.write(issued.secret + "\n")


@token_app.command("list")
def token_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Every token with its role, project and whether it is revoked (never the secrets).

    Into a pipe: one tab-separated line per token, no header: id, role, project, description, created, revoked.
    """
    from freezeframe.adapters.service_store import TokenStore

    with open_service(home, None) as service:
        tokens = TokenStore(service.catalog).all()
    if as_json:
        print_json(
            [
                {
                    "id": t.id,
                    "role": t.role,
                    "project": t.project,
                    "description": t.description,
                    "created_at": t.created_at.isoformat(),
                    "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
                }
                for t in tokens
            ]
        )
        return
    rows = [
        [t.id, t.role, t.project or "(all)", t.description or "-", f"{t.created_at:%Y-%m-%d %H:%M}",
         f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "-"]
        for t in tokens
    ]  # fmt: skip
    print_table(TOKEN_COLUMNS, rows, rows)


TOKEN_COLUMNS = (
    Col("id"), Col("role"), Col("project", wraps=True), Col("description", wraps=True), Col("created", drop=1),
    Col("revoked"),
)  # fmt: skip


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID", help="id from `token list` (or the whole token)")],
    home: HomeOpt = None,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    from freezeframe.adapters.service_store import TokenStore

    with open_service(home, None) as service:
        token = TokenStore(service.catalog).revoke(token_id)
    say(f"token {token.id} revoked")


# ---- projects -------------------------------------------------------------------------------------------------

project_app = typer.Typer(
    help="Which project an instance belongs to (for API tokens).", no_args_is_help=True, rich_markup_mode=None
)


@project_app.command("assign")
def project_assign(
    instance: Annotated[str, typer.Argument(help="instance name or UUID")],
    project: Annotated[str, typer.Argument(help="project name (with Keystone: a Keystone project name or id)")],
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Put INSTANCE in PROJECT (wins over the project in the domain's <metadata>). With FREEZEFRAME_KEYSTONE_URL set,
    PROJECT is a Keystone project name or id, and its id is recorded (what Keystone tokens carry)."""
    from freezeframe.adapters.service_store import ProjectMap
    from freezeframe.cloud_settings import CloudSettings

    cloud = CloudSettings.from_env()
    shown = project
    if cloud is not None:
        from freezeframe.adapters.keystone import resolve_project, service_session

        project, name = resolve_project(service_session(cloud), project)
        shown = f"{name} (Keystone project {project})"
    validate_project(project)
    with open_service(home, connect) as service:
        found = service.instance(instance)
        ProjectMap(service.catalog).assign(found.uuid, found.name, project)
    say(f"{found.name} ({found.uuid}) is in project {shown}")


@project_app.command("unassign")
def project_unassign(
    instance: Annotated[str, typer.Argument(help="instance name or UUID")],
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Drop the mapping of INSTANCE; the project in its domain <metadata>, if any, applies again."""
    from freezeframe.adapters.service_store import ProjectMap
    from freezeframe.api.access import ProjectResolver

    with open_service(home, connect) as service:
        found = service.instance(instance)
        mapping = ProjectMap(service.catalog)
        removed = mapping.unassign(found.uuid)
        project, source = ProjectResolver(service, mapping).of_instance(found)
    what = "removed the mapping" if removed else "had no mapping"
    say(f"{found.name}: {what}; project now {project or 'none'} ({source})")


@project_app.command("list")
def project_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """The instance -> project mappings the admin set (projects from domain metadata are not listed).

    Into a pipe: one tab-separated line per mapping, no header: instance, uuid, project, assigned.
    """
    from freezeframe.adapters.service_store import ProjectMap

    with open_service(home, None) as service:
        mappings = ProjectMap(service.catalog).all()
    if as_json:
        print_json(
            [{"instance": a.instance_name, "uuid": a.instance_uuid, "project": a.project} for a in mappings.values()]
        )
        return
    rows = [[a.instance_name, a.instance_uuid, a.project, f"{a.assigned_at:%Y-%m-%d %H:%M}"] for a in mappings.values()]
    print_table(PROJECT_COLUMNS, rows, rows)


PROJECT_COLUMNS = (Col("instance", wraps=True), Col("uuid"), Col("project", wraps=True), Col("assigned", drop=1))


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``token ...`` and ``project ...`` to the main ``freezeframe`` app."""
    app.command("serve")(serve)
    app.add_typer(token_app, name="token")
    app.add_typer(project_app, name="project")
