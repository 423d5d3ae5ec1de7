"""`freezeframe group ...` and the group forms of snapshot, show, restore and delete (consistency groups).

A thin layer over ``service.groups`` (freezeframe.ops.groups); like every command module, it imports the service
and Rich only when a command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from freezeframe.cli_common import ConnectOpt, HomeOpt, JsonOpt, open_service, print_json
from freezeframe.cli_output import Col, Piece, print_fields, print_table, progress_bar, say
from freezeframe.errors import InvalidRequest
from freezeframe.model import Consistency
from freezeframe.validation import validate_backup_type, validate_int

if TYPE_CHECKING:
    from freezeframe.adapters.host_registry import HostRegistry
    from freezeframe.group_flow import GroupRequest
    from freezeframe.group_model import Group, GroupSet
    from freezeframe.ops.groups import GroupSetView
    from freezeframe.service import Freezeframe

group_app = typer.Typer(
    help="Consistency groups: several instances snapshotted at one point in time.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
GroupArg = Annotated[str, typer.Argument(metavar="NAME", help="group name")]
InstancesArg = Annotated[list[str], typer.Argument(metavar="INSTANCE...", help="instance names or UUIDs")]
ROTATION_MAX = 1000


@group_app.command("create")
def create(
    name: GroupArg,
    instances: Annotated[
        list[str] | None, typer.Argument(metavar="INSTANCE...", help="instance names or UUIDs")
    ] = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create group NAME of the INSTANCEs (checked with libvirt now; the group keeps their UUIDs)."""
    with open_service(home, connect) as service:
        _print_group(service.groups.create(name, instances or []), as_json)


@group_app.command("add")
def add(name: GroupArg, instances: InstancesArg, as_json: JsonOpt = False, connect: ConnectOpt = None,
        home: HomeOpt = None) -> None:  # fmt: skip
    """Add INSTANCEs to group NAME."""
    with open_service(home, connect) as service:
        _print_group(service.groups.add(name, instances), as_json)


@group_app.command("remove")
def remove(name: GroupArg, instances: InstancesArg, as_json: JsonOpt = False, connect: ConnectOpt = None,
           home: HomeOpt = None) -> None:  # fmt: skip
    """Take INSTANCEs out of group NAME (their sets and group sets stay)."""
    with open_service(home, connect) as service:
        _print_group(service.groups.remove(name, instances), as_json)


GROUP_COLUMNS = (Col("name", wraps=True), Col("instances", wraps=True), Col("created", drop=1))


