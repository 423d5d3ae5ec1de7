"""The image guard: every way a disk could make QEMU read another file is refused from the header alone.

Synthetic headers cover each variant byte by byte; images made by qemu-img prove that real
streamOptimized/monolithicSparse VMDKs and qcow2 still pass; hypothesis fuzzes the parser (only typed
errors, ever) and checks against qemu-img that whatever the guard accepts opens no other file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from freezeframe.adapters.image_guard import check_vmdk_descriptor, detect_format, verify_bytes
from freezeframe.errors import InvalidRequest, OvaDiskError, OvaUnsafeDisk

KiB = 2**10
MiB = 2**20
GD_AT_END = 2**64 - 1
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed (package qemu-utils)")


# ------------------------------------------------------------------------------------------ builders


def vmdk_header(
    capacity: int = 2048,
    *,
    version: int = 1,
    flags: int = 3,
    grain: int = 128,
    desc_offset: int = 1,
    desc_size: int = 20,
    gd_offset: int = 21,
    check: bytes = b"\n \r\n",
    compression: int = 0,
    magic: bytes = b"KDMV",
) -> bytes:
    fields = struct.pack(
        "<IIQQQQIQQQB4sH",
        version,
        flags,
        capacity,
        grain,
        desc_offset,
        desc_size,
        512,
        0,
        gd_offset,
        128,
        0,
        check,
        compression,
    )
    return (magic + fields).ljust(512, b"\0")


def descriptor(
    create_type: str = "monolithicSparse",
    extents: Sequence[str] = ('RW 2048 SPARSE "disk.vmdk"',),
    extra: Sequence[str] = (),
    newline: str = "\n",
    parent_cid: str = "ffffffff",
) -> str:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=3d6c0b44",
        f"parentCID={parent_cid}",
        f'createType="{create_type}"',
        "",
        "# Extent description",
        *extents,
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        'ddb.adapterType = "ide"',
        *extra,
    ]
    return newline.join(lines) + newline


def vmdk(text: str | bytes = "", *, tail: int = 8 * 512, **header: int | bytes) -> bytes:
    """A KDMV image: header, the embedded descriptor padded to its declared size, some grain space."""
    raw = text.encode("latin-1") if isinstance(text, str) else text
    desc_size = header.get("desc_size", 20)
    assert isinstance(desc_size, int)
    body = raw.ljust(desc_size * 512, b"\0")
    return vmdk_header(**header) + body + bytes(tail)  # type: ignore[arg-type]


def stream_vmdk(text: str | None = None, **header: int | bytes) -> bytes:
    defaults: dict[str, int | bytes] = {"flags": 0x30001, "compression": 1, "version": 3, "gd_offset": GD_AT_END}
    return vmdk(text if text is not None else descriptor("streamOptimized"), **{**defaults, **header})


def qcow2(
    *,
    version: int = 3,
    backing: tuple[int, int] = (0, 0),
    cluster_bits: int = 16,
    size: int = MiB,
    crypt: int = 0,
    incompatible: int = 0,
    header_length: int = 104,
    refcount_order: int = 4,
    extensions: Sequence[tuple[int, bytes]] = (),
    total: int = 4096,
) -> bytes:
    head = struct.pack(
        ">4sIQIIQIIQQIIQ", b"QFI\xfb", version, *backing, cluster_bits, size, crypt, 1, 0x30000, 0x10000, 1, 0, 0
    )
    if version >= 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, refcount_order, header_length)
        head = head.ljust(header_length, b"\0")
    for kind, data in extensions:
        head += struct.pack(">II", kind, len(data)) + data.ljust(-(-len(data) // 8) * 8, b"\0")
    return (head + bytes(8)).ljust(total, b"\0")


def refused(data: bytes, claimed: str | None, error: type[OvaDiskError], match: str) -> OvaDiskError:
    with pytest.raises(error, match=match) as caught:
        verify_bytes("d.img", claimed, data)
    assert isinstance(caught.value, InvalidRequest)  # a user error (exit code / HTTP 4xx), not an internal one
    assert "\n" not in str(caught.value) and str(caught.value).startswith("disk d.img: ")
    return caught.value


# ------------------------------------------------------------------------------------------ accepted


def test_synthetic_good_images_pass() -> None:
    sparse = verify_bytes("d.vmdk", "vmdk", vmdk(descriptor()))
    assert (sparse.format, sparse.virtual_size, sparse.subformat) == ("vmdk", 2048 * 512, "monolithicSparse")
    stream = verify_bytes("d.vmdk", "vmdk", stream_vmdk())
    assert (stream.format, stream.subformat) == ("vmdk", "streamOptimized")
    assert verify_bytes("d.qcow2", "qcow2", qcow2()).subformat == "qcow2 v3"
    assert verify_bytes("d.qcow2", "qcow2", qcow2(version=2)).subformat == "qcow2 v2"
    assert verify_bytes("d.qcow2", "qcow2", qcow2(incompatible=1)).format == "qcow2"  # dirty: fine to read
    assert verify_bytes("d.qcow2", "qcow2", qcow2(extensions=[(0x6803F857, b"x" * 48)])).format == "qcow2"
    mbr = bytes(446) + bytes(64) + b"\x55\xaa"
    assert verify_bytes("d.raw", "raw", mbr * 8).format == "raw"
    assert verify_bytes("d.raw", "raw", b"").format == "raw"


@pytest.mark.parametrize(
    "text",
    [
        descriptor(newline="\r\n"),
        descriptor(extents=['  RW   2048\tSPARSE   "disk.vmdk"   ']),
        descriptor(extents=['RDONLY 2048 SPARSE "disk.vmdk"']),
        descriptor(extents=['RW 2048 SPARSE "disk.vmdk" 0']),
        descriptor(extents=['RW 2048 SPARSE "Ubuntu disk (1).vmdk"']),
        descriptor(extents=['# RW 2048 FLAT "/etc/shadow" 0', 'RW 2048 SPARSE "disk.vmdk"']),
        descriptor(extra=["", "   ", "\t", "# trailing comment", 'ddb.comment = ""', 'ddb.uuid.image="4"']),
        descriptor(parent_cid="FFFFFFFF"),
        descriptor().replace("version=1", "version=1 "),
    ],
    ids=[
        "crlf",
        "odd-spacing",
        "rdonly",
        "offset-0",
        "spaces-in-name",
        "commented-flat",
        "blank-lines",
        "CID-upper",
        "trailing-space",
    ],
)
def test_descriptor_variants_that_stay_safe_pass(text: str) -> None:
    assert verify_bytes("d.vmdk", "vmdk", vmdk(text)).subformat == "monolithicSparse"


# ------------------------------------------------------------------------------------------ VMDK: the attack


def test_capacity_zero_with_a_descriptor_is_the_attack_and_is_refused() -> None:
    """QEMU reads a KDMV header with capacity 0 as a descriptor file: its extents are host files."""
    attack = descriptor("monolithicFlat", ['RW 128 FLAT "/etc/shadow" 0'])
    refused(vmdk(attack, capacity=0), "vmdk", OvaUnsafeDisk, "capacity 0 and a descriptor")
    refused(vmdk(descriptor(), capacity=0), "vmdk", OvaUnsafeDisk, "capacity 0 and a descriptor")
    refused(vmdk(descriptor(), capacity=0, desc_offset=0), "vmdk", OvaDiskError, "capacity 0")


@pytest.mark.parametrize(
    "kind", ["FLAT", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "ZERO", "SESPARSE", "flat", "Sparse", "XYZ"]
)
def test_every_extent_kind_but_sparse_is_refused(kind: str) -> None:
    text = descriptor(extents=[f'RW 2048 {kind} "/etc/shadow" 0'])
    error = refused(vmdk(text), "vmdk", OvaUnsafeDisk, f"VMDK extent '{kind}' names another file")
    assert "only streamOptimized/monolithicSparse images with their own data are imported" in str(error)


@pytest.mark.parametrize(
    "extent",
    [
        'RW 2048 FLAT "/etc/shadow" 0',
        '\tRW 2048 FLAT "/etc/shadow" 0',
        '  RW\t2048\tFLAT\t"/etc/shadow"\t0  ',
        'RW 2048 FLAT "/etc/shadow" 0\r',
        'RW  2048  FLAT  "/dev/sda"  0',
        'NOACCESS 2048 FLAT "/etc/shadow" 0',
        'RDONLY 2048 FLAT "shadow" 0',
        'rw 2048 FLAT "/etc/shadow" 0',
        'RW 2048 FLAT "/etc/shadow"',
        'RW 2048 FLAT "../../etc/shadow" 0',
        'RW 2048 VMFS "other-project/member.qcow2"',
    ],
)
@pytest.mark.parametrize("surround", ["plain", "comments", "blank", "crlf"])
def test_file_extents_are_refused_whatever_the_spacing_around_them(extent: str, surround: str) -> None:
    extents = {
        "plain": [extent],
        "comments": ["# the data", extent, "#" + extent],
        "blank": ["", "   ", extent, "", "\t"],
        "crlf": [extent],
    }[surround]
    text = descriptor(extents=extents, newline="\r\n" if surround == "crlf" else "\n")
    refused(vmdk(text), "vmdk", OvaUnsafeDisk, "names another file|malformed extent")


@pytest.mark.parametrize(
    "extent",
    [
        'RW\n2048 FLAT "/etc/shadow" 0',  # QEMU's sscanf reads across newlines
        'RW 2048\nFLAT "/etc/shadow" 0',
        "RW 2048 FLAT /etc/shadow 0",
        'RW -1 SPARSE "disk.vmdk"',
        "RW",
    ],
)
def test_extents_split_or_mangled_are_refused(extent: str) -> None:
    refused(vmdk(descriptor(extents=[extent])), "vmdk", OvaUnsafeDisk, "malformed extent|names another file")


@pytest.mark.parametrize(
    "name",
    [
        "/etc/shadow",
        "/dev/sda",
        "/dev/disk/by-id/nvme-x",
        "/proc/self/environ",
        "../disk.vmdk",
        "sub/disk.vmdk",
        "./disk.vmdk",
        "..",
        ".",
        "",
        "C:\\disk.vmdk",
        "\\\\server\\share\\disk.vmdk",
        'json:{"driver":"file","filename":"/etc/shadow"}',
        "nbd://attacker/x",
        "file:/etc/shadow",
        "-disk.vmdk",
    ],
)
def test_a_sparse_extent_must_name_a_plain_file(name: str) -> None:
    text = descriptor(extents=[f'RW 2048 SPARSE "{name}"'])
    refused(vmdk(text), "vmdk", OvaUnsafeDisk, "plain file name|malformed extent")


def test_extent_counts_and_sizes() -> None:
    two = descriptor(extents=['RW 1024 SPARSE "disk.vmdk"', 'RW 1024 SPARSE "disk-s002.vmdk"'])
    refused(vmdk(two), "vmdk", OvaUnsafeDisk, "2 extents")
    mixed = descriptor(extents=['RW 2048 SPARSE "disk.vmdk"', 'RW 2048 FLAT "/etc/shadow" 0'])
    refused(vmdk(mixed), "vmdk", OvaUnsafeDisk, "'FLAT' names another file")
    refused(vmdk(descriptor(extents=[])), "vmdk", OvaUnsafeDisk, "0 extents")
    refused(vmdk(descriptor(extents=['RW 4096 SPARSE "disk.vmdk"'])), "vmdk", OvaDiskError, "does not match")
    refused(vmdk(descriptor(extents=['RW 2048 SPARSE "disk.vmdk" 512'])), "vmdk", OvaUnsafeDisk, "offset")


@pytest.mark.parametrize(
    "create_type",
    [
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "vmfs",
        "vmfsSparse",
        "vmfsThin",
        "vmfsRaw",
        "vmfsRawDeviceMap",
        "vmfsPassthroughRawDeviceMap",
        "fullDevice",
        "partitionedDevice",
        "seSparse",
        "custom",
        "streamoptimized",
        "",
    ],
)
def test_create_types_other_than_the_two_self_contained_ones_are_refused(create_type: str) -> None:
    refused(vmdk(descriptor(create_type)), "vmdk", OvaUnsafeDisk, "VMDK createType")


def test_create_type_must_appear_exactly_once() -> None:
    missing = descriptor().replace('createType="monolithicSparse"\n', "")
    refused(vmdk(missing), "vmdk", OvaDiskError, "0 createType")
    twice = descriptor(extra=['createType="monolithicFlat"'])
    refused(vmdk(twice), "vmdk", OvaDiskError, "2 createType")
    # QEMU finds the first 'createType' anywhere (strstr), even in a comment: that is refused too.
    hidden = descriptor().replace("# Disk DescriptorFile", '# createType="vmfs"')
    refused(vmdk(hidden), "vmdk", OvaDiskError, "2 createType")


@pytest.mark.parametrize(
    ("extra", "parent_cid", "match"),
    [
        (['parentFileNameHint="base.vmdk"'], "ffffffff", "parentFileNameHint"),
        (['parentFileNameHint="/var/lib/other/base.qcow2"'], "ffffffff", "parentFileNameHint"),
        (['# parentFileNameHint="/etc/shadow"'], "ffffffff", "parentFileNameHint"),
        ([], "1234abcd", "parentCID 1234abcd"),
        (['changeTrackPath="disk-ctk.vmdk"'], "ffffffff", "unexpected setting 'changeTrackPath'"),
        (['fileName="/etc/shadow"'], "ffffffff", "unexpected setting"),
    ],
)
def test_parents_and_other_file_names_in_the_descriptor_are_refused(
    extra: list[str], parent_cid: str, match: str
) -> None:
    refused(vmdk(descriptor(extra=extra, parent_cid=parent_cid)), "vmdk", OvaUnsafeDisk, match)


def test_parent_hint_past_the_declared_descriptor_is_refused() -> None:
    """QEMU searches 20 sectors after the header for parentFileNameHint, whatever desc_size says."""
    text = descriptor().encode().ljust(512, b" ") + b'parentFileNameHint="/etc/shadow"\n'
    image = vmdk_header(desc_size=1) + text.ljust(20 * 512, b"\0") + bytes(4096)
    refused(image, "vmdk", OvaUnsafeDisk, "runs past its declared size")


@pytest.mark.parametrize(
    ("header", "error", "match"),
    [
        ({"version": 4}, OvaDiskError, "VMDK version 4"),
        ({"version": 0}, OvaDiskError, "VMDK version 0"),
        ({"grain": 0}, OvaDiskError, "grain size"),
        ({"grain": 3}, OvaDiskError, "grain size"),
        ({"grain": 2**20}, OvaDiskError, "grain size"),
        ({"desc_offset": 0}, OvaDiskError, "embedded descriptor at sector 0"),
        ({"desc_offset": 2}, OvaDiskError, "embedded descriptor at sector 2"),
        ({"desc_size": 0}, OvaDiskError, "0 sectors"),
        ({"desc_size": 4096}, OvaDiskError, "4096 sectors"),
        ({"compression": 2}, OvaDiskError, "compression algorithm 2"),
        ({"compression": 1}, OvaDiskError, "does not match createType"),
        ({"check": b"\n \n\n"}, OvaDiskError, "newline check"),
        ({"gd_offset": GD_AT_END}, OvaDiskError, "only valid for streamOptimized"),
        ({"capacity": 2**60}, OvaDiskError, "absurd"),
    ],
)
def test_damaged_vmdk_headers_are_refused(
    header: dict[str, int | bytes], error: type[OvaDiskError], match: str
) -> None:
    refused(vmdk(descriptor(), **header), "vmdk", error, match)


def test_stream_optimized_must_be_compressed() -> None:
    refused(stream_vmdk(compression=0, gd_offset=21), "vmdk", OvaDiskError, "does not match createType")


def test_truncated_vmdks_are_refused() -> None:
    whole = vmdk(descriptor())
    refused(whole[:4], "vmdk", OvaDiskError, "4 bytes: too small")
    refused(whole[:511], "vmdk", OvaDiskError, "511 bytes: too small")
    refused(whole[:512], "vmdk", OvaDiskError, "truncated|outside")
    refused(whole[:1024], "vmdk", OvaDiskError, "truncated|outside|runs past")
    refused(vmdk(descriptor(), tail=0, desc_size=20)[: 512 + 10 * 512], "vmdk", OvaDiskError, "truncated|outside")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"COWD" + bytes(2044), "ESX sparse \\(COWD\\)"),
        (descriptor("monolithicFlat", ['RW 128 FLAT "/etc/shadow" 0']).encode(), "VMDK text descriptor"),
        (b'version=1\ncreateType="vmfs"\nRW 128 VMFS "/dev/sda"\n'.ljust(1024), "VMDK text descriptor"),
        (b'# made by hand\n\nversion=1\nRW 128 FLAT "/etc/shadow" 0\n'.ljust(1024), "VMDK text descriptor"),
        (b'\r\n  createType="monolithicFlat"\nRW 128 FLAT "/etc/shadow" 0\n'.ljust(1024), "VMDK text descriptor"),
        (qcow2(), "declared vmdk but it is a qcow2 image"),
        (b"conectix" + bytes(1016), "declared vmdk but it is a vpc"),
        (bytes(2048), "no KDMV magic"),
        (b"\xebc\x90" + bytes(2045), "no KDMV magic"),
    ],
    ids=[
        "cowd",
        "text-descriptor",
        "text-version-first",
        "text-leading-comment",
        "text-create-type",
        "qcow2",
        "vhd",
        "zeros",
        "boot-sector",
    ],
)
def test_non_sparse_vmdks_are_refused(data: bytes, match: str) -> None:
    refused(data, "vmdk", OvaDiskError, match)


def test_descriptor_with_control_characters_or_junk_lines_is_refused() -> None:
    refused(vmdk(descriptor(extra=['ddb.x = "a\x01b"'])), "vmdk", OvaDiskError, "control characters")
    refused(vmdk(descriptor(extra=["this is not a setting"])), "vmdk", OvaDiskError, "neither a setting")
    refused(vmdk(descriptor(extra=["version=2"])), "vmdk", OvaDiskError, "'version' twice")
    refused(vmdk(descriptor(extra=['\x85RW 2048 FLAT "/etc/shadow" 0'])), "vmdk", OvaDiskError, "neither")


# ------------------------------------------------------------------------------------------ qcow2


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (qcow2(backing=(512, 11)), OvaUnsafeDisk, "backing file"),
        (qcow2(backing=(0, 11)), OvaUnsafeDisk, "backing file"),
        (qcow2(version=2, backing=(72, 11)), OvaUnsafeDisk, "backing file"),
        (qcow2(incompatible=1 << 2), OvaUnsafeDisk, "external data file"),
        (qcow2(extensions=[(0x44415441, b"/etc/shadow")]), OvaUnsafeDisk, "external data file"),
        (qcow2(extensions=[(0xE2792ACA, b"raw")]), OvaUnsafeDisk, "backing file format"),
        (qcow2(crypt=1), OvaUnsafeDisk, "encrypted"),
        (qcow2(crypt=2), OvaUnsafeDisk, "encrypted"),
        (qcow2(extensions=[(0x0537BE77, bytes(16))]), OvaUnsafeDisk, "encryption"),
        (qcow2(incompatible=1 << 5), OvaUnsafeDisk, "unknown incompatible features 0x20"),
        (qcow2(incompatible=1 << 63), OvaUnsafeDisk, "unknown incompatible features"),
        (qcow2(incompatible=1 << 1), OvaDiskError, "marked corrupt"),
        (qcow2(cluster_bits=8), OvaDiskError, "cluster bits 8"),
        (qcow2(cluster_bits=22), OvaDiskError, "cluster bits 22"),
        (qcow2(header_length=96), OvaDiskError, "header length 96"),
        (qcow2(header_length=106), OvaDiskError, "header length 106"),
        (qcow2(refcount_order=7), OvaDiskError, "refcount order 7"),
        (qcow2(version=1), OvaUnsafeDisk, "declared qcow2 but it is a qcow \\(version 1\\)"),
        (qcow2(version=4), OvaDiskError, "qcow2 version 4"),
        (qcow2(size=2**60), OvaDiskError, "absurd"),
        (qcow2(extensions=[(0x12345678, bytes(8))], total=4096)[:160], OvaDiskError, "too small"),
        (qcow2(cluster_bits=9, total=512, extensions=[(0x6803F857, bytes(480))]), OvaDiskError, "runs past"),
        (vmdk(descriptor()), OvaUnsafeDisk, "declared qcow2 but it is a vmdk image"),
        (b"QED\0" + bytes(1020), OvaUnsafeDisk, "declared qcow2 but it is a qed"),
        (bytes(1024), OvaDiskError, "no QFI magic"),
    ],
)
def test_unsafe_or_damaged_qcow2_is_refused(image: bytes, error: type[OvaDiskError], match: str) -> None:
    refused(image, "qcow2", error, match)


def test_data_file_extension_after_harmless_ones_is_found() -> None:
    extensions = [(0x6803F857, b"n" * 48), (0x12345678, b"unknown"), (0x44415441, b"/dev/sda")]
    refused(qcow2(extensions=extensions), "qcow2", OvaUnsafeDisk, "external data file")


# ------------------------------------------------------------------------------------------ raw and others


@pytest.mark.parametrize(
    ("data", "detected"),
    [
        (qcow2(), "qcow2"),
        (qcow2(version=1), "qcow \\(version 1\\)"),
        (vmdk(descriptor()), "vmdk"),
        (b"COWD" + bytes(1020), "vmdk \\(ESX sparse COWD\\)"),
        (b"# Disk DescriptorFile\nversion=1\n".ljust(1024), "vmdk \\(text descriptor\\)"),
        (b'version=1\ncreateType="monolithicFlat"\n'.ljust(1024), "vmdk \\(text descriptor\\)"),
        (b"conectix" + bytes(1016), "vpc \\(VHD\\)"),
        (bytes(1024) + b"conectix" + bytes(504), "vpc \\(fixed VHD footer\\)"),
        (b"vhdxfile" + bytes(1016), "vhdx"),
        (bytes(64) + struct.pack("<I", 0xBEDA107F) + bytes(956), "vdi"),
        (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(1024, b"\0"), "vdi"),
        (b"QED\0" + bytes(1020), "qed"),
        (b"Bochs Virtual HD Image".ljust(1024, b"\0"), "bochs"),
        (
            b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".ljust(1024),
            "cloop",
        ),
        (b"WithoutFreeSpace" + bytes(1008), "parallels"),
        (b"LUKS\xba\xbe" + bytes(1018), "luks"),
        (bytes(1024) + b"koly" + bytes(508), "dmg"),
    ],
)
def test_raw_carrying_another_formats_magic_is_refused(data: bytes, detected: str) -> None:
    refused(data, "raw", OvaUnsafeDisk, f"declared raw but it is a {detected} image")


@pytest.mark.parametrize("claimed", ["vpc", "vdi", "vhdx", "qed", "vmdk3", "VMDK", "", None])
def test_formats_we_do_not_import_are_refused(claimed: str | None) -> None:
    refused(b"conectix" + bytes(1016), claimed, OvaDiskError, "is not imported; only qcow2, raw and VMDK")


def test_detect_format_sees_nothing_in_plain_data() -> None:
    assert detect_format(b"\xebc\x90" + bytes(4093), bytes(512)) is None
    assert detect_format(b"") is None


# ------------------------------------------------------------------------------------------ real images


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


@needs_qemu
@pytest.mark.parametrize(
    ("fmt", "options", "subformat"),
    [
        ("vmdk", "subformat=streamOptimized", "streamOptimized"),
        ("vmdk", "subformat=streamOptimized,adapter_type=lsilogic", "streamOptimized"),
        ("vmdk", "subformat=monolithicSparse", "monolithicSparse"),
        ("qcow2", "compat=1.1", "qcow2 v3"),
        ("qcow2", "compat=0.10", "qcow2 v2"),
        ("raw", "", ""),
    ],
)
def test_images_made_by_qemu_img_pass(tmp_path: Path, fmt: str, options: str, subformat: str) -> None:
    src = tmp_path / "src.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(src), "8M").returncode == 0
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(src)], check=True, capture_output=True)
    out = tmp_path / f"out.{fmt}"
    args = ["convert", "-f", "qcow2", "-O", fmt, *(["-o", options] if options else []), str(src), str(out)]
    assert qemu_img(*args).returncode == 0
    verified = verify_bytes(out.name, fmt, out.read_bytes())
    assert (verified.format, verified.subformat) == (fmt, subformat)
    if fmt != "raw":
        assert verified.virtual_size == 8 * MiB
    created = tmp_path / f"created.{fmt}"
    assert (
        qemu_img("create", "-q", "-f", fmt, *(["-o", options] if options else []), str(created), "1G").returncode == 0
    )
    assert verify_bytes(created.name, fmt, created.read_bytes()).format == fmt


@needs_qemu
def test_images_qemu_img_makes_with_a_parent_are_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(base), "8M").returncode == 0
    overlay = tmp_path / "overlay.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)).returncode == 0
    refused(overlay.read_bytes(), "qcow2", OvaUnsafeDisk, "backing file")
    vmdk_base = tmp_path / "base.vmdk"
    assert qemu_img("create", "-q", "-f", "vmdk", str(vmdk_base), "8M").returncode == 0
    delta = tmp_path / "delta.vmdk"
    assert qemu_img("create", "-q", "-f", "vmdk", "-b", str(vmdk_base), "-F", "vmdk", str(delta)).returncode == 0
    refused(delta.read_bytes(), "vmdk", OvaUnsafeDisk, "parentFileNameHint")
    data_file = tmp_path / "external.qcow2"
    raw = tmp_path / "external.raw"
    args = ["create", "-q", "-f", "qcow2", "-o", f"data_file={raw}", str(data_file), "8M"]
    assert qemu_img(*args).returncode == 0
    refused(data_file.read_bytes(), "qcow2", OvaUnsafeDisk, "external data file")
    for subformat in ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        split = tmp_path / f"{subformat}.vmdk"
        assert qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(split), "8M").returncode == 0
        refused(split.read_bytes(), "vmdk", OvaUnsafeDisk, "text descriptor")


# ------------------------------------------------------------------------------------------ fuzzing

FORMATS = st.sampled_from(["vmdk", "qcow2", "raw", "vpc", None])
SEEDS = [vmdk(descriptor()), stream_vmdk(), qcow2(), qcow2(version=2), vmdk(descriptor(), capacity=0)]


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=4096), claimed=FORMATS)
def test_fuzz_random_bytes_give_only_typed_errors(data: bytes, claimed: str | None) -> None:
    with contextlib.suppress(OvaDiskError):
        verify_bytes("fuzz", claimed, data)


@settings(max_examples=600, deadline=None)
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.integers(0, 12 * 1024)),
    claimed=FORMATS,
)
def test_fuzz_mutated_headers_give_only_typed_errors(
    seed: bytes, edits: list[tuple[int, int]], cut: int | None, claimed: str | None
) -> None:
    data = bytearray(seed)
    for offset, value in edits:
        data[offset] = value
    try:
        verified = verify_bytes("fuzz", claimed, bytes(data[:cut]))
    except OvaDiskError:
        return
    assert verified.format == claimed


DESCRIPTOR_LINES = st.sampled_from(
    [
        "",
        "   ",
        "# comment",
        '#RW 2048 FLAT "/etc/shadow" 0',
        'ddb.adapterType = "lsilogic"',
        'ddb.comment=""',
        'encoding="UTF-8"',
        'RW 2048 FLAT "/etc/shadow" 0',
        "RW 2048 ZERO",
        'RW 2048 SPARSE "/etc/shadow"',
        'RW 2048 SPARSE "other.vmdk"',
        'parentFileNameHint="/etc/shadow"',
        'createType="monolithicFlat"',
        "RW",
        '2048 FLAT "/etc/shadow" 0',
        "garbage \x01",
    ]
)


@settings(max_examples=300, deadline=None)
@given(before=st.lists(DESCRIPTOR_LINES, max_size=4), after=st.lists(DESCRIPTOR_LINES, max_size=4), crlf=st.booleans())
def test_fuzz_descriptor_lines(before: list[str], after: list[str], crlf: bool) -> None:
    """Whatever the lines around the one good extent, an accepted descriptor has no other file in it."""
    newline = "\r\n" if crlf else "\n"
    text = descriptor(extents=[*before, 'RW 2048 SPARSE "disk.vmdk"', *after], newline=newline)
    try:
        assert check_vmdk_descriptor("fuzz", text, 2048) == "monolithicSparse"
    except OvaDiskError:
        return
    live = [line for line in text.split("\n") if not line.strip().startswith("#")]
    assert not any("/etc/shadow" in line or "other.vmdk" in line for line in live)


@pytest.fixture(scope="module")
def qemu_vmdks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A streamOptimized and a monolithicSparse VMDK of 8 MiB with data, made by qemu-img."""
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.fail("qemu-img/qemu-io not installed; run scripts/setup-host.sh (package qemu-utils)")
    work = tmp_path_factory.mktemp("vmdks")
    src = work / "src.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(src), "8M").returncode == 0
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(src)], check=True, capture_output=True)
    images = {}
    for subformat in ("streamOptimized", "monolithicSparse"):
        out = work / f"{subformat}.vmdk"
        assert (
            qemu_img(
                "convert", "-f", "qcow2", "-O", "vmdk", "-o", f"subformat={subformat}", str(src), str(out)
            ).returncode
            == 0
        )
        images[subformat] = out.read_bytes()
    return images


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.lists(DESCRIPTOR_LINES, max_size=5), stream=st.booleans(), crlf=st.booleans())
@example(noise=[], stream=False, crlf=False)
@example(noise=["# comment", ""], stream=True, crlf=True)
def test_fuzz_whatever_the_guard_accepts_qemu_opens_nothing_else(
    qemu_vmdks: dict[str, bytes], tmp_path: Path, noise: list[str], stream: bool, crlf: bool
) -> None:
    """Cross-check against QEMU itself: an accepted image has exactly one extent, the image, and no backing.

    The embedded descriptor of a real qemu-img image is replaced by one with fuzzed lines around its extent.
    """
    create_type = "streamOptimized" if stream else "monolithicSparse"
    base = bytearray(qemu_vmdks[create_type])
    capacity = struct.unpack_from("<Q", base, 12)[0]
    extent = f'RW {capacity} SPARSE "disk.vmdk"'
    text = descriptor(create_type, extents=[extent, *noise], newline="\r\n" if crlf else "\n").encode()
    base[512 : 512 + 20 * 512] = text.ljust(20 * 512, b"\0")
    try:
        verify_bytes("disk.vmdk", "vmdk", bytes(base))
    except OvaDiskError:
        return
    path = tmp_path / "accepted.vmdk"
    path.write_bytes(bytes(base))
    proc = qemu_img("info", "--output=json", "-f", "vmdk", str(path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "backing-filename" not in info
    assert [e["filename"] for e in info["format-specific"]["data"]["extents"]] == [str(path)]
    assert info["virtual-size"] == capacity * 512
