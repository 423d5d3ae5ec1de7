"""The `freezeframe` command: a thin Typer layer over freezeframe.service."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.table import Table

from freezeframe.cli_common import (
    ConnectOpt,
    HomeOpt,
    JsonOpt,
    err,
    open_service,
    out,
    parse_meta,
    print_json,
    progress_bar,
)
from freezeframe.cli_lifecycle import register as register_lifecycle
from freezeframe.cli_portable import register as register_portable
from freezeframe.cli_service import register as register_service
from freezeframe.errors import FreezeframeError
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SetStatus
from freezeframe.signals import install_termination_handler
from freezeframe.views import instance_view, set_view

app = typer.Typer(
    help="Instance-level snapshots: every disk of a libvirt/QEMU instance at one point in time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def snapshot(
    instance: Annotated[str, typer.Argument(help="instance name or UUID")],
    consistency: Annotated[
        Consistency, typer.Option("--consistency", help="crash | filesystem | application")
    ] = Consistency.FILESYSTEM,
    require: Annotated[bool, typer.Option("--require", help="fail instead of falling back to a lower level")] = False,
    name: Annotated[str | None, typer.Option("--name", help="set name")] = None,
    exclude_disk: Annotated[list[str] | None, typer.Option("--exclude-disk", help="leave out disk TARGET")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE metadata on the set")] = None,
    pause: Annotated[bool, typer.Option("--pause", help="also pause the vCPUs around the capture")] = False,
    freeze_cap: Annotated[
        float | None, typer.Option("--freeze-cap", help="hard cap on the freeze window, seconds (default 10)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="wait for the copy; --no-wait returns once the guest is released")
    ] = True,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Snapshot the root disk and every attached volume of INSTANCE as one set."""
    request = SnapshotRequest(
        instance=instance,
        consistency=consistency,
        require=require,
        name=name,
        exclude_disks=tuple(exclude_disk or ()),
        metadata=parse_meta(meta or []),
        pause_vcpus=pause,
    )
    with open_service(home, connect, freeze_cap) as service, progress_bar(not as_json, "copying") as progress:
        result = service.snapshot(request, progress, wait=wait)
    if as_json:
        print_json(set_view(result))
        return
    c = result
    out.print(
        f"set [bold]{c.id}[/] ({c.name}) {c.status}: {len(c.members)} disks, consistency {c.achieved}"
        + (f" (asked {c.requested}: {c.reason})" if c.achieved != c.requested else "")
        + (f", freeze window {c.freeze_window_ms:.0f} ms" if c.freeze_window_ms is not None else "")
        + (f", pause window {c.pause_window_ms:.0f} ms" if c.pause_window_ms is not None else "")
    )


@app.command("list")
def list_sets(
    instance: Annotated[str | None, typer.Option("--instance", help="only sets of this instance")] = None,
    status: Annotated[SetStatus | None, typer.Option("--status")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE filter")] = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """List snapshot sets, newest first."""
    with open_service(home, connect) as service:
        sets = service.list_sets(instance=instance, status=status, metadata=parse_meta(meta or []) or None)
    if as_json:
        print_json([set_view(s, with_hardware=False) for s in sets])
        return
    table = Table("id", "name", "instance", "status", "consistency", "disks", "freeze ms", "created")
    for s in sets:
        table.add_row(
            s.id[:8],
            s.name,
            s.instance_name,
            str(s.status),
            str(s.achieved or "-"),
            str(len(s.members)),
            f"{s.freeze_window_ms:.0f}" if s.freeze_window_ms is not None else "-",
            f"{s.created_at:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)


@app.command()
def show(
    set_ref: Annotated[str, typer.Argument(metavar="SET", help="set id, id prefix or name")],
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Show one snapshot set and its members."""
    with open_service(home, connect) as service:
        s = service.show(set_ref)
    if as_json:
        print_json(set_view(s))
        return
    view = set_view(s, with_hardware=False)
    for key in ("id", "name", "status", "instance", "consistency", "freeze_window_ms", "pause_window_ms",
                "created_at", "completed_at", "metadata", "error"):  # fmt: skip
        out.print(f"[bold]{key}[/]: {view[key]}")
    table = Table("target", "size", "format", "sha256", "path")
    for m in s.members:
        table.add_row(m.target, f"{m.virtual_size / 2**20:.0f} MiB", m.format, (m.sha256 or "-")[:16], m.path)
    out.print(table)


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
    out.print(f"set {result.id} {result.status}")


@app.command()
def repair(
    instance: Annotated[str | None, typer.Argument(help="only this instance")] = None,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Thaw/resume guests and clean up operations that a killed freezeframe process left behind."""
    with open_service(home, connect) as service:
        reports = service.repair(instance)
    for line in reports or ["nothing to repair"]:
        out.print(line)


@app.command()
def instances(as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """List the instances libvirt has, with their disks."""
    with open_service(home, connect) as service:
        found = service.instances()
    if as_json:
        print_json([instance_view(i) for i in found])
        return
    table = Table("name", "uuid", "state", "disks")
    for i in found:
        table.add_row(i.name, i.uuid, str(i.state), ", ".join(d.target for d in i.hardware.disks))
    out.print(table)


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="where the demo disks go (default: a temp dir)")
    ] = None,
) -> None:
    """Boot a 3-disk demo instance under the ledger workload, snapshot it at each level, check the images."""
    from freezeframe.demo import run_demo

    run_demo(out, workdir)


register_lifecycle(app)
register_portable(app)
register_service(app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="freezeframe: %(levelname)s: %(message)s")
    install_termination_handler()
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
        raise SystemExit(code if isinstance(code, int) else 0)
    except click.exceptions.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (click.exceptions.Abort, EOFError):
        raise SystemExit(130) from None
    except FreezeframeError as exc:
        err.print(f"freezeframe: error: {exc}", markup=False, highlight=False)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        err.print(f"freezeframe: {exc or 'interrupted'}", markup=False, highlight=False)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
