"""Check an untrusted disk image's header ourselves before any QEMU tool opens it.

QEMU follows references inside images: a qcow2 backing file or external data file, a VMDK
``parentFileNameHint``, and the extents of a VMDK text descriptor, which can name any host file
(``RW 128 FLAT "/etc/shadow" 0``). A ``KDMV`` sparse header with capacity 0 and an embedded
descriptor is read by QEMU as such a descriptor. So the header is parsed here, from bytes only,
and an image is accepted only when it cannot make QEMU open another file:

* qcow2 v2/v3 with no backing file, no external data file, no encryption, no unknown
  incompatible feature;
* VMDK only as a ``KDMV`` streamOptimized or monolithicSparse image whose embedded descriptor has
  exactly one ``SPARSE`` extent (the image itself) and no parent;
* raw only when no other format's magic is found in it.

Everything else (text descriptors, ESX ``COWD``, vpc, vdi, vhdx, ...) is refused. The verified
format is the one the caller must pin (``-f``/``"driver"``): QEMU never probes. See docs/ovf.md.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from freezeframe.errors import OvaDiskError, OvaUnsafeDisk

ReadAt = Callable[[int, int], bytes]
"""Read ``length`` bytes at ``offset`` of the image (fewer only at its end)."""

SECTOR = 512
MAX_VIRTUAL_BYTES = 2**50  # far beyond any disk we import; the descriptor's capacity bounds it further
IMPORTED_FORMATS = ("qcow2", "raw", "vmdk")
VMDK_SUBFORMATS = ("streamOptimized", "monolithicSparse")


@dataclass(frozen=True)
class VerifiedImage:
    """What the header says, once it is known to reference no other file."""

    format: str  # the qemu driver to pin
    virtual_size: int | None  # bytes, from the header (None for raw)
    subformat: str = ""


class _Image:
    """Bounded reads of one image: never past ``size``, short reads are a truncated header."""

    def __init__(self, name: str, size: int, read_at: ReadAt) -> None:
        self.name = name
        self.size = size
        self._read_at = read_at

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.broken(f"its {what} lies outside the {self.size}-byte file (truncated or damaged)")
        data = self._read_at(offset, length)
        if len(data) != length:
            raise self.broken(f"its {what} is truncated")
        return data

    def head(self, length: int) -> bytes:
        return self._read_at(0, min(length, self.size)) if self.size > 0 else b""

    def tail(self, length: int) -> bytes:
        return self._read_at(self.size - length, length) if self.size >= length else b""

    def broken(self, text: str) -> OvaDiskError:
        return _broken(self.name, text)

    def unsafe(self, text: str) -> OvaUnsafeDisk:
        return _unsafe(self.name, text)


def _broken(name: str, text: str) -> OvaDiskError:
    """Not a usable image of its format (damaged, truncated, unsupported)."""
    return OvaDiskError(f"disk {name}: {text}")


def _unsafe(name: str, text: str) -> OvaUnsafeDisk:
    """An image that would make QEMU read something other than itself, or pretends to be another format."""
    return OvaUnsafeDisk(f"disk {name}: {text}")


# ------------------------------------------------------------------------------------------ detection

_CLOOP_MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
_HEAD_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"COWD", "vmdk (ESX sparse COWD)"),
    (b"# Disk DescriptorFile", "vmdk (text descriptor)"),
    (b"conectix", "vpc (VHD)"),
    (b"vhdxfile", "vhdx"),
    (b"QED\x00", "qed"),
    (b"Bochs Virtual HD Image", "bochs"),
    (_CLOOP_MAGIC, "cloop"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"LUKS\xba\xbe", "luks"),
)
_TAIL_MAGICS: tuple[tuple[bytes, str], ...] = ((b"conectix", "vpc (fixed VHD footer)"), (b"koly", "dmg"))
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
_VMDK_TEXT_START = re.compile(rb"\A(?:[ \t\r]*(?:#[^\n]*)?\n)*[ \t]*(?:version|createType)[ \t]*=")


def detect_format(head: bytes, tail: bytes = b"") -> str | None:
    """The image format whose signature ``head`` (first bytes) or ``tail`` (last 512 bytes) carries."""
    for magic, kind in _HEAD_MAGICS:
        if head.startswith(magic):
            if kind == "qcow2" and head[4:8] == b"\0\0\0\x01":
                return "qcow (version 1)"
            return kind
    if head[64:68] == _VDI_SIGNATURE or (head.startswith(b"<<< ") and b"Disk Image" in head[:64]):
        return "vdi"
    if _VMDK_TEXT_START.match(head[:4096]):
        return "vmdk (text descriptor)"
    for magic, kind in _TAIL_MAGICS:
        if tail.startswith(magic):
            return kind
    return None


_KINDS = {"qcow2": "qcow2", "vmdk": "streamOptimized/monolithicSparse VMDK"}
_VMDK_REFUSED = {
    "vmdk (text descriptor)": (
        "is a VMDK text descriptor; its extents would be other files on the host, "
        "only streamOptimized/monolithicSparse images with their own data are imported"
    ),
    "vmdk (ESX sparse COWD)": "is an ESX sparse (COWD) VMDK; only streamOptimized/monolithicSparse images are imported",
}


def _mismatch(image: _Image, claimed: str, detected: str) -> OvaUnsafeDisk:
    return image.unsafe(
        f"declared {claimed} but it is a {detected} image; the declared and the detected format must agree"
    )


# ------------------------------------------------------------------------------------------ entry point


def verify_image(name: str, claimed: str | None, size: int, read_at: ReadAt) -> VerifiedImage:
    """Refuse (OvaDiskError / OvaUnsafeDisk) an image QEMU could not open safely as ``claimed``."""
    image = _Image(name, size, read_at)
    if claimed not in IMPORTED_FORMATS:
        raise image.broken(
            f"format {claimed!r} is not imported; only qcow2, raw and VMDK (streamOptimized or monolithicSparse)"
        )
    head = image.head(4096)
    detected = detect_format(head, image.tail(SECTOR))
    if claimed == "raw":
        if detected is not None:
            raise _mismatch(image, claimed, detected)
        return VerifiedImage("raw", None)
    if claimed == "vmdk" and detected in _VMDK_REFUSED:
        raise image.unsafe(_VMDK_REFUSED[detected])
    if detected is not None and detected != claimed:
        raise _mismatch(image, claimed, detected)
    if size < SECTOR:
        raise image.broken(f"is {size} bytes: too small to be a {claimed} image (truncated or dummy disk)")
    if detected is None:
        magic = "QFI" if claimed == "qcow2" else "KDMV"
        raise image.broken(f"is not a {_KINDS[claimed]} image (no {magic} magic)")
    return _verify_qcow2(image) if claimed == "qcow2" else _verify_vmdk(image)


def verify_bytes(name: str, claimed: str | None, data: bytes) -> VerifiedImage:
    """``verify_image`` over an image held in memory (tests, small files)."""
    return verify_image(name, claimed, len(data), lambda offset, length: data[offset : offset + length])


# ------------------------------------------------------------------------------------------ qcow2

_QCOW2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # up to snapshots_offset: 72 bytes (version 2)
_QCOW2_V3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, refcount order, header length
_QCOW2_INCOMPAT_DIRTY = 1 << 0
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_INCOMPAT_KNOWN = 0b11111  # dirty, corrupt, data file, compression type, extended L2
_QCOW2_EXTENSIONS_REFUSED = {
    0x44415441: "an external data file (header extension)",
    0xE2792ACA: "a backing file format (header extension)",
    0x0537BE77: "a full-disk encryption header",
}


def _verify_qcow2(image: _Image) -> VerifiedImage:
    fields = _QCOW2_HEADER.unpack(image.read(0, _QCOW2_HEADER.size, "qcow2 header"))
    _, version, backing_offset, backing_size, cluster_bits, virtual_size, crypt = fields[:7]
    if version not in (2, 3):
        raise image.broken(f"qcow2 version {version} is not supported (2 or 3)")
    if backing_offset or backing_size:
        raise image.unsafe("qcow2 image has a backing file; it would be read from the host, refused")
    if not 9 <= cluster_bits <= 21:
        raise image.broken(f"qcow2 cluster bits {cluster_bits} are out of range (9-21): damaged header")
    if crypt:
        raise image.unsafe("qcow2 image is encrypted; refused")
    if virtual_size > MAX_VIRTUAL_BYTES:
        raise image.broken(f"qcow2 virtual size {virtual_size} is absurd")
    cluster_size = 1 << cluster_bits
    header_length = _QCOW2_HEADER.size
    if version == 3:
        v3 = _QCOW2_V3.unpack(image.read(_QCOW2_HEADER.size, _QCOW2_V3.size, "qcow2 v3 header"))
        incompatible, _, _, refcount_order, header_length = v3
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            raise image.unsafe("qcow2 image uses an external data file; refused")
        if incompatible & ~_QCOW2_INCOMPAT_KNOWN:
            raise image.unsafe(f"qcow2 image has unknown incompatible features {incompatible:#x}; refused")
        if incompatible & _QCOW2_INCOMPAT_CORRUPT:
            raise image.broken("qcow2 image is marked corrupt")
        if refcount_order > 6:
            raise image.broken(f"qcow2 refcount order {refcount_order} is out of range")
        if not 104 <= header_length <= cluster_size or header_length % 8:
            raise image.broken(f"qcow2 header length {header_length} is out of range")
    _check_qcow2_extensions(image, header_length, cluster_size)
    return VerifiedImage("qcow2", virtual_size, f"qcow2 v{version}")


def _check_qcow2_extensions(image: _Image, start: int, cluster_size: int) -> None:
    """Walk the header extensions QEMU reads (up to the end of the first cluster)."""
    end = min(cluster_size, image.size)
    area = image.read(0, end, "qcow2 header cluster")
    offset = start
    while offset + 8 <= end:
        kind, length = struct.unpack_from(">II", area, offset)
        if kind == 0:
            return
        if offset + 8 + length > end:
            raise image.broken(f"qcow2 header extension {kind:#x} runs past the first cluster")
        if kind in _QCOW2_EXTENSIONS_REFUSED:
            raise image.unsafe(f"qcow2 image has {_QCOW2_EXTENSIONS_REFUSED[kind]}; refused")
        offset += 8 + (length + 7) // 8 * 8


# ------------------------------------------------------------------------------------------ VMDK

# After the 4-byte magic: version, flags, capacity, grain size, descriptor offset and size (sectors),
# grain table entries, redundant and primary grain directory, overhead, unclean, check bytes, compression.
_VMDK_HEADER = struct.Struct("<IIQQQQIQQQB4sH")
_VMDK_GD_AT_END = 2**64 - 1
_VMDK_NEWLINE_CHECK = b"\n \r\n"
_QEMU_DESC_SECTORS = 20  # QEMU reads the parent hint and CIDs from 20 sectors after the header


def _verify_vmdk(image: _Image) -> VerifiedImage:
    fields = _VMDK_HEADER.unpack(image.read(4, _VMDK_HEADER.size, "VMDK header"))
    version, flags, capacity, grain, desc_offset, desc_size = fields[:6]
    gd_offset, check, compression = fields[8], fields[11], fields[12]
    if capacity == 0:
        if desc_offset:
            raise image.unsafe(
                "VMDK header has capacity 0 and a descriptor, which QEMU reads as a descriptor file "
                "naming other files; refused"
            )
        raise image.broken("VMDK header has capacity 0")
    if version not in (1, 2, 3):
        raise image.broken(f"VMDK version {version} is not supported")
    if capacity * SECTOR > MAX_VIRTUAL_BYTES:
        raise image.broken(f"VMDK capacity of {capacity} sectors is absurd")
    if grain < 8 or grain > 2**16 or grain & (grain - 1):
        raise image.broken(f"VMDK grain size of {grain} sectors is not a power of two between 8 and 65536")
    if flags & 1 and check != _VMDK_NEWLINE_CHECK:
        raise image.broken("VMDK newline check bytes are damaged (copied in text mode?)")
    if compression not in (0, 1):
        raise image.broken(f"VMDK compression algorithm {compression} is unknown")
    if desc_offset != 1 or not 1 <= desc_size <= 2048:
        raise image.broken(
            f"VMDK embedded descriptor at sector {desc_offset} ({desc_size} sectors); "
            "it must follow the header (sector 1, at most 1 MiB)"
        )
    if (desc_offset + desc_size) * SECTOR > image.size:
        raise image.broken("VMDK embedded descriptor runs past the end of the file (truncated)")
    text = _descriptor_text(image, desc_size)
    subformat = check_vmdk_descriptor(image.name, text, capacity)
    if (subformat == "streamOptimized") != (compression == 1):
        raise image.broken(f"VMDK header (compression {compression}) does not match createType {subformat!r}")
    if gd_offset == _VMDK_GD_AT_END and subformat != "streamOptimized":
        raise image.broken("VMDK grain directory at the end is only valid for streamOptimized images")
    return VerifiedImage("vmdk", capacity * SECTOR, subformat)


def _descriptor_text(image: _Image, desc_size: int) -> str:
    """The embedded descriptor as QEMU's string search sees it: from sector 1 to the first NUL.

    QEMU looks for ``parentFileNameHint`` in 20 sectors after the header, whatever the declared size,
    so the text must end (NUL) inside the declared descriptor, or it would read more than we do.
    """
    window = max(desc_size, _QEMU_DESC_SECTORS) * SECTOR
    raw = image.read(SECTOR, min(window, image.size - SECTOR), "VMDK descriptor")
    end = raw.find(b"\0")
    if end < 0 or end > desc_size * SECTOR:
        raise image.unsafe("VMDK descriptor text runs past its declared size; refused")
    return raw[:end].decode("latin-1")  # byte for byte, as QEMU's C string functions see it


_ASCII_SPACE = " \t\r\v\f"
_SPLIT = re.compile(r"[ \t\r\v\f]+")
_ACCESS = ("RW", "RDONLY", "NOACCESS")
_EXTENT = re.compile(
    r"(?P<access>RW|RDONLY|NOACCESS)[ \t]+(?P<sectors>\d{1,20})[ \t]+(?P<kind>\S+)"
    r'(?:[ \t]+"(?P<file>[^"]*)"(?:[ \t]+(?P<offset>\d{1,20}))?)?'
)
_KEY_VALUE = re.compile(r'(?P<key>[A-Za-z][A-Za-z0-9._]*)[ \t]*=[ \t]*(?P<value>"[^"]*"|[^"\s]*)')
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 ._+()-]{0,254}")
_KEYS_ALLOWED = frozenset({"version", "encoding", "CID", "parentCID", "createType", "isNativeSnapshot"})


def check_vmdk_descriptor(name: str, text: str, capacity: int) -> str:
    """Parse an embedded VMDK descriptor strictly; return its createType.

    Exactly one ``SPARSE`` extent (the image itself, ``capacity`` sectors) and no parent. Any other
    extent kind names another file (FLAT, VMFS, VMFSRDM, ...) or is not an image of its own (ZERO).
    Extent and comment lines are recognised the way QEMU's parser does (first token of a line), and
    ``createType`` / ``parentFileNameHint`` are also searched for anywhere, as QEMU's ``strstr`` does.
    """
    if "parentFileNameHint" in text:
        raise _unsafe(name, "VMDK descriptor names a parent (parentFileNameHint); differencing images are refused")
    if text.count("createType") != 1:
        raise _broken(name, f"VMDK descriptor has {text.count('createType')} createType entries; exactly one needed")
    keys: dict[str, str] = {}
    extents: list[re.Match[str]] = []
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip(_ASCII_SPACE)
        if not line or line.startswith("#"):
            continue
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in line):
            raise _broken(name, f"VMDK descriptor line {number} holds control characters")
        first = _SPLIT.split(line, maxsplit=1)[0]
        if first.upper() in _ACCESS:
            extents.append(_extent(name, line, number))
            continue
        match = _KEY_VALUE.fullmatch(line)
        if match is None:
            raise _broken(name, f"VMDK descriptor line {number} is neither a setting nor an extent: {line[:60]!r}")
        key, value = match.group("key"), match.group("value").strip('"')
        if key in keys:
            raise _broken(name, f"VMDK descriptor sets {key!r} twice")
        if key not in _KEYS_ALLOWED and not key.startswith("ddb."):
            raise _unsafe(name, f"VMDK descriptor has an unexpected setting {key!r}; refused")
        keys[key] = value
    create_type = keys.get("createType", "")
    if create_type not in VMDK_SUBFORMATS:
        raise _unsafe(
            name,
            f"VMDK createType {create_type!r}; only streamOptimized/monolithicSparse images with their own data "
            "are imported",
        )
    if keys.get("parentCID", "ffffffff").lower() != "ffffffff":
        raise _unsafe(name, f"VMDK descriptor has parentCID {keys['parentCID']}: a differencing image; refused")
    if len(extents) != 1:
        raise _unsafe(name, f"VMDK descriptor has {len(extents)} extents; exactly one (the image itself) is accepted")
    if int(extents[0].group("sectors")) != capacity:
        raise _broken(
            name, f"VMDK extent of {extents[0].group('sectors')} sectors does not match the header's {capacity}"
        )
    return create_type


def _extent(name: str, line: str, number: int) -> re.Match[str]:
    match = _EXTENT.fullmatch(line)
    if match is None:
        raise _unsafe(name, f"VMDK descriptor line {number} is a malformed extent: {line[:60]!r}")
    kind = match.group("kind")
    if kind != "SPARSE":
        raise _unsafe(
            name,
            f"VMDK extent {kind[:16]!r} names another file; "
            "only streamOptimized/monolithicSparse images with their own data are imported",
        )
    file_name = match.group("file")
    if file_name is None or not _PLAIN_NAME.fullmatch(file_name) or file_name.strip(". ") == "":
        raise _unsafe(
            name,
            f"VMDK extent names {file_name!r}; a sparse image's extent must be a plain file name (itself), "
            "not a path or a device",
        )
    if match.group("offset") not in (None, "0"):
        raise _unsafe(name, f"VMDK SPARSE extent has an offset ({match.group('offset')}); refused")
    return match
