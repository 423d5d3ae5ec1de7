"""Write an OVA in one pass without staging disk copies.

An OVA is a POSIX ustar tar: the .ovf first, then the .mf manifest, then the files in References
order. The descriptor needs the disk files' sizes and the manifest their digests, yet both come
first. So the writer reserves a padded region for descriptor + manifest at the start, streams each
disk straight into its final place (``disk_writer``), patches each tar header afterwards, and fills
the reserved region last. The package is private to its owner (0600) and appears only when complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from freezeframe.adapters.ova import disk_writer
from freezeframe.adapters.ova.disk_writer import OvaDiskSource, PreparedDisk, Progress, prepare
from freezeframe.adapters.ova.manifest import format_manifest, manifest_algorithm
from freezeframe.adapters.ova.tar import BLOCK, RECORD, round_up, ustar_header
from freezeframe.adapters.ovf import OvfDisk, parse_descriptor
from freezeframe.durable import fsync_path
from freezeframe.errors import OvaNoSpace, OvaWriteError
from freezeframe.ports import ProgressCallback

PACKAGE_MODE = 0o600  # guest disks inside: readable by their owner only
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PLACEHOLDER_SIZE = 10**19 - 1  # widest ovf:size we will ever write: reserves room in the descriptor slot

DescriptorFactory = Callable[[Sequence[OvfDisk]], bytes]
"""Builds the descriptor once the package's disk files (and so their sizes) are known."""


@dataclass(frozen=True)
class OvaWrittenMember:
    name: str
    offset: int
    size: int
    digest: str
    """Hex digest with the package's manifest algorithm (``OvaResult.digest``)."""


@dataclass(frozen=True)
class OvaResult:
    path: Path
    size: int
    descriptor: bytes
    manifest: bytes
    disks: tuple[OvfDisk, ...]
    members: tuple[OvaWrittenMember, ...]
    seconds: float
    digest: str = "sha256"
    """The manifest's algorithm (hashlib name)."""


@dataclass(frozen=True)
class _Head:
    """The region reserved at the start of the package: descriptor slot, then the manifest."""

    descriptor_name: str
    manifest_name: str
    ovf_slot: int
    manifest_size: int
    digest: str

    @property
    def size(self) -> int:
        return BLOCK + self.ovf_slot + BLOCK + round_up(self.manifest_size)


@dataclass(frozen=True)
class _Body:
    size: int
    descriptor: bytes
    manifest: bytes
    written: list[OvaWrittenMember]
    disks: list[OvfDisk]


def _check_names(descriptor_name: str, disks: Sequence[OvaDiskSource]) -> str:
    if not _SAFE_NAME.match(descriptor_name) or not descriptor_name.endswith(".ovf"):
        raise OvaWriteError(f"descriptor name {descriptor_name!r} must be a plain file name ending in .ovf")
    manifest_name = descriptor_name[: -len(".ovf")] + ".mf"
    seen = {descriptor_name, manifest_name}
    for disk in disks:
        if not _SAFE_NAME.match(disk.href) or ".." in disk.href:
            raise OvaWriteError(f"disk file name {disk.href!r} must be a plain file name")
        if disk.href in seen:
            raise OvaWriteError(f"file name {disk.href!r} is used twice in the package")
        seen.add(disk.href)
    return manifest_name


def _ovf_disk(prepared: PreparedDisk, size: int) -> OvfDisk:
    src = prepared.source
    fmt = "vmdk" if src.mode == "vmdk" else src.source_format
    return OvfDisk(
        target=src.target,
        href=src.href,
        file_size=size,
        format=fmt,
        capacity=prepared.capacity,
        populated_size=prepared.populated,
    )


def _check_descriptor_sizes(descriptor: bytes, disks: Sequence[OvfDisk]) -> None:
    machine = parse_descriptor(descriptor)
    sizes = {ref.href: ref.size for ref in machine.files}
    for disk in disks:
        declared = sizes.get(disk.href)
        if disk.href not in sizes:
            raise OvaWriteError(f"the descriptor does not reference {disk.href!r}")
        if declared is not None and declared != disk.file_size:
            raise OvaWriteError(
                f"the descriptor says {disk.href!r} is {declared} bytes but it is {disk.file_size}; "
                "pass a descriptor factory when disks are converted"
            )


