"""OVA packages: a streaming writer and a defensive reader.

An OVA is a POSIX ustar tar: the .ovf first, then the .mf manifest, then the files in References order.
The descriptor needs the disk files' sizes and the manifest their digests, yet both come first, and
disks can be far larger than memory or free space for a second copy. So the writer reserves a padded
region for descriptor + manifest at the start, streams each disk straight into its final place
(hashing on the way, or converting in place with qemu-img), patches each tar header afterwards, and
fills the reserved region last. The reader refuses anything that could escape the package (paths,
links, devices, qemu backing files) and verifies the manifest before anything else is believed.
See docs/ovf.md.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from freezeframe.adapters.ovf import MAX_DESCRIPTOR_BYTES, ImportedDisk, ImportedMachine, OvfDisk, parse_descriptor
from freezeframe.durable import fsync_path
from freezeframe.errors import (
    OvaDigestMismatch,
    OvaDiskError,
    OvaError,
    OvaLayoutError,
    OvaManifestError,
    OvaMissingFile,
    OvaNoSpace,
    OvaUnsafeDisk,
    OvaUnsafeMember,
    OvaWriteError,
    OvfMalformed,
)
from freezeframe.ports import ProgressCallback

# --------------------------------------------------------------------------------------------- errors


# ------------------------------------------------------------------------------------------ constants

BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 4 * 2**20
MAX_MEMBERS = 1024
MAX_MANIFEST_BYTES = 2**20
QEMU_TIMEOUT = 600.0
_NEARLY_FULL = 2 * 2**20  # less free space than this after a failed write means the disk filled up
_USTAR_MAX_SIZE = 8**11 - 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PLACEHOLDER_SIZE = 10**19 - 1  # widest ovf:size we will ever write: reserves room in the descriptor slot
_PAX_KEYS_ALLOWED = frozenset(
    {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset", "hdrcharset"}
)
_DIGESTS: Mapping[str, tuple[str, int]] = {"SHA1": ("sha1", 40), "SHA256": ("sha256", 64), "SHA512": ("sha512", 128)}
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
_IMAGE_MAGICS: Mapping[bytes, str] = {
    b"QFI\xfb": "qcow2",
    b"KDMV": "vmdk",
    b"COWD": "vmdk (ESX sparse)",
    b"conectix": "vhd",
    b"vhdxfile": "vhdx",
    b"<<< ": "vdi",
}

DescriptorFactory = Callable[[Sequence[OvfDisk]], bytes]
"""Builds the descriptor once the package's disk files (and so their sizes) are known."""


