"""CLI commands to move sets across hosts: ``export``, ``import`` and ``images list|show|delete``.

``register(app)`` adds them to the main Typer app; shared options and output helpers come from cli_common and
cli_output. The export/import code is imported when a command runs, not when the CLI starts.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from freezeframe.cli_common import (
    ConnectOpt,
    HomeOpt,
    JsonOpt,
    SetArg,
    check_name,
    open_service,
    print_json,
    settings_for,
)
from freezeframe.cli_output import Col, print_fields, print_table, progress_bar, say
from freezeframe.errors import InvalidRequest
from freezeframe.validation import validate_import_storage, validate_name

if TYPE_CHECKING:
    from freezeframe.adapters.image_store import StoredImage
    from freezeframe.ops.import_build import ImportResult
    from freezeframe.portable import ExportResult, Portable
    from freezeframe.service import Freezeframe

ImageArg = Annotated[str, typer.Argument(metavar="IMAGE", help="image id, id prefix (8 characters) or name")]

images_app = typer.Typer(
    help="Packages kept in the image store (FREEZEFRAME_IMAGE_STORE).", no_args_is_help=True, rich_markup_mode=None
)


class DiskFormat(enum.StrEnum):
    QCOW2 = "qcow2"
    VMDK = "vmdk"


@contextmanager
def _portable(home: Path | None, connect: str | None) -> Iterator[Portable]:
    with open_service(home, connect) as service:
        yield service.portable


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def export(
    set_ref: SetArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="write the OVA to FILE")] = None,
    to_store: Annotated[bool, typer.Option("--to-store", help="keep the OVA in the image store instead")] = False,
    name: Annotated[
        str | None, typer.Option("--name", metavar="NAME", help="name of the stored image (default: the set's)")
    ] = None,
    disk_format: Annotated[
        DiskFormat, typer.Option("--disk-format", help="qcow2 (as captured) or vmdk (streamOptimized)")
    ] = DiskFormat.QCOW2,
    ovf_version: Annotated[int, typer.Option("--ovf-version", metavar="1|2", min=1, max=2, help="OVF 1.x or 2.x")] = 1,
    manifest_digest: Annotated[
        str | None,
        typer.Option(
            "--manifest-digest", metavar="sha1|sha256", help="manifest algorithm (default: OVF 1 sha1, 2 sha256)"
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output file")] = False,
    to_glance: Annotated[
        bool, typer.Option("--to-glance", help="upload the OVA to the configured Glance (container_format ova)")
    ] = False,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Write SET as one OVA package (descriptor, manifest, every member disk), to a file, the store or Glance."""
    if [output is not None, to_store, to_glance].count(True) != 1:
        raise InvalidRequest("say where the package goes: one of -o FILE.ova, --to-store, --to-glance")
    if to_glance:
        _export_to_glance(set_ref, name, str(disk_format), ovf_version, manifest_digest, as_json, connect, home)
        return
    if name is not None and not to_store:
        raise InvalidRequest("--name names a stored or Glance image; use it with --to-store or --to-glance")
    if force and to_store:
        raise InvalidRequest("--force replaces an output file; the store never overwrites (each export is a new image)")
    image_name = check_name(name, "image name")
    from freezeframe.portable import CollectionExportResult

    result: ExportResult | CollectionExportResult
    with open_service(home, connect) as service, progress_bar(not as_json, "exporting") as progress:
        portable = service.portable
        group_set = _is_group_set(service, set_ref)
        if group_set and output is None:
            result = portable.export_group_set_to_store(
                set_ref, name=image_name, disk_format=str(disk_format), ovf_version=ovf_version, progress=progress,
                manifest_digest=manifest_digest,
            )  # fmt: skip
        elif group_set and output is not None:
            result = portable.export_group_set(
                set_ref, output, disk_format=str(disk_format), ovf_version=ovf_version, force=force,
                progress=progress, manifest_digest=manifest_digest,
            )  # fmt: skip
        elif output is not None:
            result = portable.export(
                set_ref, output, disk_format=str(disk_format), ovf_version=ovf_version, force=force, progress=progress,
                manifest_digest=manifest_digest,
            )  # fmt: skip
        else:
            result = portable.export_to_store(
                set_ref, name=image_name, disk_format=str(disk_format), ovf_version=ovf_version, progress=progress,
                manifest_digest=manifest_digest,
            )  # fmt: skip
    if as_json:
        print_json(result.to_dict())
        return
    if isinstance(result, CollectionExportResult):
        whole = result.package
        where = f"image {whole.image.id} ({whole.image.name})" if whole.image is not None else str(whole.path)
        say(
            f"group set {result.name} exported to {where}: {len(result.sets)} instances "
            f"({', '.join(s.set_name for s in result.sets)}), {len(whole.disks)} disks as {whole.disk_format}, "
            f"OVF {whole.ovf_version}.x, {_size(whole.size)} in {whole.seconds:.1f}s"
        )
        return
    where = f"image {result.image.id} ({result.image.name})" if result.image is not None else str(result.path)
    say(
        f"set {result.set_name} exported to {where}: {len(result.disks)} disks as {result.disk_format}, "
        f"OVF {result.ovf_version}.x, {_size(result.size)} ({_size(result.allocated)} on disk) "
        f"in {result.seconds:.1f}s"
    )