def _write_disks(
    out: IO[bytes],
    tmp_path: Path,
    workdir: Path,
    prepared: Sequence[PreparedDisk],
    start: int,
    mtime: int,
    ticker: Progress,
    algorithm: str,
) -> tuple[int, list[OvaWrittenMember], list[OvfDisk]]:
    """Each disk after its header, padded to a block; returns the end offset, members and final disks."""
    pos = start
    placed: list[tuple[PreparedDisk, int, int, Future[str] | str]] = []
    # A converted disk is hashed by re-reading it; that runs in a thread while the next disk converts.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ova-hash") as hasher:
        for item in prepared:
            data = pos + BLOCK
            digest: Future[str] | str
            if item.source.mode == "copy":
                size, digest = disk_writer.copy_hashed(item.source.path, out, data, ticker, algorithm)
            else:
                size = disk_writer.convert_vmdk(item, out, tmp_path, data, workdir, ticker)
                out.flush()
                digest = hasher.submit(disk_writer.hash_region, out.fileno(), data, size, algorithm)
            end = data + size
            padded = round_up(end)
            out.seek(end)
            out.write(bytes(padded - end))
            out.seek(pos)
            out.write(ustar_header(item.source.href, size, mtime))
            placed.append((item, data, size, digest))
            pos = padded
        written = [
            OvaWrittenMember(item.source.href, data, size, d if isinstance(d, str) else d.result())
            for item, data, size, d in placed
        ]
    return pos, written, [_ovf_disk(item, size) for item, _, size, _ in placed]


def _final_descriptor(descriptor: bytes | DescriptorFactory, head: _Head, disks: Sequence[OvfDisk]) -> bytes:
    if not callable(descriptor):
        _check_descriptor_sizes(descriptor, disks)
        return descriptor
    final = descriptor(disks)
    if len(final) > head.ovf_slot:
        raise OvaWriteError("the descriptor grew beyond the space reserved for it")
    if round_up(len(final)) < head.ovf_slot:
        # XML allows trailing whitespace: fill the slot so the tar has no gap.
        final = final + b" " * (head.ovf_slot - len(final) - 1) + b"\n"
    return final


def _write_body(
    out: IO[bytes],
    tmp_path: Path,
    workdir: Path,
    prepared: Sequence[PreparedDisk],
    descriptor: bytes | DescriptorFactory,
    head: _Head,
    ticker: Progress,
) -> _Body:
    """Disks first (after the reserved head), then the trailer, then descriptor + manifest in the head."""
    mtime = int(time.time())
    out.truncate(head.size)
    pos, written, final_disks = _write_disks(out, tmp_path, workdir, prepared, head.size, mtime, ticker, head.digest)
    trailer = round_up(pos + 2 * BLOCK, RECORD) - pos
    out.seek(pos)
    out.write(bytes(trailer))

    final = _final_descriptor(descriptor, head, final_disks)
    ovf_digest = hashlib.new(head.digest, final).hexdigest()
    entries = [(head.descriptor_name, ovf_digest), *((w.name, w.digest) for w in written)]
    manifest = format_manifest(entries, head.digest)
    if len(manifest) != head.manifest_size:
        raise OvaWriteError("internal error: manifest size changed")
    out.seek(0)
    out.write(ustar_header(head.descriptor_name, len(final), mtime))
    out.write(final)
    out.write(bytes(head.ovf_slot - len(final)))
    out.write(ustar_header(head.manifest_name, len(manifest), mtime))
    out.write(manifest)
    out.write(bytes(round_up(head.manifest_size) - head.manifest_size))
    if out.tell() != head.size:
        raise OvaWriteError("internal error: package head has the wrong size")
    return _Body(pos + trailer, final, manifest, written, final_disks)