def _round_up(value: int, unit: int = BLOCK) -> int:
    return -(-value // unit) * unit


def _qemu_img(args: Sequence[str], timeout: float = QEMU_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise OvaError("qemu-img is not installed (package qemu-utils)") from exc


def _stderr_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or f"exit status {proc.returncode}"


# ------------------------------------------------------------------------------------------ writer


@dataclass(frozen=True)
class OvaDiskSource:
    """One disk to put in a package: copied as is (``copy``) or converted to streamOptimized VMDK."""

    href: str
    path: Path
    source_format: str
    target: str = ""
    mode: Literal["copy", "vmdk"] = "copy"
    adapter_type: str = "lsilogic"

    @classmethod
    def copy(cls, href: str, path: Path, source_format: str = "qcow2", target: str = "") -> OvaDiskSource:
        return cls(href=href, path=path, source_format=source_format, target=target, mode="copy")

    @classmethod
    def to_vmdk(
        cls, href: str, path: Path, source_format: str, target: str = "", adapter_type: str = "lsilogic"
    ) -> OvaDiskSource:
        return cls(
            href=href, path=path, source_format=source_format, target=target, mode="vmdk", adapter_type=adapter_type
        )


@dataclass(frozen=True)
class OvaWrittenMember:
    name: str
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class OvaResult:
    path: Path
    size: int
    descriptor: bytes
    manifest: bytes
    disks: tuple[OvfDisk, ...]
    members: tuple[OvaWrittenMember, ...]
    seconds: float


@dataclass(frozen=True)
class _Prepared:
    source: OvaDiskSource
    capacity: int
    populated: int
    file_size: int | None
    work: int


def _ustar_header(name: str, size: int, mtime: int) -> bytes:
    """A POSIX ustar header; sizes of 8 GiB and more use the base-256 form GNU tar and star read."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 100:
        raise OvaWriteError(f"member name {name!r} is longer than 100 bytes")
    size_field = b"%011o\0" % size if size <= _USTAR_MAX_SIZE else b"\x80" + size.to_bytes(11, "big")
    header = bytearray(BLOCK)
    header[0:100] = raw_name.ljust(100, b"\0")
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = size_field
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[265:269] = b"root"
    header[297:301] = b"root"
    checksum = sum(header)
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def _populated_bytes(path: Path, fmt: str) -> int:
    """Bytes of guest data (qemu-img map extents with data), read one extent line at a time.

    A fragmented multi-TiB image has millions of extents: the JSON is never held in memory whole.
    """
    args = ["qemu-img", "map", "--output=json", "-f", fmt, str(path)]
    total = 0
    with tempfile.TemporaryFile(mode="w+b") as errfile:
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errfile, text=True)
        except FileNotFoundError as exc:
            raise OvaError("qemu-img is not installed (package qemu-utils)") from exc
        with proc:
            if proc.stdout is None:
                raise OvaError("qemu-img map has no stdout pipe")
            try:
                for line in proc.stdout:
                    text = line.strip().lstrip("[").rstrip("],").strip()
                    if text:
                        extent = json.loads(text)
                        if extent.get("data"):
                            total += int(extent["length"])
            except (ValueError, KeyError, TypeError) as exc:
                proc.kill()
                raise OvaWriteError(f"cannot read qemu-img map output for {path}: {exc}") from exc
            returncode = proc.wait(timeout=QEMU_TIMEOUT)
        errfile.seek(0)
        stderr = errfile.read(4096).decode("utf-8", "replace").strip()
    if returncode != 0:
        raise OvaWriteError(f"qemu-img map failed on {path}: {stderr or returncode}")
    return total


def _prepare(source: OvaDiskSource) -> _Prepared:
    if not source.path.is_file():
        raise OvaWriteError(f"disk source {source.path} does not exist")
    fmt = source.source_format
    proc = _qemu_img(["info", "--output=json", "-f", fmt, str(source.path)])
    if proc.returncode != 0:
        raise OvaWriteError(f"qemu-img cannot read {source.path} as {fmt}: {_stderr_line(proc)}")
    info = json.loads(proc.stdout)
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    capacity = int(info["virtual-size"])
    file_size: int | None = None
    if source.mode == "copy":
        if fmt not in ("qcow2", "raw"):
            raise OvaWriteError(f"{source.path}: only qcow2 and raw images are copied as is, not {fmt}")
        if info.get("backing-filename") or data_file:
            raise OvaWriteError(
                f"{source.path} depends on another file (backing or data file); convert it instead of copying"
            )
        file_size = source.path.stat().st_size
    elif source.mode != "vmdk":
        raise OvaWriteError(f"unknown disk mode {source.mode!r}")
    populated = _populated_bytes(source.path, fmt)
    work = file_size if file_size is not None else capacity
    return _Prepared(source=source, capacity=capacity, populated=populated, file_size=file_size, work=work)


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def report(self, done: int) -> None:
        self.done = min(done, self.total)
        if self.callback is not None:
            self.callback(self.done, self.total)


def _copy_hashed(src: Path, out: IO[bytes], offset: int, progress: _Progress) -> tuple[int, str]:
    """Copy ``src`` into ``out`` at ``offset``, hashing as we go; all-zero chunks become holes."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    zero = bytes(CHUNK)
    start = progress.done
    copied = 0
    out.seek(offset)
    with src.open("rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            is_zero = buf == zero if n == CHUNK else view[:n].tobytes() == zero[:n]
            if is_zero:
                out.seek(n, os.SEEK_CUR)
            else:
                out.write(view[:n])
            copied += n
            progress.report(start + copied)
    end = offset + copied
    if os.fstat(out.fileno()).st_size < end:
        out.truncate(end)
    return copied, digest.hexdigest()


def _hash_region(fd: int, offset: int, size: int) -> str:
    """SHA-256 of ``size`` bytes at ``offset``, read with pread (qemu wrote them, not our buffer)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[: min(CHUNK, size - done)]], offset + done)
        if not n:
            raise OvaError(f"unexpected end of file at offset {offset + done} while hashing")
        digest.update(view[:n])
        done += n
    return digest.hexdigest()


def _qemu_opts_escape(value: str) -> str:
    return value.replace(",", ",,")


def _follow_progress(proc: subprocess.Popen[bytes], progress: _Progress, start: int, work: int) -> int:
    """Turn ``qemu-img convert -p`` percentages into byte progress; return the exit status."""
    if proc.stdout is None:
        raise OvaError("qemu-img convert has no stdout pipe")
    pending = b""
    while chunk := os.read(proc.stdout.fileno(), 256):
        pending += chunk
        *parts, pending = re.split(rb"[\r\n]", pending)
        for part in parts:
            match = re.search(rb"\((\d+(?:\.\d+)?)/100%\)", part)
            if match:
                progress.report(start + int(float(match.group(1)) / 100 * work))
    return proc.wait(timeout=QEMU_TIMEOUT)


def _convert_vmdk(
    prepared: _Prepared, out: IO[bytes], out_path: Path, offset: int, workdir: Path, progress: _Progress
) -> int:
    """Convert a source image to a streamOptimized VMDK written in place inside the package file.

    qemu-img cannot create an image through a raw offset layer, so an empty VMDK shell (header and
    grain tables, sparse on disk) is created in ``workdir`` and copied to ``offset``; then
    ``qemu-img convert -n --target-is-zero`` fills it through ``file.driver=raw,file.offset=``.
    Compressed grains are appended at the end of the package file, zero grains are skipped.
    """
    src = prepared.source
    shell = workdir / src.href
    proc = _qemu_img(
        [
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            f"subformat=streamOptimized,adapter_type={src.adapter_type}",
            str(shell),
            str(prepared.capacity),
        ]
    )
    if proc.returncode != 0:
        raise OvaWriteError(f"qemu-img create failed for {src.href}: {_stderr_line(proc)}")
    shell_size, _ = _copy_hashed(shell, out, offset, _Progress(None, 0))
    shell.unlink()
    out.truncate(offset + shell_size)
    out.flush()
    target = ",".join(
        [
            "driver=vmdk",
            "file.driver=raw",
            f"file.offset={offset}",
            "file.file.driver=file",
            f"file.file.filename={_qemu_opts_escape(str(out_path))}",
        ]
    )
    args = [
        "qemu-img",
        "convert",
        "-p",
        "-n",
        "--target-is-zero",
        "-f",
        src.source_format,
        str(src.path.resolve()),
        "--target-image-opts",
        target,
    ]
    start = progress.done
    with tempfile.TemporaryFile(mode="w+b") as errfile:
        try:
            proc_conv = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errfile)
        except FileNotFoundError as exc:
            raise OvaError("qemu-img is not installed (package qemu-utils)") from exc
        with proc_conv:
            try:
                returncode = _follow_progress(proc_conv, progress, start, prepared.work)
            finally:
                if proc_conv.poll() is None:
                    proc_conv.kill()
                    proc_conv.wait()
        errfile.seek(0)
        stderr = errfile.read(65536).decode("utf-8", "replace").strip()
    if returncode != 0:
        # qemu's vmdk layer can report a full disk as EINVAL, so look at the filesystem too.
        free = os.statvfs(out_path.parent)
        if "No space left on device" in stderr or free.f_bavail * free.f_frsize < _NEARLY_FULL:
            raise OvaNoSpace(f"no space left on the device holding {out_path} while converting {src.href} ({stderr})")
        raise OvaWriteError(f"qemu-img convert failed for {src.href}: {stderr or f'exit status {returncode}'}")
    progress.report(start + prepared.work)
    return os.fstat(out.fileno()).st_size - offset


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


def _manifest(entries: Sequence[tuple[str, str]]) -> bytes:
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in entries).encode("ascii")


def _ovf_disk(prepared: _Prepared, size: int) -> OvfDisk:
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


def _write_body(
    out: IO[bytes],
    tmp_path: Path,
    workdir: Path,
    prepared: Sequence[_Prepared],
    descriptor: bytes | DescriptorFactory,
    descriptor_name: str,
    manifest_name: str,
    ovf_slot: int,
    manifest_size: int,
    head: int,
    ticker: _Progress,
) -> tuple[int, bytes, bytes, list[OvaWrittenMember], list[OvfDisk]]:
    """Disks first (after the reserved head), then the trailer, then descriptor + manifest in the head."""
    mtime = int(time.time())
    out.truncate(head)
    pos = head
    placed: list[tuple[_Prepared, int, int, Future[str] | str]] = []
    # A converted disk is hashed by re-reading it; that runs in a thread while the next disk converts.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ova-hash") as hasher:
        for item in prepared:
            data = pos + BLOCK
            digest: Future[str] | str
            if item.source.mode == "copy":
                size, digest = _copy_hashed(item.source.path, out, data, ticker)
            else:
                size = _convert_vmdk(item, out, tmp_path, data, workdir, ticker)
                out.flush()
                digest = hasher.submit(_hash_region, out.fileno(), data, size)
            end = data + size
            padded = _round_up(end)
            out.seek(end)
            out.write(bytes(padded - end))
            out.seek(pos)
            out.write(_ustar_header(item.source.href, size, mtime))
            placed.append((item, data, size, digest))
            pos = padded
        written = [
            OvaWrittenMember(item.source.href, data, size, d if isinstance(d, str) else d.result())
            for item, data, size, d in placed
        ]
    final_disks = [_ovf_disk(item, size) for item, _, size, _ in placed]
    trailer = _round_up(pos + 2 * BLOCK, RECORD) - pos
    out.seek(pos)
    out.write(bytes(trailer))
    total_size = pos + trailer

    if callable(descriptor):
        final = descriptor(final_disks)
        if len(final) > ovf_slot:
            raise OvaWriteError("the descriptor grew beyond the space reserved for it")
        if _round_up(len(final)) < ovf_slot:
            # XML allows trailing whitespace: fill the slot so the tar has no gap.
            final = final + b" " * (ovf_slot - len(final) - 1) + b"\n"
    else:
        final = descriptor
        _check_descriptor_sizes(final, final_disks)
    ovf_digest = hashlib.sha256(final).hexdigest()
    manifest = _manifest([(descriptor_name, ovf_digest), *((w.name, w.sha256) for w in written)])
    if len(manifest) != manifest_size:
        raise OvaWriteError("internal error: manifest size changed")
    out.seek(0)
    out.write(_ustar_header(descriptor_name, len(final), mtime))
    out.write(final)
    out.write(bytes(ovf_slot - len(final)))
    out.write(_ustar_header(manifest_name, len(manifest), mtime))
    out.write(manifest)
    out.write(bytes(_round_up(manifest_size) - manifest_size))
    if out.tell() != head:
        raise OvaWriteError("internal error: package head has the wrong size")
    return total_size, final, manifest, written, final_disks


def write_ova(
    out_path: Path,
    descriptor_name: str,
    descriptor: bytes | DescriptorFactory,
    disks: Sequence[OvaDiskSource],
    progress: ProgressCallback | None = None,
) -> OvaResult:
    """Write an OVA (ustar: .ovf, .mf with SHA-256 lines, disks in order) without staging disk copies.

    ``descriptor`` is either final bytes (only possible when every disk is copied as is, since
    converted sizes are unknown beforehand) or a factory called with the disks' final sizes. The file
    is written next to ``out_path`` under a temporary name and renamed at the end; on any error the
    partial file is removed. Memory stays at a few 4 MiB buffers whatever the disk sizes.
    """
    started = time.monotonic()
    manifest_name = _check_names(descriptor_name, disks)
    if out_path.exists():
        raise OvaWriteError(f"{out_path} already exists")
    parent = out_path.parent.resolve()
    if not parent.is_dir():
        raise OvaWriteError(f"directory {parent} does not exist")

    prepared = [_prepare(d) for d in disks]
    known = sum(p.file_size or 0 for p in prepared)
    stat = os.statvfs(parent)
    if known > stat.f_bavail * stat.f_frsize:
        raise OvaNoSpace(f"{parent} has {stat.f_bavail * stat.f_frsize} bytes free, the disks to copy need {known}")

    if callable(descriptor):
        probe = descriptor([_ovf_disk(p, _PLACEHOLDER_SIZE) for p in prepared])
        ovf_slot = _round_up(len(probe)) + BLOCK
    else:
        ovf_slot = _round_up(len(descriptor))
    names = [descriptor_name, *(d.href for d in disks)]
    manifest_size = len(_manifest([(n, "0" * 64) for n in names]))
    head = BLOCK + ovf_slot + BLOCK + _round_up(manifest_size)
    ticker = _Progress(progress, sum(p.work for p in prepared))

    workdir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_path.name}.", suffix=".work"))
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{out_path.name}.", suffix=".part")
        tmp_path = Path(tmp_name)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "r+b") as out:
                total_size, final, manifest, written, final_disks = _write_body(
                    out,
                    tmp_path,
                    workdir,
                    prepared,
                    descriptor,
                    descriptor_name,
                    manifest_name,
                    ovf_slot,
                    manifest_size,
                    head,
                    ticker,
                )
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
    ovf_digest = hashlib.sha256(final).hexdigest()
    members = (
        OvaWrittenMember(descriptor_name, BLOCK, len(final), ovf_digest),
        OvaWrittenMember(manifest_name, 2 * BLOCK + ovf_slot, len(manifest), hashlib.sha256(manifest).hexdigest()),
        *written,
    )
    return OvaResult(
        path=out_path,
        size=total_size,
        descriptor=final,
        manifest=manifest,
        disks=tuple(final_disks),
        members=members,
        seconds=time.monotonic() - started,
    )


# ------------------------------------------------------------------------------------------ reader


@dataclass(frozen=True)
class OvaMember:
    """A regular file inside the tar: where its data starts and how long it is."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class OvaDiskMember:
    """A disk of the descriptor located inside the package, readable in place by qemu."""

    name: str
    offset: int
    size: int
    ova_path: Path
    format: str | None
    disk: ImportedDisk


@dataclass(frozen=True)
class DiskProbe:
    name: str
    format: str
    virtual_size: int
    check: str
    info: dict[str, Any]


@dataclass(frozen=True)
class OvaPackage:
    path: Path
    descriptor_name: str
    descriptor: bytes
    machine: ImportedMachine
    members: tuple[OvaMember, ...]
    manifest_name: str | None
    verified: Mapping[str, str]
    unverified: tuple[str, ...]
    disks: tuple[OvaDiskMember, ...]
    warnings: tuple[str, ...]

    def member(self, name: str) -> OvaMember:
        for member in self.members:
            if member.name == name:
                return member
        raise OvaMissingFile(f"{name!r} is not in {self.path}")

    def qemu_json_for(self, disk: OvaDiskMember) -> str:
        return qemu_json_for(disk)

    def probe_disk(self, disk: OvaDiskMember) -> DiskProbe:
        return probe_disk(disk)

    def probe_all(self) -> tuple[DiskProbe, ...]:
        return tuple(probe_disk(d) for d in self.disks)


def _check_member(info: tarfile.TarInfo, f: IO[bytes], file_size: int) -> None:
    name = info.name
    if info.issym():
        raise OvaUnsafeMember(f"member {name!r} is a symbolic link; links are refused")
    if info.islnk():
        raise OvaUnsafeMember(f"member {name!r} is a hard link; links are refused")
    if info.ischr() or info.isblk():
        raise OvaUnsafeMember(f"member {name!r} is a device node; refused")
    if info.isfifo():
        raise OvaUnsafeMember(f"member {name!r} is a fifo; refused")
    if info.isdir():
        raise OvaUnsafeMember(f"member {name!r} is a directory; an OVA holds plain files only")
    if info.issparse():
        raise OvaLayoutError(f"member {name!r} is a GNU sparse file; refused")
    if not info.isreg():
        raise OvaUnsafeMember(f"member {name!r} has tar type {info.type!r}; only regular files are accepted")
    if not name or name.startswith("/") or "\\" in name or "\0" in name or re.match(r"^[A-Za-z]:", name):
        raise OvaUnsafeMember(f"member name {name!r} is absolute or not portable; refused")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OvaUnsafeMember(f"member name {name!r} contains an empty, '.' or '..' component; refused")
    odd = set(info.pax_headers) - _PAX_KEYS_ALLOWED
    if odd:
        raise OvaLayoutError(f"member {name!r} carries unsupported pax headers {sorted(odd)}")
    if info.offset_data + info.size > file_size:
        raise OvaLayoutError(f"member {name!r} runs past the end of the package: truncated OVA")
    f.seek(info.offset_data - BLOCK)
    header = f.read(BLOCK)
    if header[257:263] != b"ustar\0" and header[257:265] != b"ustar  \0":
        raise OvaLayoutError(f"member {name!r} has a pre-POSIX (v7) tar header; ustar is required")


def _scan(path: Path, f: IO[bytes]) -> list[OvaMember]:
    file_size = os.fstat(f.fileno()).st_size
    try:
        tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed below
    except tarfile.TarError as exc:
        raise OvaLayoutError(f"{path} is not a tar archive: {exc}") from exc
    members: list[OvaMember] = []
    names: set[str] = set()
    try:
        if tf.pax_headers:
            raise OvaLayoutError(f"{path} has a pax global header; refused")
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as exc:
                raise OvaLayoutError(f"{path} is not a valid tar archive: {exc}") from exc
            if info is None:
                break
            if len(members) >= MAX_MEMBERS:
                raise OvaLayoutError(f"{path} has more than {MAX_MEMBERS} members")
            position = f.tell()
            _check_member(info, f, file_size)
            f.seek(position)
            if info.name in names:
                raise OvaLayoutError(f"member {info.name!r} appears twice in {path}")
            names.add(info.name)
            members.append(OvaMember(info.name, info.offset_data, info.size))
        if tf.pax_headers:
            raise OvaLayoutError(f"{path} has a pax global header; refused")
    finally:
        tf.close()
    if not members:
        raise OvaLayoutError(f"{path} is an empty tar archive")
    return members


def _read_member(f: IO[bytes], member: OvaMember, limit: int, what: str) -> bytes:
    if member.size > limit:
        raise OvfMalformed(f"{what} {member.name!r} is {member.size} bytes; more than {limit} is refused")
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise OvaLayoutError(f"{what} {member.name!r} is truncated")
    return data


def parse_manifest(text: bytes) -> list[tuple[str, str, str]]:
    """(algorithm, file name, lower-case hex digest) for each line; both spacing variants accepted."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OvaManifestError(f"manifest is not UTF-8 text: {exc}") from exc
    entries: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(decoded.splitlines(), start=1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if match is None:
            raise OvaManifestError(f"manifest line {number} is not 'SHA256(file)= digest': {line[:80]!r}")
        algorithm, name, digest = match.group(1), match.group(2).strip(), match.group(3).lower()
        if len(digest) != _DIGESTS[algorithm][1]:
            raise OvaManifestError(f"manifest line {number}: {algorithm} digest has the wrong length")
        if name in seen:
            raise OvaManifestError(f"manifest lists {name!r} twice")
        seen.add(name)
        entries.append((algorithm, name, digest))
    return entries


def _digest_member(f: io.BufferedReader, member: OvaMember, algorithm: str) -> str:
    digest = hashlib.new(_DIGESTS[algorithm][0])
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    f.seek(member.offset)
    left = member.size
    while left > 0:
        n = f.readinto(view[: min(CHUNK, left)])
        if not n:
            raise OvaLayoutError(f"member {member.name!r} is truncated")
        digest.update(view[:n])
        left -= n
    return digest.hexdigest()


def open_ova(path: Path) -> OvaPackage:
    """Open an OVA defensively: layout checks, then manifest digests, then the descriptor.

    Nothing is extracted: disks are read in place through ``qemu_json_for``. Referenced files absent
    from the manifest are allowed and listed in ``unverified``.
    """
    if not path.is_file():
        raise OvaLayoutError(f"{path} is not a regular file")
    warnings: list[str] = []
    with path.open("rb") as f:
        members = _scan(path, f)
        first = members[0]
        if not first.name.lower().endswith(".ovf"):
            raise OvaLayoutError(f"the first member of {path} is {first.name!r}; the .ovf descriptor must come first")
        by_name = {m.name: m for m in members}
        if sum(1 for m in members if m.name.lower().endswith(".ovf")) > 1:
            raise OvaLayoutError(f"{path} holds several .ovf descriptors")
        manifests = [m for m in members if m.name.lower().endswith(".mf")]
        if len(manifests) > 1:
            raise OvaLayoutError(f"{path} holds several .mf manifests")
        manifest = manifests[0] if manifests else None
        certificates = [m.name for m in members if m.name.lower().endswith(".cert")]
        if certificates:
            warnings.append(f"certificate {certificates[0]!r} present but not verified")

        verified: dict[str, str] = {}
        if manifest is not None:
            entries = parse_manifest(_read_member(f, manifest, MAX_MANIFEST_BYTES, "manifest"))
            for algorithm, name, expected in entries:
                member = by_name.get(name)
                if member is None:
                    raise OvaManifestError(f"manifest lists {name!r}, which is not in the package")
                actual = _digest_member(f, member, algorithm)
                if actual != expected:
                    raise OvaDigestMismatch(
                        f"{algorithm} of {name!r} is {actual}, the manifest says {expected}: corrupt or tampered"
                    )
                verified[name] = algorithm
        else:
            warnings.append("no manifest: the package contents are not integrity-checked")
        descriptor = _read_member(f, first, MAX_DESCRIPTOR_BYTES, "descriptor")

    machine = parse_descriptor(descriptor)
    referenced: list[str] = []
    for ref in machine.files:
        if "://" in ref.href:
            raise OvaMissingFile(f"the descriptor references external file {ref.href!r}; it is not fetched")
        member = by_name.get(ref.href)
        if member is None:
            raise OvaMissingFile(f"the descriptor references {ref.href!r}, which is not in the package")
        referenced.append(ref.href)
        if ref.size is not None and ref.size != member.size:
            warnings.append(f"{ref.href!r} is {member.size} bytes but the descriptor says {ref.size}")
    unverified = tuple(name for name in referenced if name not in verified)
    if manifest is not None and unverified:
        warnings.append(f"not in the manifest: {', '.join(unverified)}")
    expected_order = [n for n in (m.name for m in members) if n in referenced]
    if expected_order != referenced:
        warnings.append("files are not stored in References order")
    known = {first.name, *(m.name for m in manifests), *certificates, *referenced}
    extra = [m.name for m in members if m.name not in known]
    if extra:
        warnings.append(f"members not referenced by the descriptor: {', '.join(extra)}")

    disks = tuple(
        OvaDiskMember(
            name=disk.href,
            offset=by_name[disk.href].offset,
            size=by_name[disk.href].size,
            ova_path=path.resolve(),
            format=disk.format,
            disk=disk,
        )
        for disk in machine.disks
        if disk.href is not None
    )
    return OvaPackage(
        path=path,
        descriptor_name=first.name,
        descriptor=descriptor,
        machine=machine,
        members=tuple(members),
        manifest_name=manifest.name if manifest else None,
        verified=verified,
        unverified=unverified,
        disks=disks,
        warnings=tuple([*warnings, *machine.warnings]),
    )


def qemu_json_for(member: OvaDiskMember) -> str:
    """A qemu ``json:`` filename reading the member in place (raw layer with offset and size).

    The size is rounded up to 512 bytes (qemu's raw layer requires it; the tar padding provides
    the bytes). ``"backing": null`` keeps qemu from opening a backing file (qcow2 backing, VMDK
    parentFileNameHint) outside the package, whatever the image header says.
    """
    if member.format is None:
        raise OvaDiskError(f"{member.name!r}: unknown disk format {member.disk.format_uri!r}")
    spec: dict[str, Any] = {
        "driver": member.format,
        "file": {
            "driver": "raw",
            "offset": member.offset,
            "size": _round_up(member.size),
            "file": {"driver": "file", "filename": str(member.ova_path)},
        },
        "backing": None,
    }
    return "json:" + json.dumps(spec, separators=(",", ":"))


def _read_head(member: OvaDiskMember, length: int) -> bytes:
    with member.ova_path.open("rb") as f:
        f.seek(member.offset)
        return f.read(min(length, member.size))


def _check_magic(member: OvaDiskMember) -> None:
    """Look at the image header ourselves before qemu does: refuse what could reach outside files."""
    fmt = member.format
    head = _read_head(member, BLOCK)
    if fmt == "raw":
        for magic, kind in _IMAGE_MAGICS.items():
            if head.startswith(magic):
                raise OvaDiskError(f"{member.name!r} is declared raw but looks like a {kind} image")
        return
    if member.size < BLOCK:
        raise OvaDiskError(
            f"{member.name!r} is {member.size} bytes: too small to be a {fmt} image (truncated or dummy disk)"
        )
    if fmt == "vmdk":
        if head.startswith(b"# Disk DescriptorFile") or head.startswith(b"#"):
            raise OvaUnsafeDisk(f"{member.name!r} is a VMDK text descriptor; its extents would be outside files")
        if not head.startswith(b"KDMV"):
            raise OvaDiskError(f"{member.name!r} is not a sparse/streamOptimized VMDK (no KDMV magic)")
    elif fmt == "qcow2":
        if not head.startswith(b"QFI\xfb"):
            raise OvaDiskError(f"{member.name!r} is not a qcow2 image (no QFI magic)")
        version, backing_offset = struct.unpack(">IQ", head[4:16])
        if backing_offset:
            raise OvaUnsafeDisk(f"{member.name!r} has a backing file; refused (it would be read from the host)")
        if version >= 3 and len(head) >= 80:
            (incompatible,) = struct.unpack(">Q", head[72:80])
            if incompatible & 0x4:
                raise OvaUnsafeDisk(f"{member.name!r} uses an external data file; refused")


def probe_disk(member: OvaDiskMember) -> DiskProbe:
    """Ask qemu whether the member is a usable image of its declared format; raise OvaDiskError if not."""
    if member.format is None:
        raise OvaDiskError(f"{member.name!r}: unknown disk format {member.disk.format_uri!r}")
    try:
        package_size = member.ova_path.stat().st_size
    except OSError as exc:
        raise OvaDiskError(f"cannot read the package {member.ova_path}: {exc}") from exc
    if member.offset + _round_up(member.size) > package_size:
        raise OvaDiskError(f"{member.name!r} runs past the end of the package: truncated")
    _check_magic(member)
    target = qemu_json_for(member)
    declared = member.disk.file_size
    size_hint = (
        f" (the package holds {member.size} bytes, the descriptor says {declared}: truncated?)"
        if declared is not None and declared != member.size
        else ""
    )
    try:
        proc = _qemu_img(["info", "--output=json", target], timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise OvaDiskError(f"{member.name!r}: qemu-img info took too long") from exc
    if proc.returncode != 0:
        raise OvaDiskError(f"{member.name!r} is not a usable {member.format} image: {_stderr_line(proc)}{size_hint}")
    info = json.loads(proc.stdout)
    if info.get("format") != member.format:
        raise OvaDiskError(f"{member.name!r}: qemu opened it as {info.get('format')!r}, not {member.format}")
    if info.get("backing-filename"):
        raise OvaUnsafeDisk(f"{member.name!r} has a backing file; refused")
    extents = info.get("format-specific", {}).get("data", {}).get("extents")
    if member.format == "vmdk" and extents is not None and len(extents) != 1:
        raise OvaUnsafeDisk(f"{member.name!r} has {len(extents)} extents; only single-extent VMDKs are accepted")
    virtual_size = int(info["virtual-size"])
    if virtual_size > member.disk.capacity:
        raise OvaDiskError(
            f"{member.name!r} holds {virtual_size} bytes of disk but the descriptor declares {member.disk.capacity}"
        )
    check = "unsupported"
    if member.format in ("qcow2", "vmdk"):
        try:
            proc = _qemu_img(["check", "--output=json", target], timeout=QEMU_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise OvaDiskError(f"{member.name!r}: qemu-img check took too long") from exc
        if proc.returncode == 0:
            check = "ok"
        elif proc.returncode == 3:
            check = "leaks"
        elif proc.returncode == 2:
            raise OvaDiskError(f"{member.name!r} is corrupt: {_stderr_line(proc)}{size_hint}")
        elif proc.returncode != 63:
            raise OvaDiskError(f"{member.name!r} failed qemu-img check: {_stderr_line(proc)}{size_hint}")
    if size_hint:
        raise OvaDiskError(f"{member.name!r} does not match the descriptor{size_hint}")
    return DiskProbe(name=member.name, format=member.format, virtual_size=virtual_size, check=check, info=info)


def iter_member_chunks(package: OvaPackage, name: str) -> Iterator[bytes]:
    """Stream one member's bytes (bounded memory), e.g. to copy a disk out of the package."""
    member = package.member(name)
    with package.path.open("rb") as f:
        f.seek(member.offset)
        left = member.size
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OvaLayoutError(f"member {name!r} is truncated")
            left -= len(chunk)
            yield chunk