def _export_to_glance(
    set_ref: str, name: str | None, disk_format: str, ovf_version: int, digest: str | None, as_json: bool,
    connect: str | None, home: Path | None,
) -> None:  # fmt: skip
    from freezeframe.glance_packages import export_to_glance, glance_from_env
    from freezeframe.ops.compute import check_display_name

    if name is not None:
        check_display_name(name)
    glance = glance_from_env()
    with open_service(home, connect) as service:
        result = export_to_glance(service, glance, set_ref, name=name, disk_format=disk_format,
                                  ovf_version=ovf_version, manifest_digest=digest)  # fmt: skip
    if as_json:
        print_json(result.to_dict())
        return
    say(f"set {result.set_id} is Glance image {result.image_id} ({result.name}): {result.status}, {result.size} bytes, "
        f"{result.container_format}/{result.disk_format}")  # fmt: skip


def _is_group_set(service: Freezeframe, ref: str) -> bool:
    """SET names a group set (and no ordinary set): ``show`` resolves it the same way."""
    from freezeframe.cli_groups import find_group_set
    from freezeframe.errors import SetNotFound

    try:
        service.show(ref)
    except SetNotFound:
        return find_group_set(service, ref) is not None
    return False


def import_(
    source: Annotated[
        str, typer.Argument(metavar="FILE.ova|IMAGE", help="an OVA file, a stored image or a Glance image id")
    ],
    as_name: Annotated[str | None, typer.Option("--as", metavar="NAME", help="name of the new instance")] = None,
    as_prefix: Annotated[
        str | None,
        typer.Option("--as-prefix", metavar="P", help="a group set's package: every instance as P<instance name>"),
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="boot the new instance")] = False,
    network: Annotated[
        str | None,
        typer.Option("--network", metavar="NETWORK", help="attach every NIC to this libvirt network (must exist)"),
    ] = None,
    storage: Annotated[
        str, typer.Option("--storage", metavar="file|rbd", help="qcow2 files (default) or new Ceph RBD images")
    ] = "file",
    pool: Annotated[str | None, typer.Option("--pool", metavar="POOL", help="Ceph pool, with --storage rbd")] = None,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """A new instance from an OVA (ours or another tool's); its disks become qcow2 in the instance's folder, or RBD
    images POOL/NAME-TARGET with --storage rbd --pool POOL. A group set's package (a VirtualSystemCollection) takes
    --as-prefix P: one instance per system."""
    if (as_name is None) == (as_prefix is None):
        raise InvalidRequest("name what is imported: --as NAME (one instance) or --as-prefix P (a group set's package)")
    validate_import_storage(storage, pool)
    if as_prefix is not None and storage != "file":
        raise InvalidRequest("--as-prefix imports every disk as a file; --storage rbd takes one instance (--as NAME)")
    with contextlib.ExitStack() as stack:
        portable = stack.enter_context(_portable(home, connect))
        package: str | Path = source
        if _from_glance(portable, source):
            from freezeframe.glance_packages import glance_from_env, glance_package

            cache = settings_for(home, connect).cache_dir
            package = stack.enter_context(glance_package(cache, glance_from_env(), source))
        progress = stack.enter_context(progress_bar(not as_json, "importing"))
        if as_prefix is not None:
            results = portable.import_collection(package, as_prefix, start=start, network=network, progress=progress)
        else:
            name = validate_name(str(as_name), "instance name")
            results = [
                portable.import_package(
                    package, name, start=start, network=network, progress=progress, storage=storage, pool=pool
                )
            ]
    if as_json:
        print_json([r.to_dict() for r in results] if as_prefix is not None else results[0].to_dict())
        return
    for result in results:
        _print_imported(result)