def _plan_head(
    descriptor_name: str,
    manifest_name: str,
    descriptor: bytes | DescriptorFactory,
    prepared: Sequence[PreparedDisk],
    digest: str,
) -> _Head:
    if callable(descriptor):
        probe = descriptor([_ovf_disk(p, _PLACEHOLDER_SIZE) for p in prepared])
        ovf_slot = round_up(len(probe)) + BLOCK
    else:
        ovf_slot = round_up(len(descriptor))
    names = [descriptor_name, *(p.source.href for p in prepared)]
    width = hashlib.new(digest).digest_size * 2
    manifest_size = len(format_manifest([(n, "0" * width) for n in names], digest))
    return _Head(descriptor_name, manifest_name, ovf_slot, manifest_size, digest)


def _write_file(
    out_path: Path,
    prepared: Sequence[PreparedDisk],
    descriptor: bytes | DescriptorFactory,
    head: _Head,
    ticker: Progress,
) -> _Body:
    """Write under a temporary name next to ``out_path`` (mode 0600), fsync, rename; remove it on any error."""
    parent = out_path.parent.resolve()
    workdir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_path.name}.", suffix=".work"))
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{out_path.name}.", suffix=".part")
        tmp_path = Path(tmp_name)
        try:
            os.fchmod(fd, PACKAGE_MODE)
            with os.fdopen(fd, "r+b") as out:
                body = _write_body(out, tmp_path, workdir, prepared, descriptor, head, ticker)
                out.flush()
                os.fsync(out.fileno())
            tmp_path.replace(out_path)
            fsync_path(parent)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OvaNoSpace(f"no space left on the device holding {out_path}") from exc
            raise OvaWriteError(f"writing {out_path} failed: {exc}") from exc
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return body


def write_ova(
    out_path: Path,
    descriptor_name: str,
    descriptor: bytes | DescriptorFactory,
    disks: Sequence[OvaDiskSource],
    progress: ProgressCallback | None = None,
    digest: str = "sha256",
) -> OvaResult:
    """Write an OVA (ustar: .ovf, .mf with ``digest`` lines (sha1 or sha256), disks in order) without staging disk
    copies.

    ``descriptor`` is either final bytes (only possible when every disk is copied as is, since
    converted sizes are unknown beforehand) or a factory called with the disks' final sizes. The file
    is written next to ``out_path`` under a temporary name and renamed at the end; on any error the
    partial file is removed. Memory stays at a few 4 MiB buffers whatever the disk sizes.
    """
    started = time.monotonic()
    manifest_name = _check_names(descriptor_name, disks)
    manifest_algorithm(digest)
    if out_path.exists():
        raise OvaWriteError(f"{out_path} already exists")
    parent = out_path.parent.resolve()
    if not parent.is_dir():
        raise OvaWriteError(f"directory {parent} does not exist")

    prepared = [prepare(d) for d in disks]
    known = sum(p.file_size or 0 for p in prepared)
    stat = os.statvfs(parent)
    if known > stat.f_bavail * stat.f_frsize:
        raise OvaNoSpace(f"{parent} has {stat.f_bavail * stat.f_frsize} bytes free, the disks to copy need {known}")
    head = _plan_head(descriptor_name, manifest_name, descriptor, prepared, digest)
    body = _write_file(out_path, prepared, descriptor, head, Progress(progress, sum(p.work for p in prepared)))
    members = (
        OvaWrittenMember(
            descriptor_name, BLOCK, len(body.descriptor), hashlib.new(digest, body.descriptor).hexdigest()
        ),
        OvaWrittenMember(
            manifest_name, 2 * BLOCK + head.ovf_slot, len(body.manifest), hashlib.new(digest, body.manifest).hexdigest()
        ),
        *body.written,
    )
    return OvaResult(
        path=out_path,
        size=body.size,
        descriptor=body.descriptor,
        manifest=body.manifest,
        disks=tuple(body.disks),
        members=members,
        seconds=time.monotonic() - started,
        digest=digest,
    )
