"""The `freezeframe` command: a thin Typer layer over freezeframe.service.

Starting must be quick (``--help``, ``list``): this module imports only Typer, the model's enums and the CLI's
own helpers. The service, its adapters, the HTTP API and Rich are imported inside the commands that use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from freezeframe import __version__
from freezeframe.cli_common import (
    ConnectOpt,
    HomeOpt,
    JsonOpt,
    MaxChainOpt,
    MetaOpt,
    ModeOpt,
    NameOpt,
    SetArg,
    chain_options,
    check_name,
    freeze_cap,
    open_service,
    parse_meta,
    print_json,
)
from freezeframe.cli_groups import register as register_groups
from freezeframe.cli_hosts import register as register_hosts
from freezeframe.cli_lifecycle import register as register_lifecycle
from freezeframe.cli_output import Col, Piece, print_fields, print_table, progress_bar, say
from freezeframe.cli_policy import register as register_policy
from freezeframe.cli_portable import register as register_portable
from freezeframe.cli_remote import register as register_remote
from freezeframe.cli_service import register as register_service
from freezeframe.cli_testbed import register as register_testbed
from freezeframe.errors import InvalidRequest, SetNotFound
from freezeframe.model import Consistency, SetStatus

if TYPE_CHECKING:
    from freezeframe.model import Instance, Member, SnapshotSet

CONTEXT = {"help_option_names": ["-h", "--help"]}
"""``-h`` everywhere: subcommands inherit their parent's help options."""