def _print_imported(result: ImportResult) -> None:
    for warning in result.warnings:
        say(f"freezeframe: warning: {warning}", stderr=True)
    boot = "direct kernel boot" if result.direct_kernel_boot else result.firmware.upper()
    say(
        "instance ", (result.name, "bold"), f" ({result.uuid}) imported from {result.source} ({result.origin}): ",
        f"{result.vcpus} vCPU, {result.memory_kib // 1024} MiB, {result.machine or 'default machine'}, {boot}",
        ", started" if result.started else ", defined (not started)",
    )  # fmt: skip
    for d in result.disks:
        say(f"  {d.target} ({d.bus}): {d.path} <- {d.source}")
    for nic in result.nics:
        say(f"  nic: {nic}")
    for target, why in result.left_out.items():
        say(f"  {target}: left out ({why})")


def _from_glance(portable: Portable, source: str) -> bool:
    """A UUID that is no file and no stored image, with a Glance configured: a Glance image id."""
    from freezeframe.cloud_settings import CloudSettings
    from freezeframe.glance_packages import looks_like_glance_id

    if not looks_like_glance_id(source) or CloudSettings.from_env() is None:
        return False
    return all(image.id != source for image in portable.images())


IMAGE_COLUMNS = (
    Col("id"),
    Col("name", wraps=True),
    Col("set", drop=5),
    Col("vcpus", drop=3),
    Col("memory", drop=2),
    Col("disks", wraps=True),
    Col("format", drop=4),
    Col("size"),
    Col("created", drop=1),
)


def _image_row(image: StoredImage, short: bool) -> list[str]:
    s = image.summary
    cut = 8 if short else None
    return [
        image.id[:cut],
        image.name,
        (image.source_set_id or "-")[:cut],
        f"{s.vcpus}",
        _size(s.memory_bytes),
        ", ".join(f"{d.target}:{_size(d.capacity)}" for d in s.disks),
        f"{s.disk_format}/OVF{s.ovf_version}",
        _size(image.size),
        f"{image.created_at:%Y-%m-%d %H:%M}" if short else image.created_at.isoformat(timespec="seconds"),
    ]


@images_app.command("list")
def images_list(as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """List the stored images, newest first.

    Into a pipe: one tab-separated line per image, no header: id, name, source set id, vcpus, memory, disks,
    format, size, created (ISO 8601 UTC).
    """
    with _portable(home, connect) as portable:
        found = portable.images()
    if as_json:
        print_json([i.to_dict() for i in found])
        return
    print_table(IMAGE_COLUMNS, [_image_row(i, True) for i in found], [_image_row(i, False) for i in found])


@images_app.command("show")
def images_show(
    image_ref: ImageArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None
) -> None:
    """Show one stored image: record and descriptor summary."""
    with _portable(home, connect) as portable:
        image = portable.image(image_ref)
    if as_json:
        print_json(image.to_dict())
        return
    s = image.summary
    disks = [
        f"{d.target}: {_size(d.capacity)}, {d.format or '-'}, file "
        f"{d.file_size if d.file_size is not None else '-'} bytes, controller {d.controller or '-'}"
        for d in s.disks
    ]
    print_fields([
        ("id", (image.id, "bold")),
        ("name", image.name),
        ("source set", image.source_set_id or "-"),
        ("size", f"{image.size} bytes"),
        ("sha256", image.sha256),
        ("created", image.created_at.isoformat()),
        ("location", str(image.location)),
        ("machine", f"{s.machine_name}: {s.vcpus} vCPU, {_size(s.memory_bytes)}, {s.arch or '-'}, {s.firmware or '-'}"),
        ("package", f"OVF {s.ovf_version}.x, disks as {s.disk_format}"),
        ("disks", disks or ["none"]),
        ("nics", [f"{nic.model or '-'} on {nic.network or '-'}" for nic in s.nics] or ["none"]),
    ])  # fmt: skip


@images_app.command("delete")
def images_delete(
    image_ref: ImageArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None
) -> None:
    """Delete a stored image (its record and its package)."""
    with _portable(home, connect) as portable:
        image = portable.delete_image(image_ref)
    if as_json:
        print_json({"deleted": image.id, "name": image.name})
        return
    say(f"deleted image {image.id} ({image.name})")


def register(app: typer.Typer) -> None:
    """Add ``export``, ``import`` and ``images ...`` to the main ``freezeframe`` app."""
    app.command("export")(export)
    app.command("import")(import_)
    app.add_typer(images_app, name="images")
