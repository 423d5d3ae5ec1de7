"""Putting one disk into a package being written: copied as is, or converted in place to streamOptimized VMDK.

Disks can be far larger than memory or than the free space for a second copy, so a disk is never
staged: a copy streams 4 MiB at a time straight to its final offset (hashing on the way, zero
chunks left as holes), and a conversion has qemu-img write into the package file through a raw
offset layer. The sources are our own repository members; their format is pinned all the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from freezeframe.adapters.ova.qemu import NOT_INSTALLED, QEMU_TIMEOUT, run_qemu_img, stderr_line
from freezeframe.errors import OvaError, OvaNoSpace, OvaWriteError
from freezeframe.ports import ProgressCallback

CHUNK = 4 * 2**20
_NEARLY_FULL = 2 * 2**20  # less free space than this after a failed write means the disk filled up


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
class PreparedDisk:
    """A source with what the descriptor needs before any byte is written (sizes, work to do)."""

    source: OvaDiskSource
    capacity: int
    populated: int
    file_size: int | None
    work: int


class Progress:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def report(self, done: int) -> None:
        self.done = min(done, self.total)
        if self.callback is not None:
            self.callback(self.done, self.total)


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
            raise OvaError(NOT_INSTALLED) from exc
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


def prepare(source: OvaDiskSource) -> PreparedDisk:
    """Check a source (a copied disk must stand alone) and measure it."""
    if not source.path.is_file():
        raise OvaWriteError(f"disk source {source.path} does not exist")
    fmt = source.source_format
    proc = run_qemu_img(["info", "--output=json", "-f", fmt, str(source.path)])
    if proc.returncode != 0:
        raise OvaWriteError(f"qemu-img cannot read {source.path} as {fmt}: {stderr_line(proc)}")
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
    return PreparedDisk(source=source, capacity=capacity, populated=populated, file_size=file_size, work=work)


def copy_hashed(
    src: Path, out: IO[bytes], offset: int, progress: Progress, algorithm: str = "sha256"
) -> tuple[int, str]:
    """Copy ``src`` into ``out`` at ``offset``, hashing (``algorithm``, a hashlib name) as we go; all-zero chunks
    become holes."""
    digest = hashlib.new(algorithm)
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


def hash_region(fd: int, offset: int, size: int, algorithm: str = "sha256") -> str:
    """The digest of ``size`` bytes at ``offset``, read with pread (qemu wrote them, not our buffer)."""
    digest = hashlib.new(algorithm)
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


def _follow_progress(proc: subprocess.Popen[bytes], progress: Progress, start: int, work: int) -> int:
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


def _create_shell(prepared: PreparedDisk, out: IO[bytes], offset: int, workdir: Path) -> None:
    """An empty streamOptimized VMDK (header and grain tables, sparse on disk) copied to ``offset``."""
    src = prepared.source
    shell = workdir / src.href
    proc = run_qemu_img(
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
        raise OvaWriteError(f"qemu-img create failed for {src.href}: {stderr_line(proc)}")
    shell_size, _ = copy_hashed(shell, out, offset, Progress(None, 0))
    shell.unlink()
    out.truncate(offset + shell_size)
    out.flush()


def convert_vmdk(
    prepared: PreparedDisk, out: IO[bytes], out_path: Path, offset: int, workdir: Path, progress: Progress
) -> int:
    """Convert a source image to a streamOptimized VMDK written in place inside the package file.

    qemu-img cannot create an image through a raw offset layer, so an empty VMDK shell is created in
    ``workdir`` and copied to ``offset``; then ``qemu-img convert -n --target-is-zero`` fills it
    through ``file.driver=raw,file.offset=``. Compressed grains are appended at the end of the
    package file, zero grains are skipped. Returns the member's size.
    """
    src = prepared.source
    _create_shell(prepared, out, offset, workdir)
    target = ",".join(
        [
            "driver=vmdk",
            "file.driver=raw",
            f"file.offset={offset}",
            "file.file.driver=file",
            f"file.file.filename={_qemu_opts_escape(str(out_path))}",
        ]
    )
    args = ["qemu-img", "convert", "-p", "-n", "--target-is-zero", "-f", src.source_format, str(src.path.resolve())]
    args += ["--target-image-opts", target]
    start = progress.done
    with tempfile.TemporaryFile(mode="w+b") as errfile:
        try:
            proc_conv = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errfile)
        except FileNotFoundError as exc:
            raise OvaError(NOT_INSTALLED) from exc
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