app = typer.Typer(
    help="Instance-level snapshots: every disk of a libvirt/QEMU instance at one point in time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"freezeframe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Instance-level snapshots: every disk of a libvirt/QEMU instance at one point in time."""


@app.command()
def snapshot(
    instance: Annotated[str | None, typer.Argument(metavar="[INSTANCE]", help="instance name or UUID")] = None,
    group: Annotated[
        str | None, typer.Option("--group", metavar="NAME", help="every instance of this group at one point in time")
    ] = None,
    consistency: Annotated[Consistency, typer.Option("--consistency", help="how consistent")] = Consistency.FILESYSTEM,
    require: Annotated[bool, typer.Option("--require", help="fail instead of falling back to a lower level")] = False,
    name: NameOpt = None,
    exclude_disk: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-disk", metavar="TARGET", help="leave out this disk; repeat for more", show_default=False
        ),
    ] = None,
    meta: MetaOpt = None,
    pause: Annotated[bool, typer.Option("--pause", help="also pause the vCPUs around the capture")] = False,
    cap: Annotated[
        str | None,
        typer.Option("--freeze-cap", metavar="SECONDS", help="hard cap on the freeze window, 0.1-300 (default 10)"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="wait for the copy; --no-wait returns once the guest is released")
    ] = True,
    mode: ModeOpt = "auto",
    max_chain: MaxChainOpt = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Snapshot the root disk and every attached volume of INSTANCE as one set (--group NAME: of every instance
    of the group, at one point in time, as one group set)."""
    from freezeframe.flow import SnapshotRequest

    if instance is not None and group is not None:
        raise InvalidRequest("snapshot INSTANCE or --group NAME, not both")
    if group is not None:
        from freezeframe.cli_groups import snapshot_group

        if exclude_disk or pause or not wait or mode != "auto" or max_chain is not None:
            raise InvalidRequest("--group takes --consistency, --require, --name, --meta and --freeze-cap only")
        with open_service(home, connect, freeze_cap(cap)) as service:
            snapshot_group(service, group, consistency, require, check_name(name, "group set name"),
                           parse_meta(meta), as_json, cap_given=cap is not None)  # fmt: skip
        return
    if instance is None:
        raise typer.BadParameter("Missing argument 'INSTANCE' (or --group NAME)", param_hint="INSTANCE")
    request = SnapshotRequest(
        instance=instance,
        consistency=consistency,
        require=require,
        name=check_name(name, "set name"),
        exclude_disks=tuple(exclude_disk or ()),
        metadata=parse_meta(meta),
        pause_vcpus=pause,
        **chain_options(mode, max_chain),
    )
    with open_service(home, connect, freeze_cap(cap)) as service, progress_bar(not as_json, "copying") as progress:
        result = service.snapshot(request, progress, wait=wait)
    if as_json:
        print_json(_set_view(result))
        return
    c = result
    say(
        "set ", (c.id, "bold"), f" ({c.name}) {c.status}: {len(c.members)} disks, consistency {c.achieved}",
        f" (asked {c.requested}: {c.reason})" if c.achieved != c.requested else "",
        f", freeze window {c.freeze_window_ms:.0f} ms" if c.freeze_window_ms is not None else "",
        f", pause window {c.pause_window_ms:.0f} ms" if c.pause_window_ms is not None else "",
    )  # fmt: skip


@app.command("list")
def list_sets(
    instance: Annotated[
        str | None, typer.Option("--instance", metavar="INSTANCE", help="only sets of this instance (name or UUID)")
    ] = None,
    status: Annotated[SetStatus | None, typer.Option("--status", help="only sets in this state")] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", metavar="KEY=VALUE", help="only sets with this metadata; repeat for more"),
    ] = None,
    backup_type: Annotated[str | None, typer.Option("--backup-type", help="only sets of this backup type")] = None,
    project: Annotated[str | None, typer.Option("--project", help="only sets pinned to this project")] = None,
    group: Annotated[str | None, typer.Option("--group", help="only sets taken with this consistency group")] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", metavar="full|incremental", help="only sets of this kind")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="only sets whose members live on this host")] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="TIME", help="created at or after: ISO 8601 or an age (36h, 7d)")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", metavar="TIME", help="created before (as --since)")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="sets per page")] = 20,
    cursor: Annotated[
        str | None, typer.Option("--cursor", metavar="CURSOR", help="start after this cursor (printed with a page)")
    ] = None,
    show_all: Annotated[bool, typer.Option("--all", help="every matching set, streamed as it is read")] = False,
    count: Annotated[bool, typer.Option("--count", help="also print the exact number of matching sets")] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """List snapshot sets, newest first: the newest page (--limit, default 20), or --all.

    On a terminal: a table with 8-character ids (`show` accepts them). Into a pipe: one tab-separated line per
    set, no header: id, name, instance, status, consistency, disks, freeze window ms, created (ISO 8601 UTC).
    Whether more sets follow, and the --cursor of the next page, go to stderr. Filters run in the catalog.
    """
    from freezeframe.cli_list import copies_lookup, list_all, list_page
    from freezeframe.set_query import Cursor, SetFilter, parse_time

    wanted = SetFilter(
        instance=instance, status=status, backup_type=backup_type, metadata=parse_meta(meta), project=project,
        group=group, kind=kind, host=host, since=parse_time(since, "--since") if since else None,
        until=parse_time(until, "--until") if until else None,
    )  # fmt: skip
    after = Cursor.decode(cursor) if cursor is not None else None
    with open_service(home, connect) as service:
        if show_all:
            list_all(service, wanted, after, as_json, copies_lookup(service))
        else:
            list_page(service, wanted, limit, after, as_json, copies_lookup(service))
        if count:
            say(f"total: {service.count_sets(wanted)} matching set(s)", stderr=True)


