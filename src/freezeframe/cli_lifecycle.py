"""CLI commands for a set's lifecycle (restore, revert, delete, backup, verify, discard) over freezeframe.lifecycle.

``register(app)`` adds them to the main Typer app; shared options and output helpers come from cli_common.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from freezeframe.cli_common import ConnectOpt, HomeOpt, JsonOpt, SetArg, open_service, out, parse_meta, print_json
from freezeframe.errors import InvalidRequest, VerifyFailed
from freezeframe.lifecycle import Lifecycle, VerifyReport
from freezeframe.model import Consistency
from freezeframe.views import set_view


@contextmanager
def _lifecycle(home: Path | None, connect: str | None) -> Iterator[Lifecycle]:
    with open_service(home, connect) as service:
        yield service.lifecycle


def restore(
    set_ref: SetArg,
    as_name: Annotated[str | None, typer.Option("--as", help="name of the new instance")] = None,
    start: Annotated[bool, typer.Option("--start", help="boot the new instance")] = False,
    full: Annotated[bool, typer.Option("--full", help="independent copies instead of copy-on-write")] = False,
    disk: Annotated[str | None, typer.Option("--disk", help="restore only this disk TARGET ...")] = None,
    to: Annotated[Path | None, typer.Option("--to", help="... as a standalone image at PATH")] = None,
    image_format: Annotated[str, typer.Option("--format", help="image format for --disk/--to")] = "qcow2",
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Build a new instance from SET (--as NAME), or write one of its disks to a file (--disk T --to PATH)."""
    if (disk is None) != (to is None):
        raise InvalidRequest("--disk and --to go together: --disk TARGET --to PATH")
    if disk is not None and to is not None:
        if as_name or start or full:
            raise InvalidRequest("--disk/--to writes one image; --as, --start and --full build an instance")
        with _lifecycle(home, connect) as lifecycle:
            path = lifecycle.extract(set_ref, disk, to, image_format)
        if as_json:
            print_json({"set": set_ref, "disk": disk, "path": str(path), "format": image_format})
        else:
            out.print(f"wrote disk {disk} of set {set_ref} to {path} ({image_format})")
        return
    if not as_name:
        raise InvalidRequest("say what to restore: --as NAME (a new instance) or --disk TARGET --to PATH")
    with _lifecycle(home, connect) as lifecycle:
        result = lifecycle.restore(set_ref, as_name, start=start, full=full)
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    kind = "independent copies" if result.mode == "full" else "copy-on-write over the set's members"
    out.print(
        f"instance [bold]{result.name}[/] ({result.uuid}) restored from set {result.set_name}: "
        f"{len(result.disks)} disks, {kind}" + (", started" if result.started else ", defined (not started)")
    )
    for d in result.disks:
        out.print(f"  {d.target}: {d.path}")
    for target, why in result.left_out.items():
        out.print(f"  {target}: left out ({why})")


def revert(
    set_ref: SetArg,
    no_safety: Annotated[bool, typer.Option("--no-safety", help="do not snapshot the current state first")] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Roll SET's own (shut-off) instance back to SET, all disks together."""
    with _lifecycle(home, connect) as lifecycle:
        result = lifecycle.revert(set_ref, safety=not no_safety)
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    out.print(
        f"{result.instance_name} reverted to set {result.set_id}: {', '.join(result.reverted)}"
        + (f"; state before the revert saved as set {result.safety_set_id}" if result.safety_set_id else "")
        + (f"; not in the set, left as they were: {', '.join(result.untouched)}" if result.untouched else "")
    )


def delete(
    set_ref: SetArg,
    force: Annotated[
        bool, typer.Option("--force", help="flatten restored instances that still depend on the set first")
    ] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Delete SET and its data (refused while restored instances depend on it, unless --force)."""
    with _lifecycle(home, connect) as lifecycle:
        result = lifecycle.delete(set_ref, force=force)
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    out.print(f"deleted set {result.set_id} ({result.set_name})")
    for d in result.flattened:
        how = "blockpull (running)" if d.active else "qemu-img rebase"
        out.print(f"  flattened {d.instance_name} {d.target} ({d.path}) by {how}")


def backup(
    instance: Annotated[str, typer.Argument(help="instance name or UUID")],
    backup_type: Annotated[str, typer.Option("--type", help="backup type, e.g. daily or weekly")],
    rotation: Annotated[int, typer.Option("--rotation", help="how many backups of this type to keep")],
    consistency: Annotated[
        Consistency, typer.Option("--consistency", help="crash | filesystem | application")
    ] = Consistency.FILESYSTEM,
    require: Annotated[bool, typer.Option("--require", help="fail instead of falling back")] = False,
    name: Annotated[str | None, typer.Option("--name", help="set name")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE metadata on the set")] = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Take a backup set of INSTANCE tagged --type, then keep only the newest --rotation of that type."""
    with _lifecycle(home, connect) as lifecycle:
        result = lifecycle.backup(
            instance,
            backup_type,
            rotation,
            metadata=parse_meta(meta or []),
            consistency=consistency,
            require=require,
            name=name,
        )
    if as_json:
        print_json(
            {
                "set": set_view(result.snapshot_set, with_hardware=False),
                "rotated_out": result.rotated_out,
                "kept_in_use": result.kept_in_use,
            }
        )
        return
    s = result.snapshot_set
    out.print(f"backup set [bold]{s.id}[/] ({s.name}, {s.backup_type}): {len(s.members)} disks, {s.achieved}")
    for old in result.rotated_out:
        out.print(f"  rotated out {old}")
    for old, why in result.kept_in_use.items():
        out.print(f"  kept {old}: {why}")


def verify(
    set_ref: SetArg,
    boot: Annotated[
        bool, typer.Option("--boot", help="also boot a throw-away clone and check its agent and filesystems")
    ] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Recompute every member's SHA-256 (and with --boot, boot a clone): non-zero exit if anything fails."""
    with _lifecycle(home, connect) as lifecycle:
        report = lifecycle.verify(set_ref, boot=boot)
    _show_report(report, as_json)
    if not report.ok:
        bad = "; ".join(c.detail for c in report.failures)
        raise VerifyFailed(f"set {report.set_name} failed verification: {bad}")


def _show_report(report: VerifyReport, as_json: bool) -> None:
    if as_json:
        print_json({**dataclasses.asdict(report), "ok": report.ok})
        return
    table = Table("subject", "check", "result", "detail")
    for c in report.checks:
        result = "ok" if c.ok else ("-" if c.ok is None else "[red]FAILED[/]")
        table.add_row(c.subject, c.what, result, c.detail)
    out.print(f"set {report.set_id} ({report.set_name})" + (", booted a clone" if report.booted else ""))
    out.print(table)


def discard(
    name: Annotated[str, typer.Argument(help="name of an instance that `restore` made")],
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Remove an instance that `restore` made: the domain, its disks and its restore records."""
    with _lifecycle(home, connect) as lifecycle:
        done = lifecycle.discard(name)
    for line in done or [f"{name}: nothing left to remove"]:
        out.print(line)


def register(app: typer.Typer) -> None:
    """Add the lifecycle commands to the main ``freezeframe`` app."""
    app.command()(restore)
    app.command()(revert)
    app.command()(delete)
    app.command()(backup)
    app.command()(verify)
    app.command()(discard)
