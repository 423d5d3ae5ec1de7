"""CLI commands for a set's lifecycle (restore, revert, delete, backup, verify, discard) over freezeframe.lifecycle.

``register(app)`` adds them to the main Typer app; shared options and output helpers come from cli_common and
cli_output. The lifecycle itself is imported when a command runs, not when the CLI starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

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
    open_service,
    parse_meta,
    print_json,
)
from freezeframe.cli_output import Col, Piece, print_table, progress_bar, say
from freezeframe.errors import InvalidRequest, SetNotFound, VerifyFailed
from freezeframe.model import Consistency
from freezeframe.validation import validate_backup_type, validate_int, validate_name

if TYPE_CHECKING:
    from freezeframe.lifecycle import Lifecycle, VerifyReport

ROTATION_MAX = 1000
"""Same bound as the API's ``rotation``."""


@contextmanager
def _lifecycle(home: Path | None, connect: str | None) -> Iterator[Lifecycle]:
    with open_service(home, connect) as service:
        yield service.lifecycle


def restore(
    set_ref: SetArg,
    as_name: Annotated[str | None, typer.Option("--as", metavar="NAME", help="name of the new instance")] = None,
    as_prefix: Annotated[
        str | None,
        typer.Option("--as-prefix", metavar="PREFIX", help="a group set: every instance, as PREFIX<instance name>"),
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="boot the new instance")] = False,
    full: Annotated[bool, typer.Option("--full", help="independent copies instead of copy-on-write")] = False,
    disk: Annotated[str | None, typer.Option("--disk", metavar="TARGET", help="restore only this disk ...")] = None,
    to: Annotated[
        Path | None,
        typer.Option("--to", metavar="PATH", help="... as a standalone image at PATH (or rbd:POOL/IMAGE)"),
    ] = None,
    image_format: Annotated[str, typer.Option("--format", metavar="FORMAT", help="image format for --disk/--to")] = (
        "qcow2"
    ),
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
    from_remote: Annotated[
        str | None, typer.Option("--from", metavar="REMOTE", help="fetch the set from this remote first")
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", metavar="HOST", help="multi-host: restore on this host's agent")
    ] = None,
) -> None:
    """Build a new instance from SET (--as NAME), or write one of its disks to a file (--disk T --to PATH)."""
    if from_remote is not None:
        with open_service(home, connect) as service:
            set_ref = service.offsite.fetch(set_ref, from_remote).id
    if as_prefix is not None:
        from freezeframe.cli_groups import restore_group_set

        if as_name or disk or to:
            raise InvalidRequest("--as-prefix restores a whole group set; it does not go with --as, --disk or --to")
        with open_service(home, connect) as service:
            restore_group_set(service, set_ref, as_prefix, start, full, as_json)
        return
    if host is not None:
        from freezeframe.cli_hosts import restore_on_host

        if not as_name or disk is not None:
            raise InvalidRequest("--host restores a whole instance: --as NAME --host HOST")
        restore_on_host(set_ref, as_name, host, start=start, full=full, as_json=as_json)
        return
    if (disk is None) != (to is None):
        raise InvalidRequest("--disk and --to go together: --disk TARGET --to PATH")
    if disk is not None and to is not None:
        if as_name or start or full:
            raise InvalidRequest("--disk/--to writes one image; --as, --start and --full build an instance")
        with _lifecycle(home, connect) as lifecycle:
            path = lifecycle.extract(set_ref, disk, to, image_format)
        image_format = "raw" if str(path).startswith("rbd:") else image_format  # an RBD image holds raw data
        if as_json:
            print_json({"set": set_ref, "disk": disk, "path": str(path), "format": image_format})
        else:
            say(f"wrote disk {disk} of set {set_ref} to {path} ({image_format})")
        return
    if not as_name:
        raise InvalidRequest("say what to restore: --as NAME (a new instance) or --disk TARGET --to PATH")
    name = validate_name(as_name, "instance name")
    with _lifecycle(home, connect) as lifecycle, progress_bar(full and not as_json, "copying") as progress:
        result = lifecycle.restore(set_ref, name, start=start, full=full, progress=progress)
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    kind = "independent copies" if result.mode == "full" else "copy-on-write over the set's members"
    say(
        "instance ", (result.name, "bold"), f" ({result.uuid}) restored from set {result.set_name}: ",
        f"{len(result.disks)} disks, {kind}", ", started" if result.started else ", defined (not started)",
    )  # fmt: skip
    for d in result.disks:
        say(f"  {d.target}: {d.path}")
    for target, why in result.left_out.items():
        say(f"  {target}: left out ({why})")


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
    say(
        f"{result.instance_name} reverted to set {result.set_id}: {', '.join(result.reverted)}",
        f"; state before the revert saved as set {result.safety_set_id}" if result.safety_set_id else "",
        f"; not in the set, left as they were: {', '.join(result.untouched)}" if result.untouched else "",
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
    """Delete SET and its data (refused while restored instances depend on it, unless --force); a group set: every
    one of its sets."""
    with open_service(home, connect) as service:
        try:
            result = service.lifecycle.delete(set_ref, force=force)
        except SetNotFound:
            from freezeframe.cli_groups import delete_group_set, find_group_set

            if find_group_set(service, set_ref) is None:
                raise
            delete_group_set(service, set_ref, force, as_json)
            return
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    say(f"deleted set {result.set_id} ({result.set_name})")
    for d in result.flattened:
        how = "blockpull (running)" if d.active else "qemu-img rebase"
        say(f"  flattened {d.instance_name} {d.target} ({d.path}) by {how}")


def backup(
    instance: Annotated[str, typer.Argument(metavar="INSTANCE", help="instance name or UUID")],
    backup_type: Annotated[str, typer.Option("--type", metavar="TYPE", help="backup type, e.g. daily or weekly")],
    rotation: Annotated[
        str, typer.Option("--rotation", metavar="N", help=f"how many backups of this type to keep, 0-{ROTATION_MAX}")
    ],
    consistency: Annotated[Consistency, typer.Option("--consistency", help="how consistent")] = Consistency.FILESYSTEM,
    require: Annotated[bool, typer.Option("--require", help="fail instead of falling back")] = False,
    name: NameOpt = None,
    meta: MetaOpt = None,
    mode: ModeOpt = "auto",
    max_chain: MaxChainOpt = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Take a backup set of INSTANCE tagged --type, then keep only the newest --rotation of that type."""
    kind = validate_backup_type(backup_type)
    keep = validate_int(rotation, "--rotation", 0, ROTATION_MAX)
    metadata, set_name, chain = parse_meta(meta), check_name(name, "set name"), chain_options(mode, max_chain)
    with _lifecycle(home, connect) as lifecycle:
        result = lifecycle.backup(
            instance, kind, keep, metadata=metadata, consistency=consistency, require=require, name=set_name, **chain
        )
    if as_json:
        from freezeframe.serialize import set_to_dict

        rotated = {"rotated_out": result.rotated_out, "kept_in_use": result.kept_in_use}
        print_json({"set": set_to_dict(result.snapshot_set, hardware=False), **rotated})
        return
    s = result.snapshot_set
    say("backup set ", (s.id, "bold"), f" ({s.name}, {s.backup_type}): {len(s.members)} disks, {s.achieved}")
    for old in result.rotated_out:
        say(f"  rotated out {old}")
    for old, why in result.kept_in_use.items():
        say(f"  kept {old}: {why}")


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


VERIFY_COLUMNS = (Col("subject"), Col("check"), Col("result"), Col("detail", wraps=True))


def _show_report(report: VerifyReport, as_json: bool) -> None:
    if as_json:
        print_json({**dataclasses.asdict(report), "ok": report.ok})
        return
    say(f"set {report.set_id} ({report.set_name})", ", booted a clone" if report.booted else "")
    rows: list[list[Piece]] = []
    plain: list[list[str]] = []
    for c in report.checks:
        result = "ok" if c.ok else ("-" if c.ok is None else "FAILED")
        rows.append([c.subject, c.what, (result, "bold red") if c.ok is False else result, c.detail])
        plain.append([c.subject, c.what, result, c.detail])
    print_table(VERIFY_COLUMNS, rows, plain)


def discard(
    name: Annotated[str, typer.Argument(metavar="NAME", help="name of an instance that `restore` or `import` made")],
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Remove an instance that `restore` or `import` made: the domain, its disks and its records."""
    with _lifecycle(home, connect) as lifecycle:
        done = lifecycle.discard(name)
    for line in done or [f"{name}: nothing left to remove"]:
        say(line)


def register(app: typer.Typer) -> None:
    """Add the lifecycle commands to the main ``freezeframe`` app."""
    app.command()(restore)
    app.command()(revert)
    app.command()(delete)
    app.command()(backup)
    app.command()(verify)
    app.command()(discard)
