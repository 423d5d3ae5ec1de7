"""CLI of off-site copies: ``remote add|list|show|remove|scan|delete``, ``copy SET --to REMOTE``.

``restore SET --from REMOTE`` is an option of ``restore`` (cli_lifecycle). Credentials are never options: boto3
reads them from the environment or ``~/.aws`` (docs/remotes.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from freezeframe.cli_common import ConnectOpt, HomeOpt, JsonOpt, SetArg, open_service, print_json
from freezeframe.cli_output import Col, print_fields, print_table, say

if TYPE_CHECKING:
    from freezeframe.ports.remote import RemoteSpec

CONTEXT = {"help_option_names": ["-h", "--help"]}

remote_app = typer.Typer(
    help="Off-site copies on S3-compatible object storage (credentials from the AWS environment/config).",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
RemoteArg = Annotated[str, typer.Argument(metavar="REMOTE", help="remote name")]


def _remote_view(spec: RemoteSpec) -> dict[str, object]:
    return {
        "name": spec.name, "url": spec.url, "bucket": spec.bucket, "prefix": spec.prefix, "endpoint": spec.endpoint,
        "region": spec.region, "encrypted": spec.encrypted, "key_file": spec.key_file,
        "created_at": spec.created_at.isoformat() if spec.created_at else None,
    }  # fmt: skip


@remote_app.command("add")
def remote_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="a name for the remote")],
    url: Annotated[str, typer.Argument(metavar="s3://BUCKET[/PREFIX]", help="bucket and optional prefix")],
    endpoint: Annotated[str | None, typer.Option("--endpoint", metavar="URL", help="S3 endpoint URL")] = None,
    region: Annotated[str | None, typer.Option("--region", metavar="REGION", help="S3 region")] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", metavar="PATH", help="encrypt copies with the key in this file")
    ] = None,
    new_key: Annotated[bool, typer.Option("--new-key", help="create a random key at --key-file first")] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Name a remote. With --key-file every copy is encrypted client-side (AES-256-GCM): lose the key, lose the
    copies."""
    from freezeframe.errors import InvalidRequest

    if new_key:
        if key_file is None:
            raise InvalidRequest("--new-key needs --key-file PATH (where to write the key)")
        from freezeframe.adapters.sealing import new_key_file

        try:
            new_key_file(key_file.absolute())
        except FileExistsError:
            raise InvalidRequest(f"--new-key: {key_file} exists already; it is never overwritten") from None
    with open_service(home, connect) as service:
        spec = service.offsite.add_remote(name, url, endpoint, region, str(key_file.absolute()) if key_file else None)
    if as_json:
        print_json(_remote_view(spec))
    else:
        say(f"remote {spec.name}: {spec.url}", " (encrypted)" if spec.encrypted else "")


@remote_app.command("list")
def remote_list(as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """The remotes."""
    with open_service(home, connect) as service:
        specs = service.offsite.remotes()
    if as_json:
        print_json([_remote_view(s) for s in specs])
        return
    rows = [[s.name, s.url, s.endpoint or "-", "yes" if s.encrypted else "no"] for s in specs]
    print_table((Col("name"), Col("url", wraps=True), Col("endpoint", drop=1), Col("encrypted")), rows, rows)


@remote_app.command("show")
def remote_show(name: RemoteArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """One remote and the sets copied there."""
    with open_service(home, connect) as service:
        spec = service.offsite.remote(name)
        copies = [c for c in service.offsite.copies() if c.remote == spec.name]
    view = {
        **_remote_view(spec),
        "sets": [c.set_id for c in copies],
        "stored_bytes": sum(c.stored_bytes for c in copies),
    }
    if as_json:
        print_json(view)
        return
    print_fields([(k, str(v)) for k, v in view.items() if k != "sets"] + [("sets", [c.set_id for c in copies])])


@remote_app.command("remove")
def remote_remove(name: RemoteArg, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Forget a remote (the copies stay in the bucket; `remote add` and `remote scan` find them again)."""
    with open_service(home, connect) as service:
        service.offsite.remove_remote(name)
    say(f"remote {name} removed (its copies stay in the bucket)")


@remote_app.command("scan")
def remote_scan(name: RemoteArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Record in the catalog every set the remote holds (disaster recovery: the catalog is rebuilt from it)."""
    with open_service(home, connect) as service:
        found = service.offsite.scan(name)
    if as_json:
        print_json([{"id": s.id, "name": s.name, "instance": s.instance_name} for s in found])
        return
    for s in found:
        say(f"{s.id}  {s.name}  ({s.instance_name}, {len(s.members)} disks)")
    say(f"{len(found)} sets on remote {name}")


@remote_app.command("delete")
def remote_delete(
    name: RemoteArg, set_ref: SetArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None
) -> None:
    """Delete a set's copy from the remote. A copy other copies build on (incremental) is kept, marked deleted, until
    the last of them is deleted."""
    with open_service(home, connect) as service:
        outcome = service.offsite.delete_copy(set_ref, name)
    if as_json:
        print_json(outcome.to_dict())
        return
    if outcome.deleted:
        say(f"deleted from remote {name}: {', '.join(outcome.deleted)}")
    if outcome.kept:
        say(f"kept on remote {name} until the copies building on it are deleted: {', '.join(outcome.kept)}")


def copy(
    set_ref: SetArg,
    to: Annotated[str, typer.Option("--to", metavar="REMOTE", help="remote to copy to")],
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Copy SET (and the sets its incremental members build on) to a remote; only what is not there is sent."""
    from freezeframe.cli_output import progress_bar

    with open_service(home, connect) as service, progress_bar(not as_json, "uploading") as progress:
        report = service.offsite.copy(set_ref, to, progress)
    if as_json:
        print_json(report.to_dict())
        return
    if not report.sets_copied:
        say(f"set {report.set_id} is on remote {report.remote} already; nothing sent")
        return
    say(
        f"copied {len(report.sets_copied)} set(s) to {report.remote}: {report.members_sent} member(s) uploaded, "
        f"{report.members_reused} already there, {report.bytes_sent} bytes sent, {report.stored_bytes} stored"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(remote_app, name="remote")
    app.command("copy")(copy)