@app.command()
def show(set_ref: SetArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Show one snapshot set and its members, or a group set and its sets."""
    with open_service(home, connect) as service:
        try:
            s = service.show(set_ref)
        except SetNotFound:
            from freezeframe.cli_groups import find_group_set, show_group_set

            view = find_group_set(service, set_ref)
            if view is None:
                raise
            show_group_set(view, as_json)
            return
    if as_json:
        print_json(_set_view(s))
        return
    print_fields(set_fields(s))


def set_fields(s: SnapshotSet) -> list[tuple[str, Piece | list[Piece]]]:
    """A set for people: nested fields on their own lines, optional ones only when they have a value."""
    consistency = str(s.achieved or "-")
    if s.achieved != s.requested:
        consistency += f" (asked {s.requested}" + (f": {s.reason})" if s.reason else ")")
    fields: list[tuple[str, Piece | list[Piece]]] = [
        ("id", (s.id, "bold")),
        ("name", s.name),
        ("status", str(s.status)),
        ("instance", f"{s.instance_name} ({s.instance_uuid})" + (f", {s.instance_state}" if s.instance_state else "")),
        ("consistency", consistency),
    ]
    if s.backup_type:
        fields.append(("backup type", s.backup_type))
    for key, ms in (("freeze window", s.freeze_window_ms), ("pause window", s.pause_window_ms)):
        if ms is not None:
            fields.append((key, f"{ms:.0f} ms"))
    fields.append(("created", f"{s.created_at:%Y-%m-%d %H:%M:%S %Z}".strip()))
    if s.completed_at:
        fields.append(("completed", f"{s.completed_at:%Y-%m-%d %H:%M:%S %Z}".strip()))
    if s.metadata:
        fields.append(("metadata", [f"{key}: {value}" for key, value in sorted(s.metadata.items())]))
    if s.error:
        fields.append(("error", (s.error, "red")))
    fields.append(("members", [_member_line(m) for m in s.members] or ["none"]))
    return fields


def _member_line(m: Member) -> str:
    from freezeframe.serialize import chain_fields

    size = f"{m.virtual_size / 2**20:.0f} MiB"
    chain, kind = chain_fields(m), ""
    if "freezeframe.kind" in m.metadata:  # sets from before incremental sets say nothing about it
        kind = f"incremental over {chain['parent_set']}, " if chain["parent_set"] else "full, "
        if chain.get("full_reason"):
            kind = f"full ({chain['full_reason']}), "
        if chain["bytes_written"] is not None:
            kind += f"{chain['bytes_written'] / 2**20:.1f} MiB written, "
    return f"{m.target} ({m.bus}): {size} {m.format}, {kind}{m.path}, sha256 {m.sha256 or '-'}"


@app.command("_complete", hidden=True)
def complete(
    set_id: str,
    lock_fd: Annotated[int, typer.Option("--lock-fd")],
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Internal: finish a --no-wait snapshot, holding the instance lock inherited from its parent."""
    with open_service(home, connect) as service:
        result = service.complete(set_id, lock_fd)
    say(f"set {result.id} {result.status}")


@app.command()
def repair(
    instance: Annotated[str | None, typer.Argument(metavar="INSTANCE", help="only this instance")] = None,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Thaw/resume guests and clean up operations that a killed freezeframe process left behind."""
    with open_service(home, connect) as service:
        reports = service.repair(instance)
    for line in reports or ["nothing to repair"]:
        say(line)


INSTANCE_COLUMNS = (Col("name", wraps=True), Col("uuid"), Col("state"), Col("disks", wraps=True))


@app.command()
def instances(as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """List the instances libvirt has, with their disks.

    Into a pipe: one tab-separated line per instance, no header: name, uuid, state, disk targets (comma-separated).
    """
    with open_service(home, connect) as service:
        found = service.instances()
    if as_json:
        from freezeframe.serialize import instance_to_dict

        print_json([instance_to_dict(i) for i in found])
        return
    rows = [_instance_row(i, ", ") for i in found]
    print_table(INSTANCE_COLUMNS, rows, [_instance_row(i, ",") for i in found])


def _instance_row(i: Instance, comma: str) -> list[str]:
    return [i.name, i.uuid, str(i.state), comma.join(d.target for d in i.hardware.disks) or "-"]


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option("--workdir", metavar="DIR", help="where the demo disks go (default: a temp dir)")
    ] = None,
) -> None:
    """Boot a 3-disk demo instance under the ledger workload, snapshot it at each level, check the images."""
    from freezeframe.demo import run_demo

    run_demo(workdir)


def _set_view(s: SnapshotSet, hardware: bool = True) -> dict[str, object]:
    from freezeframe.serialize import set_to_dict

    return set_to_dict(s, hardware=hardware)


register_lifecycle(app)
register_portable(app)
register_service(app)
register_testbed(app)
register_remote(app)
register_policy(app)
register_groups(app)
register_hosts(app)


def main() -> None:
    """The console script: one line and an exit code for anything that goes wrong (see cli_errors)."""
    from freezeframe.cli_errors import configure_logging, run
    from freezeframe.signals import install_termination_handler

    configure_logging()
    install_termination_handler()
    raise SystemExit(run(typer.main.get_command(app)))


if __name__ == "__main__":
    main()
