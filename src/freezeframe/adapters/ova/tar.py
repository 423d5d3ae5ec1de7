"""The ustar layout of an OVA: headers we write, and a scan of a package that refuses every tar trick.

An OVA is a POSIX ustar tar. The writer places members itself (it must patch headers after the
data), so it writes headers here; the reader never extracts anything, it only locates regular
members after refusing links, devices, escaping names, pax extensions and truncation.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from freezeframe.errors import OvaLayoutError, OvaUnsafeMember, OvaWriteError

BLOCK = 512
RECORD = 20 * BLOCK
MAX_MEMBERS = 1024
_USTAR_MAX_SIZE = 8**11 - 1
_PAX_KEYS_ALLOWED = frozenset(
    {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset", "hdrcharset"}
)


def round_up(value: int, unit: int = BLOCK) -> int:
    return -(-value // unit) * unit


def ustar_header(name: str, size: int, mtime: int) -> bytes:
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


@dataclass(frozen=True)
class OvaMember:
    """A regular file inside the tar: where its data starts and how long it is."""

    name: str
    offset: int
    size: int


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


def scan_members(path: Path, f: IO[bytes]) -> list[OvaMember]:
    """Every member of the package, in order, after refusing anything but plain, contained files."""
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