@group_app.command("list")
def list_groups(as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """List the groups. Into a pipe: name, instances (comma-separated), created, tab-separated."""
    from freezeframe.serialize_groups import group_to_dict

    with open_service(home, connect) as service:
        groups = service.groups.list_groups()
    if as_json:
        print_json([group_to_dict(g) for g in groups])
        return
    rows = [[g.name, ", ".join(m.instance_name for m in g.members) or "-", f"{g.created_at:%Y-%m-%d %H:%M}"]
            for g in groups]  # fmt: skip
    plain = [[g.name, ",".join(m.instance_name for m in g.members), g.created_at.isoformat()] for g in groups]
    print_table(GROUP_COLUMNS, rows, plain)


@group_app.command("show")
def show(name: GroupArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Show group NAME and its instances."""
    with open_service(home, connect) as service:
        _print_group(service.groups.show(name), as_json)


@group_app.command("delete")
def delete(name: GroupArg, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Delete group NAME; its group sets stay until deleted with `freezeframe delete GROUPSET`."""
    with open_service(home, connect) as service:
        service.groups.delete(name)
    say(f"deleted group {name}")


GROUP_SET_COLUMNS = (
    Col("id"), Col("name", wraps=True), Col("group", wraps=True), Col("status"), Col("consistency", drop=1),
    Col("instances", drop=3), Col("window ms", drop=4), Col("created", drop=2),
)  # fmt: skip


@group_app.command("sets")
def sets(
    group: Annotated[str | None, typer.Option("--group", metavar="NAME", help="only this group's sets")] = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """List group sets, newest first (`show GROUPSET` lists the sets inside one)."""
    from freezeframe.serialize_groups import group_set_summary

    with open_service(home, connect) as service:
        found = service.groups.list_sets(group)
    if as_json:
        print_json([group_set_summary(g) for g in found])
        return
    rows = [_group_set_row(g, g.id[:8], f"{g.created_at:%Y-%m-%d %H:%M}") for g in found]
    print_table(GROUP_SET_COLUMNS, rows, [_group_set_row(g, g.id, g.created_at.isoformat()) for g in found])


def _group_set_row(g: GroupSet, gid: str, created: str) -> list[str]:
    window = f"{g.window_ms:.0f}" if g.window_ms is not None else "-"
    achieved = str(g.achieved or "-")
    return [gid, g.name, g.group_name, str(g.status), achieved, str(len(g.instances)), window, created]


@group_app.command("backup")
def backup(
    name: GroupArg,
    backup_type: Annotated[str, typer.Option("--type", metavar="TYPE", help="backup type, e.g. daily")],
    rotation: Annotated[str, typer.Option("--rotation", metavar="N", help="how many group backups of TYPE to keep")],
    consistency: Annotated[Consistency, typer.Option("--consistency", help="how consistent")] = Consistency.FILESYSTEM,
    require: Annotated[bool, typer.Option("--require", help="fail instead of falling back")] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """A group set of NAME tagged --type, then only the newest --rotation group sets of that type stay."""
    from freezeframe.group_flow import GroupRequest

    kind, keep = validate_backup_type(backup_type), validate_int(rotation, "--rotation", 0, ROTATION_MAX)
    request = GroupRequest(name, consistency, require, backup_type=kind)
    with open_service(home, connect) as service:
        result = service.groups.backup(request, keep)
    if as_json:
        from freezeframe.serialize_groups import group_set_to_dict

        print_json({**group_set_to_dict(result.view, hardware=False), "rotated": result.rotated, "kept": result.kept})
        return
    print_group_set(result.view)
    for gid in result.rotated:
        say(f"rotated out group set {gid}")
    for gid, why in result.kept.items():
        say(f"kept group set {gid}: {why}")


# ---- the group forms of the top-level commands ------------------------------------------------------------


def snapshot_group(
    service: Freezeframe, group: str, consistency: Consistency, require: bool, name: str | None,
    metadata: dict[str, str], as_json: bool, cap_given: bool = False,
) -> None:  # fmt: skip
    """``freezeframe snapshot --group NAME``: on this host, or - when the hosts of a multi-host deployment report
    the group's instances - as a coordinator job on their agents, the same job ``POST /v1/groups/NAME/snapshots``
    queues (``api.group_cluster.submit_group_snapshot``), followed until it ends."""
    from freezeframe.adapters.host_registry import HostRegistry
    from freezeframe.api.group_cluster import on_hosts
    from freezeframe.group_flow import GroupRequest

    request = GroupRequest(group, consistency, require, name=name, metadata=metadata)
    registry = HostRegistry(service.catalog)
    if on_hosts(registry, service.groups.show(group)):
        if cap_given:
            raise InvalidRequest("--freeze-cap: across hosts, each agent's own cap bounds the group window")
        view = _snapshot_on_hosts(service, registry, request, as_json)
    else:
        with progress_bar(not as_json, "copying") as progress:
            view = service.groups.snapshot(request, progress)
    show_group_set(view, as_json)


def _snapshot_on_hosts(service: Freezeframe, registry: HostRegistry, request: GroupRequest,
                       as_json: bool) -> GroupSetView:  # fmt: skip
    from freezeframe.api.cluster import ClusterJobs
    from freezeframe.api.group_cluster import submit_group_snapshot
    from freezeframe.api.routes_groups import GroupSnapshotCreate
    from freezeframe.cli_hosts import follow_job

    body = GroupSnapshotCreate(name=request.name, consistency=request.consistency, require=request.require,
                               metadata=request.metadata)  # fmt: skip
    cluster = ClusterJobs(service.catalog, service.settings.catalog_url, registry)
    job = submit_group_snapshot(cluster, service.groups.show(request.group), body.model_dump(mode="json"), None)
    job = follow_job(service, job, f"group {request.group} across hosts", f"group snapshot of {request.group}",
                     as_json)  # fmt: skip
    return service.groups.show_set(str((job.result or {})["group_set_id"]))


def find_group_set(service: Freezeframe, ref: str) -> GroupSetView | None:
    """For the commands that take a SET: a group set by id, id prefix or name, None when there is none."""
    from freezeframe.errors import GroupNotFound

    try:
        return service.groups.show_set(ref)
    except GroupNotFound:
        return None


def show_group_set(view: GroupSetView, as_json: bool) -> None:
    if as_json:
        from freezeframe.serialize_groups import group_set_to_dict

        print_json(group_set_to_dict(view))
        return
    print_group_set(view)


def print_group_set(view: GroupSetView) -> None:
    g = view.group_set
    consistency = str(g.achieved or "-") + (f" (asked {g.requested})" if g.achieved != g.requested else "")
    fields: list[tuple[str, Piece | list[Piece]]] = [
        ("group set", (g.id, "bold")), ("name", g.name), ("group", g.group_name), ("status", str(g.status)),
        ("consistency", consistency),
    ]  # fmt: skip
    if g.window_ms is not None:
        fields.append(("group window", f"{g.window_ms:.0f} ms"))
    if g.backup_type:
        fields.append(("backup type", g.backup_type))
    fields.append(("created", f"{g.created_at:%Y-%m-%d %H:%M:%S %Z}".strip()))
    if g.error:
        fields.append(("error", (g.error, "red")))
    lines: list[Piece] = [
        f"{s.instance_name}: set {s.id} {s.status}, {s.achieved or '-'}"
        + (f" ({s.reason})" if s.reason and s.achieved != s.requested else "")
        + f", {len(s.members)} disks"
        + (f", freeze window {s.freeze_window_ms:.0f} ms" if s.freeze_window_ms is not None else "")
        for s in view.sets
    ]
    lines += [f"{name}: no set (deleted on its own)" for name in view.missing]
    fields.append(("sets", lines or ["none"]))
    print_fields(fields)


def restore_group_set(service: Freezeframe, ref: str, prefix: str, start: bool, full: bool, as_json: bool) -> None:
    """``freezeframe restore GROUPSET --as-prefix P``: every instance, as P<instance name>; all or nothing."""
    import dataclasses

    with progress_bar(full and not as_json, "copying") as progress:
        results = service.groups.restore(ref, prefix, start=start, full=full, progress=progress)
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
        return
    for r in results:
        say("instance ", (r.name, "bold"), f" ({r.uuid}) restored from set {r.set_name}: {len(r.disks)} disks",
            ", started" if r.started else ", defined (not started)")  # fmt: skip


def delete_group_set(service: Freezeframe, ref: str, force: bool, as_json: bool) -> None:
    import dataclasses

    results = service.groups.delete_set(ref, force=force)
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
        return
    say(f"deleted group set {ref}: sets {', '.join(r.set_id for r in results) or 'none'}")


def _print_group(group: Group, as_json: bool) -> None:
    if as_json:
        from freezeframe.serialize_groups import group_to_dict

        print_json(group_to_dict(group))
        return
    members = [f"{m.instance_name} ({m.instance_uuid})" for m in group.members]
    print_fields([("group", (group.name, "bold")), ("instances", members or ["none"])])


def register(app: typer.Typer) -> None:
    app.add_typer(group_app, name="group")
