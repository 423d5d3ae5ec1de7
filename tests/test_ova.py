"""OVA packages: the streaming writer against qemu-img, the defensive reader against hostile and real packages."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.adapters.image_guard import VerifiedImage
from freezeframe.adapters.ova import (
    OvaDiskSource,
    disk_writer,
    open_ova,
    parse_manifest,
    probe_disk,
    qemu_json_for,
    write_ova,
)
from freezeframe.adapters.ova import probe as probe_module
from freezeframe.adapters.ova.tar import ustar_header
from freezeframe.adapters.ovf import OvfDisk, build_descriptor, validate_descriptor
from freezeframe.errors import (
    InsufficientSpace,
    InvalidRequest,
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
    OvfCapacityError,
    OvfNotOvf,
    OvfUnsafeXml,
)
from freezeframe.model import BootSpec, Consistency, DiskSpec, Hardware, Member, NicSpec, SetStatus, SnapshotSet

PROJECT = Path(__file__).resolve().parents[1]
# ../shared next to the project (a clone), or two levels up (a git worktree under wt/).
SHARED = next(
    (p / "shared" / "ovf" for p in (PROJECT.parent, PROJECT.parent.parent) if (p / "shared" / "ovf").is_dir()),
    PROJECT.parent / "shared" / "ovf",
)
OVA_SAMPLES = SHARED / "samples" / "ova"
XSD = SHARED / "xsd"
SET_ID = "3c2b1a09-8f7e-4d6c-b5a4-392817161514"
MiB = 2**20
GiB = 2**30

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed (package qemu-utils)",
)


# ------------------------------------------------------------------------------------------ helpers


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def make_qcow2(path: Path, size: str, writes: Sequence[tuple[int, int, int]] = ()) -> Path:
    """A qcow2 of ``size`` with ``(pattern, offset, length)`` writes done by qemu-io."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if writes:
        args = ["qemu-io", "-f", "qcow2"]
        for pattern, offset, length in writes:
            args += ["-c", f"write -P {pattern:#x} {offset} {length}"]
        subprocess.run([*args, str(path)], check=True, capture_output=True)
    return path


def make_random_qcow2(path: Path, size: int) -> Path:
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    finally:
        raw.unlink()
    return path


def make_set(targets: Sequence[tuple[str, str, int]]) -> SnapshotSet:
    members = [
        Member(
            SET_ID, target, bus, 1 if i == 0 else None, size, "qcow2", f"/sets/{target}.qcow2", metadata={"n": str(i)}
        )
        for i, (target, bus, size) in enumerate(targets)
    ]
    hw = Hardware(
        vcpus=2,
        memory_kib=1024 * 1024,
        arch="x86_64",
        machine="pc-q35-7.2",
        boot=BootSpec(),
        disks=tuple(DiskSpec(t, b, f"/images/{t}.qcow2", "qcow2", s) for t, b, s in targets),
        nics=(NicSpec("52:54:00:aa:bb:cc", "virtio", "network", "default"),),
    )
    return SnapshotSet(
        id=SET_ID,
        name="weekly",
        instance_name="db01",
        instance_uuid="9e8d7c6b-5a49-3827-1605-f4e3d2c1b0a9",
        requested=Consistency.FILESYSTEM,
        status=SetStatus.AVAILABLE,
        created_at=datetime(2024, 11, 27, 8, 30, tzinfo=UTC),
        hardware=hw,
        achieved=Consistency.FILESYSTEM,
        members=members,
    )


def factory(snapshot_set: SnapshotSet) -> Callable[[Sequence[OvfDisk]], bytes]:
    def build(disks: Sequence[OvfDisk]) -> bytes:
        return build_descriptor(snapshot_set, disks)

    return build


@pytest.fixture
def two_disks(tmp_path: Path) -> tuple[Path, Path]:
    a = make_qcow2(tmp_path / "vda.qcow2", "64M", [(0xAB, 0, MiB), (0x11, 40 * MiB, 3 * MiB)])
    b = make_qcow2(tmp_path / "vdb.qcow2", "1G", [(0xCD, 100 * MiB, 2 * MiB)])
    return a, b


def headers(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, raw 512-byte header) of each member, read without tarfile's leniency."""
    with tarfile.open(path, "r:") as tf:
        infos = tf.getmembers()
    with path.open("rb") as f:
        for info in infos:
            f.seek(info.offset)
            yield info.name, f.read(512)


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def manifest(entries: dict[str, bytes], algorithm: str = "SHA256", style: str = "{a}({n})= {d}") -> bytes:
    lines = [
        style.format(a=algorithm, n=n, d=hashlib.new(algorithm.lower(), data).hexdigest())
        for n, data in entries.items()
    ]
    return ("\n".join(lines) + "\n").encode()


def small_package(tmp_path: Path) -> tuple[bytes, bytes]:
    """A descriptor and the qcow2 disk it references (d.qcow2, 64 MiB)."""
    disk = make_qcow2(tmp_path / "src.qcow2", "64M", [(0x5A, 0, MiB)]).read_bytes()
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    descriptor = build_descriptor(snapshot_set, [OvfDisk("vda", "d.qcow2", len(disk), "qcow2", 64 * MiB, MiB)])
    return descriptor, disk


def tar_of(path: Path, members: Sequence[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            add(tf, name, data)
    return path


# ------------------------------------------------------------------------------------------ writer


@pytest.mark.parametrize("mode", ["copy", "vmdk"])
def test_write_two_disk_package(tmp_path: Path, two_disks: tuple[Path, Path], mode: str) -> None:
    ext = "qcow2" if mode == "copy" else "vmdk"
    snapshot_set = make_set([("vda", "virtio", 64 * MiB), ("vdb", "virtio", GiB)])
    sources = [
        OvaDiskSource(f"db01-vda.{ext}", two_disks[0], "qcow2", "vda", mode),  # type: ignore[arg-type]
        OvaDiskSource(f"db01-vdb.{ext}", two_disks[1], "qcow2", "vdb", mode),  # type: ignore[arg-type]
    ]
    seen: list[tuple[int, int]] = []
    out = tmp_path / "db01.ova"
    result = write_ova(out, "db01.ovf", factory(snapshot_set), sources, lambda d, t: seen.append((d, t)))

    assert out.stat().st_size == result.size
    assert out.stat().st_size % 10240 == 0
    names = [name for name, _ in headers(out)]
    assert names == ["db01.ovf", "db01.mf", f"db01-vda.{ext}", f"db01-vdb.{ext}"]
    for name, raw in headers(out):
        assert raw[257:265] == b"ustar\x0000", name  # POSIX ustar, not GNU or pax

    with tarfile.open(out, "r:") as tf:
        contents = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
    lines = contents["db01.mf"].decode().splitlines()
    assert lines == [f"SHA256({n})= {hashlib.sha256(contents[n]).hexdigest()}" for n in names if n != "db01.mf"]

    package = open_ova(out)
    assert set(package.verified) == {"db01.ovf", f"db01-vda.{ext}", f"db01-vdb.{ext}"}
    assert package.unverified == ()
    assert package.warnings == ()
    assert [d.name for d in package.disks] == names[2:]
    for disk, source in zip(package.disks, two_disks, strict=True):
        compare = qemu_img("compare", "-f", "qcow2", str(source), qemu_json_for(disk))
        assert compare.returncode == 0, compare.stdout + compare.stderr
        probe = probe_disk(disk)
        assert probe.format == ext
        assert probe.check == "ok"
        if mode == "vmdk":
            assert probe.info["format-specific"]["data"]["create-type"] == "streamOptimized"
    machine = package.machine
    assert [(d.href, d.file_size, d.capacity, d.format) for d in machine.disks] == [
        (f"db01-vda.{ext}", len(contents[f"db01-vda.{ext}"]), 64 * MiB, ext),
        (f"db01-vdb.{ext}", len(contents[f"db01-vdb.{ext}"]), GiB, ext),
    ]
    assert [d.populated_size for d in machine.disks] == [4 * MiB, 2 * MiB]
    assert machine.freezeframe is not None and machine.freezeframe.set_id == SET_ID
    if not (XSD / "ovf1").is_dir():
        pytest.skip(f"DMTF OVF schemas not found at {XSD} (shared/ovf/xsd): the descriptor could not be validated")
    validate_descriptor(package.descriptor, 1, XSD)
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fixed_descriptor_bytes_for_copied_disks(tmp_path: Path, two_disks: tuple[Path, Path]) -> None:
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    disk = OvfDisk("vda", "a.qcow2", two_disks[0].stat().st_size, "qcow2", 64 * MiB, 4 * MiB)
    descriptor = build_descriptor(snapshot_set, [disk])
    result = write_ova(
        tmp_path / "a.ova", "a.ovf", descriptor, [OvaDiskSource.copy("a.qcow2", two_disks[0], "qcow2", "vda")]
    )
    assert result.descriptor == descriptor
    assert open_ova(tmp_path / "a.ova").verified["a.ovf"] == "SHA256"
    wrong = build_descriptor(snapshot_set, [OvfDisk("vda", "a.qcow2", 1, "qcow2", 64 * MiB)])
    with pytest.raises(OvaWriteError, match="descriptor factory"):
        write_ova(tmp_path / "b.ova", "b.ovf", wrong, [OvaDiskSource.copy("a.qcow2", two_disks[0], "qcow2", "vda")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ova", "vda.qcow2", "vdb.qcow2"]


def test_sparse_disk_gives_a_small_package(tmp_path: Path) -> None:
    src = make_qcow2(tmp_path / "big.qcow2", "1G", [(0xAB, 0, MiB)])
    snapshot_set = make_set([("vda", "virtio", GiB)])
    vmdk = write_ova(
        tmp_path / "v.ova", "v.ovf", factory(snapshot_set), [OvaDiskSource.to_vmdk("v.vmdk", src, "qcow2", "vda")]
    )
    qcow = write_ova(
        tmp_path / "q.ova", "q.ovf", factory(snapshot_set), [OvaDiskSource.copy("q.qcow2", src, "qcow2", "vda")]
    )
    print(f"1 GiB disk with 1 MiB of data: vmdk OVA {vmdk.size} bytes, qcow2 OVA {qcow.size} bytes")
    assert vmdk.size < 2 * MiB
    assert qcow.size < 4 * MiB
    assert (tmp_path / "v.ova").stat().st_blocks * 512 < 4 * MiB
    assert (
        qemu_img("compare", "-f", "qcow2", str(src), qemu_json_for(open_ova(tmp_path / "v.ova").disks[0])).returncode
        == 0
    )


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, time, tracemalloc
    from pathlib import Path
    from freezeframe.adapters.ova import OvaDiskSource, write_ova

    def hwm():  # peak RSS of this process image (ru_maxrss would include the parent's, inherited at exec)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    src, out_dir, trace = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "trace"
    descriptor = b"<?xml version='1.0'?><Envelope/>"
    results = {"rss_before": hwm()}
    if trace:
        tracemalloc.start()
    for mode in ("copy", "vmdk"):
        if trace:
            tracemalloc.reset_peak()
        started = time.monotonic()
        write_ova(out_dir / f"{sys.argv[3]}-{mode}.ova", "m.ovf", lambda disks: descriptor,
                  [OvaDiskSource(f"m.{mode}", src, "qcow2", "vda", mode)])
        results[mode] = {"seconds": round(time.monotonic() - started, 2)}
        if trace:
            results[mode]["peak"] = tracemalloc.get_traced_memory()[1]
    results["rss_after"] = hwm()
    print(json.dumps(results))
    """
)


def test_peak_memory_is_bounded_whatever_the_disk_size(tmp_path: Path) -> None:
    size = 128 * MiB  # five times the Python bound, above the whole-process bound: a buffered copy would fail
    src = make_random_qcow2(tmp_path / "random.qcow2", size)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    measured = {}
    for flavour in ("trace", "rss"):
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(src), str(out_dir), flavour],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        measured[flavour] = json.loads(proc.stdout)
    print(f"write_ova of {size >> 20} MiB random data: {measured}")
    for mode in ("copy", "vmdk"):
        assert measured["trace"][mode]["peak"] < 24 * MiB, mode  # Python allocations: a few 4 MiB buffers
    rss = measured["rss"]
    assert rss["rss_after"] - rss["rss_before"] < 32 * MiB  # whole process, qemu-img children excluded
    assert rss["rss_after"] < 96 * MiB
    assert (out_dir / "rss-copy.ova").stat().st_size > size


def _standalone_vmdk(src: Path, dest: Path) -> float:
    started = time.monotonic()
    options = "subformat=streamOptimized,adapter_type=lsilogic"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", options, str(src), str(dest)], check=True)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)  # write_ova fsyncs its package too
    finally:
        os.close(fd)
    return time.monotonic() - started


def test_in_place_vmdk_member_matches_a_standalone_qemu_img_conversion(tmp_path: Path) -> None:
    """Same bytes as qemu-img's own streamOptimized output (speed is compared in bench/throughput.py)."""
    src = make_random_qcow2(tmp_path / "random.qcow2", 64 * MiB)
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    standalone = tmp_path / "standalone.vmdk"
    _standalone_vmdk(src, standalone)
    out = tmp_path / "p.ova"
    result = write_ova(out, "p.ovf", factory(snapshot_set), [OvaDiskSource.to_vmdk("p.vmdk", src, "qcow2", "vda")])
    member = next(m for m in result.members if m.name == "p.vmdk")
    assert abs(member.size - standalone.stat().st_size) < 64 * 1024
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "vmdk", str(src), qemu_json_for(open_ova(out).disks[0])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_large_member_sizes_use_base256(tmp_path: Path) -> None:
    header = ustar_header("huge.vmdk", 9 * GiB, 0)
    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    assert info.size == 9 * GiB
    assert header[257:265] == b"ustar\x0000"
    assert tarfile.TarInfo.frombuf(ustar_header("s", 1234, 0), "utf-8", "strict").size == 1234


def test_write_refuses_bad_input_and_leaves_nothing_behind(tmp_path: Path, two_disks: tuple[Path, Path]) -> None:
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    src = two_disks[0]
    with pytest.raises(OvaWriteError, match="plain file name"):
        write_ova(
            tmp_path / "x.ova", "x.ovf", factory(snapshot_set), [OvaDiskSource.copy("../x.qcow2", src, "qcow2", "vda")]
        )
    with pytest.raises(OvaWriteError, match="does not exist"):
        write_ova(
            tmp_path / "x.ova",
            "x.ovf",
            factory(snapshot_set),
            [OvaDiskSource.copy("x.qcow2", tmp_path / "nope", "qcow2", "vda")],
        )
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(src), "-F", "qcow2", str(overlay)], check=True)
    with pytest.raises(OvaWriteError, match="backing"):
        write_ova(
            tmp_path / "x.ova", "x.ovf", factory(snapshot_set), [OvaDiskSource.copy("x.qcow2", overlay, "qcow2", "vda")]
        )

    def failing(disks: Sequence[OvfDisk]) -> bytes:
        if disks[0].file_size < 10**18:
            raise RuntimeError("descriptor factory failed")
        return b"<Envelope/>"

    with pytest.raises(RuntimeError, match="factory failed"):
        write_ova(tmp_path / "x.ova", "x.ovf", failing, [OvaDiskSource.to_vmdk("x.vmdk", src, "qcow2", "vda")])
    (tmp_path / "exists.ova").write_bytes(b"")
    with pytest.raises(OvaWriteError, match="already exists"):
        write_ova(
            tmp_path / "exists.ova",
            "x.ovf",
            factory(snapshot_set),
            [OvaDiskSource.copy("x.qcow2", src, "qcow2", "vda")],
        )
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["exists.ova", "overlay.qcow2", "vda.qcow2", "vdb.qcow2"]


def test_enospc_while_copying_is_reported_and_cleaned_up(
    tmp_path: Path, two_disks: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_writer, "copy_hashed", full)
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    with pytest.raises(OvaNoSpace, match="no space") as caught:
        write_ova(
            tmp_path / "x.ova",
            "x.ovf",
            factory(snapshot_set),
            [OvaDiskSource.copy("x.qcow2", two_disks[0], "qcow2", "vda")],
        )
    assert isinstance(caught.value, InsufficientSpace)
    assert caught.value.exit_code == InsufficientSpace.exit_code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vda.qcow2", "vdb.qcow2"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_real_enospc_during_conversion(tmp_path: Path, small_fs: Path) -> None:
    src = make_random_qcow2(tmp_path / "random.qcow2", 8 * MiB)
    snapshot_set = make_set([("vda", "virtio", 8 * MiB)])
    with pytest.raises(OvaNoSpace):
        write_ova(
            small_fs / "x.ova", "x.ovf", factory(snapshot_set), [OvaDiskSource.to_vmdk("x.vmdk", src, "qcow2", "vda")]
        )
    assert list(small_fs.iterdir()) == []
    with pytest.raises(OvaNoSpace, match="bytes free"):
        write_ova(
            small_fs / "y.ova", "y.ovf", factory(snapshot_set), [OvaDiskSource.copy("y.qcow2", src, "qcow2", "vda")]
        )
    assert list(small_fs.iterdir()) == []


# ------------------------------------------------------------------------------------------ reader: real samples

OVA_EXPECTATIONS: dict[str, tuple[type[OvaError] | None, str]] = {
    "cot_ubuntu2.0.ova": (None, ""),
    "glance__testserver.ova": (OvaDiskError, "4 bytes"),
    "govmomi__ttylinux-pc_i486-16.1.ova": (OvaDiskError, "Invalid footer"),
}


def test_every_ova_sample_has_an_expectation() -> None:
    if not OVA_SAMPLES.is_dir():
        pytest.skip(f"shared OVA samples not found at {OVA_SAMPLES}")
    assert sorted(p.name for p in OVA_SAMPLES.glob("*.ova")) == sorted(OVA_EXPECTATIONS)


@pytest.mark.parametrize("name", sorted(OVA_EXPECTATIONS))
def test_ova_samples_open_and_probe(name: str) -> None:
    path = OVA_SAMPLES / name
    if not path.is_file():
        pytest.skip(f"shared OVA sample {path} not found")
    package = open_ova(path)
    assert package.descriptor_name.endswith(".ovf")
    assert len(package.disks) == 1
    error, match = OVA_EXPECTATIONS[name]
    if error is None:
        probe = probe_disk(package.disks[0])
        assert probe.format == "vmdk"
        assert probe.virtual_size == 8 * GiB
        assert probe.check == "ok"
        assert set(package.verified) == {"ubuntu.2.0.ovf", "ubuntu.2.0-disk1.vmdk"}
    else:
        with pytest.raises(error, match=match) as caught:
            probe_disk(package.disks[0])
        assert isinstance(caught.value, InvalidRequest)
    if name.startswith("govmomi"):
        assert package.verified == {
            "ttylinux-pc_i486-16.1.ovf": "SHA1",
            "ttylinux-pc_i486-16.1-disk1.vmdk": "SHA1",
        }
        assert any("10595840" in w for w in package.warnings)
    if name.startswith("glance"):
        assert package.manifest_name is None
        assert package.unverified == ("testserver-disk1.vmdk",)
        assert any("no manifest" in w for w in package.warnings)


# ------------------------------------------------------------------------------------------ reader: hostile input


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (("../evil.vmdk", {}), r"'\.\.'"),
        (("/etc/evil.vmdk", {}), "absolute"),
        (("sub/./x", {}), r"'\.'"),
        (("link.vmdk", {"type": tarfile.SYMTYPE, "linkname": "/etc/shadow"}), "symbolic link"),
        (("hard.vmdk", {"type": tarfile.LNKTYPE, "linkname": "d.qcow2"}), "hard link"),
        (("dev.vmdk", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}), "device"),
        (("blk.vmdk", {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0}), "device"),
        (("fifo.vmdk", {"type": tarfile.FIFOTYPE}), "fifo"),
        (("dir", {"type": tarfile.DIRTYPE}), "directory"),
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, member: tuple[str, dict[str, object]], match: str) -> None:
    descriptor, disk = small_package(tmp_path)
    path = tmp_path / "evil.ova"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        add(tf, "x.ovf", descriptor)
        add(tf, "d.qcow2", disk)
        name, attrs = member
        add(tf, name, b"evil" if not attrs else b"", **attrs)
    with pytest.raises(OvaUnsafeMember, match=match):
        open_ova(path)


def test_layout_oddities_are_refused(tmp_path: Path) -> None:
    descriptor, disk = small_package(tmp_path)
    with pytest.raises(OvaLayoutError, match="must come first"):
        open_ova(tar_of(tmp_path / "a.ova", [("d.qcow2", disk), ("x.ovf", descriptor)]))
    with pytest.raises(OvaLayoutError, match="twice"):
        open_ova(tar_of(tmp_path / "b.ova", [("x.ovf", descriptor), ("d.qcow2", disk), ("d.qcow2", disk)]))
    with pytest.raises(OvaLayoutError, match="not a tar"):
        (tmp_path / "c.ova").write_bytes(b"PK\x03\x04 this is a zip" * 100)
        open_ova(tmp_path / "c.ova")
    with pytest.raises(OvaLayoutError, match=r"several \.ovf"):
        open_ova(tar_of(tmp_path / "d.ova", [("x.ovf", descriptor), ("y.ovf", descriptor), ("d.qcow2", disk)]))
    whole = tar_of(tmp_path / "e.ova", [("x.ovf", descriptor), ("d.qcow2", disk)]).read_bytes()
    (tmp_path / "e.ova").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OvaLayoutError, match="truncated"):
        open_ova(tmp_path / "e.ova")
    path = tmp_path / "f.ova"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "x.ovf", descriptor)
        add(tf, "d.qcow2", disk, pax_headers={"SCHILY.xattr.user.evil": "1"})
    with pytest.raises(OvaLayoutError, match="pax"):
        open_ova(path)
    path = tmp_path / "g.ova"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        add(tf, "x.ovf", descriptor)
    with pytest.raises(OvaLayoutError, match="global"):
        open_ova(path)
    v7 = bytearray(tar_of(tmp_path / "h.ova", [("x.ovf", descriptor), ("d.qcow2", disk)]).read_bytes())
    v7[257:265] = bytes(8)
    v7[148:156] = b" " * 8
    v7[148:156] = b"%06o\0 " % sum(v7[:512])
    (tmp_path / "h.ova").write_bytes(bytes(v7))
    with pytest.raises(OvaLayoutError, match="v7"):
        open_ova(tmp_path / "h.ova")


def test_gnu_tar_headers_are_accepted(tmp_path: Path) -> None:
    descriptor, disk = small_package(tmp_path)
    package = open_ova(tar_of(tmp_path / "gnu.ova", [("x.ovf", descriptor), ("d.qcow2", disk)], tarfile.GNU_FORMAT))
    assert probe_disk(package.disks[0]).check == "ok"


def test_manifest_is_verified_before_anything_else(tmp_path: Path) -> None:
    descriptor, disk = small_package(tmp_path)
    good = manifest({"x.ovf": descriptor, "d.qcow2": disk})
    package = open_ova(tar_of(tmp_path / "ok.ova", [("x.ovf", descriptor), ("x.mf", good), ("d.qcow2", disk)]))
    assert package.verified == {"x.ovf": "SHA256", "d.qcow2": "SHA256"}
    tampered = bytearray(disk)
    tampered[-1] ^= 0xFF
    with pytest.raises(OvaDigestMismatch, match=r"d\.qcow2"):
        open_ova(tar_of(tmp_path / "bad.ova", [("x.ovf", descriptor), ("x.mf", good), ("d.qcow2", bytes(tampered))]))
    # The digest check runs before the descriptor is parsed: a tampered descriptor is a mismatch, not XML.
    evil = manifest({"x.ovf": descriptor, "d.qcow2": disk})
    with pytest.raises(OvaDigestMismatch, match=r"x\.ovf"):
        open_ova(tar_of(tmp_path / "evil.ova", [("x.ovf", b"<!DOCTYPE x>"), ("x.mf", evil), ("d.qcow2", disk)]))
    ghost = manifest({"x.ovf": descriptor, "d.qcow2": disk, "ghost.vmdk": b""})
    with pytest.raises(OvaManifestError, match=r"ghost\.vmdk"):
        open_ova(tar_of(tmp_path / "ghost.ova", [("x.ovf", descriptor), ("x.mf", ghost), ("d.qcow2", disk)]))
    with pytest.raises(OvaManifestError, match="line 1"):
        open_ova(
            tar_of(tmp_path / "junk.ova", [("x.ovf", descriptor), ("x.mf", b"MD5(x.ovf)= 00\n"), ("d.qcow2", disk)])
        )


@pytest.mark.parametrize(
    ("algorithm", "style"),
    [
        ("SHA1", "{a} ({n}) = {d}"),
        ("SHA256", "{a}({n})= {d}"),
        ("SHA512", "{a}({n})={d}"),
        ("SHA256", "{a} ({n})= {d}\r"),
    ],
)
def test_manifest_variants(tmp_path: Path, algorithm: str, style: str) -> None:
    descriptor, disk = small_package(tmp_path)
    mf = manifest({"x.ovf": descriptor}, algorithm, style)
    package = open_ova(tar_of(tmp_path / "v.ova", [("x.ovf", descriptor), ("x.mf", mf), ("d.qcow2", disk)]))
    assert package.verified == {"x.ovf": algorithm}
    assert package.unverified == ("d.qcow2",)
    assert any("not in the manifest" in w for w in package.warnings)
    assert parse_manifest(mf)[0][0] == algorithm


def test_descriptor_problems_surface_through_open(tmp_path: Path) -> None:
    descriptor, disk = small_package(tmp_path)
    laughs = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><Envelope>&b;</Envelope>'
    with pytest.raises(OvfUnsafeXml):
        open_ova(tar_of(tmp_path / "l.ova", [("x.ovf", laughs), ("d.qcow2", disk)]))
    with pytest.raises(OvfNotOvf):
        open_ova(tar_of(tmp_path / "n.ova", [("x.ovf", b"<html><p>not an ovf</p></html>"), ("d.qcow2", disk)]))
    with pytest.raises(OvaMissingFile, match=r"d\.qcow2"):
        open_ova(tar_of(tmp_path / "m.ova", [("x.ovf", descriptor)]))
    absurd = descriptor.replace(b'ovf:capacity="67108864"', b'ovf:capacity="%d"' % (128 * 2**40))
    with pytest.raises(OvfCapacityError, match="64 TiB"):
        open_ova(tar_of(tmp_path / "a.ova", [("x.ovf", absurd), ("d.qcow2", disk)]))


def test_capacity_smaller_than_the_disk_is_refused(tmp_path: Path) -> None:
    descriptor, disk = small_package(tmp_path)
    small = descriptor.replace(b'ovf:capacity="67108864"', b'ovf:capacity="1048576"')
    package = open_ova(tar_of(tmp_path / "s.ova", [("x.ovf", small), ("d.qcow2", disk)]))
    with pytest.raises(OvaDiskError, match="declares 1048576"):
        probe_disk(package.disks[0])
    populated = descriptor.replace(b'ovf:populatedSize="1048576"', b'ovf:populatedSize="134217728"')
    with pytest.raises(OvfCapacityError, match="smaller than its populated size"):
        open_ova(tar_of(tmp_path / "p.ova", [("x.ovf", populated), ("d.qcow2", disk)]))


def test_truncated_disks_are_refused_by_the_probe(tmp_path: Path, two_disks: tuple[Path, Path]) -> None:
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    good = tmp_path / "good.ova"
    write_ova(good, "g.ovf", factory(snapshot_set), [OvaDiskSource.to_vmdk("g.vmdk", two_disks[0], "qcow2", "vda")])
    with tarfile.open(good, "r:") as tf:
        descriptor = tf.extractfile("g.ovf").read()  # type: ignore[union-attr]
        vmdk = tf.extractfile("g.vmdk").read()  # type: ignore[union-attr]
    cut = vmdk[: len(vmdk) // 2 // 512 * 512]
    mf = manifest({"g.ovf": descriptor, "g.vmdk": cut})
    package = open_ova(tar_of(tmp_path / "cut.ova", [("g.ovf", descriptor), ("g.mf", mf), ("g.vmdk", cut)]))
    assert any("descriptor says" in w for w in package.warnings)
    with pytest.raises(OvaDiskError, match="truncated"):
        probe_disk(package.disks[0])
    dummy = open_ova(tar_of(tmp_path / "dummy.ova", [("g.ovf", descriptor), ("g.vmdk", b"abcd")]))
    with pytest.raises(OvaDiskError, match="4 bytes"):
        probe_disk(dummy.disks[0])


def test_disks_reaching_outside_the_package_are_refused(tmp_path: Path, two_disks: tuple[Path, Path]) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(two_disks[0]), "-F", "qcow2", str(overlay)], check=True
    )
    data = overlay.read_bytes()
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    descriptor = build_descriptor(snapshot_set, [OvfDisk("vda", "d.qcow2", len(data), "qcow2", 64 * MiB)])
    package = open_ova(tar_of(tmp_path / "o.ova", [("x.ovf", descriptor), ("d.qcow2", data)]))
    with pytest.raises(OvaUnsafeDisk, match="backing"):
        probe_disk(package.disks[0])
    with pytest.raises(OvaUnsafeDisk, match="backing"):
        qemu_json_for(package.disks[0])  # no QEMU target at all for a disk the guard refuses
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "base.vmdk"), "64M"], check=True)
    delta = tmp_path / "delta.vmdk"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", "-b", str(tmp_path / "base.vmdk"), "-F", "vmdk", str(delta)],
        check=True,
    )
    delta_data = delta.read_bytes()
    descriptor = build_descriptor(snapshot_set, [OvfDisk("vda", "d.vmdk", len(delta_data), "vmdk", 64 * MiB)])
    package = open_ova(tar_of(tmp_path / "delta.ova", [("x.ovf", descriptor), ("d.vmdk", delta_data)]))
    with pytest.raises(OvaUnsafeDisk, match="parentFileNameHint"):
        probe_disk(package.disks[0])
    text_vmdk = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 2048 FLAT "/etc/shadow" 0\n'
    text_vmdk += b"\n" * (1024 - len(text_vmdk))
    descriptor = build_descriptor(snapshot_set, [OvfDisk("vda", "d.vmdk", len(text_vmdk), "vmdk", MiB)])
    package = open_ova(tar_of(tmp_path / "t.ova", [("x.ovf", descriptor), ("d.vmdk", text_vmdk)]))
    with pytest.raises(OvaUnsafeDisk, match="text descriptor"):
        probe_disk(package.disks[0])
    raw_but_qcow2 = build_descriptor(snapshot_set, [OvfDisk("vda", "d.raw", len(data), "raw", 64 * MiB)])
    package = open_ova(tar_of(tmp_path / "r.ova", [("x.ovf", raw_but_qcow2), ("d.raw", data)]))
    with pytest.raises(OvaUnsafeDisk, match="declared raw but it is a qcow2 image"):
        probe_disk(package.disks[0])


# ------------------------------------------------------------------------------------------ reader: the image guard


def _kdmv_descriptor_attack(secret: Path) -> bytes:
    """A ``KDMV`` file with capacity 0 and an embedded descriptor whose one extent is a host file."""
    text = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW 128 FLAT "{secret}" 0\n'
    ).encode()
    fields = struct.pack("<IIQQQQIQQQB4sH", 1, 3, 0, 128, 1, 1, 512, 0, 0, 0, 0, b"\n \r\n", 0)
    return (b"KDMV" + fields).ljust(512, b"\0") + text.ljust(512, b"\0")


def _one_disk_package(tmp_path: Path, name: str, href: str, data: bytes, fmt: str, capacity: int = MiB) -> Path:
    snapshot_set = make_set([("vda", "virtio", capacity)])
    descriptor = build_descriptor(snapshot_set, [OvfDisk("vda", href, len(data), fmt, capacity)])
    return tar_of(
        tmp_path / name, [("x.ovf", descriptor), ("x.mf", manifest({"x.ovf": descriptor, href: data})), (href, data)]
    )


def test_a_vmdk_naming_a_host_file_is_refused_before_qemu_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes((b"TOP SECRET HOST DATA\n" * 4000)[: 64 * 1024])
    attack = _kdmv_descriptor_attack(secret)

    # The attack is real: qemu-img follows the extent to the host file and copies it out.
    standalone = tmp_path / "attack.vmdk"
    standalone.write_bytes(attack)
    info = json.loads(qemu_img("info", "--output=json", "-f", "vmdk", str(standalone)).stdout)
    assert [(e["filename"], e["format"]) for e in info["format-specific"]["data"]["extents"]] == [(str(secret), "FLAT")]
    stolen = tmp_path / "stolen.raw"
    assert qemu_img("convert", "-f", "vmdk", "-O", "raw", str(standalone), str(stolen)).returncode == 0
    assert stolen.read_bytes() == secret.read_bytes()

    package = open_ova(_one_disk_package(tmp_path, "attack.ova", "x.vmdk", attack, "vmdk"))
    disk = package.disks[0]
    # ... and so it is through the package: the old, unguarded qemu target (pinned vmdk, backing null,
    # one extent) read the host file.
    unguarded = probe_module.qemu_target(disk, VerifiedImage("vmdk", None))
    info = json.loads(qemu_img("info", "--output=json", unguarded).stdout)
    assert [e["filename"] for e in info["format-specific"]["data"]["extents"]] == [str(secret)]

    def no_qemu(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"qemu-img ran on an unverified disk: {args}")

    monkeypatch.setattr(probe_module, "run_qemu_img", no_qemu)
    with pytest.raises(OvaUnsafeDisk, match=r"^disk x\.vmdk: VMDK header has capacity 0 and a descriptor") as caught:
        probe_disk(disk)
    assert "\n" not in str(caught.value)
    with pytest.raises(OvaUnsafeDisk, match="capacity 0"):
        qemu_json_for(disk)


def _vmdk_with_descriptor(tmp_path: Path, subformat: str, edit: Callable[[str], str]) -> bytes:
    src = make_qcow2(tmp_path / f"{subformat}.qcow2", "1M", [(0x5A, 0, 64 * 1024)])
    out = tmp_path / f"{subformat}.vmdk"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", f"subformat={subformat}", str(src), str(out)],
        check=True,
    )
    data = bytearray(out.read_bytes())
    text = data[512 : 512 + 20 * 512].split(b"\0")[0].decode()
    data[512 : 512 + 20 * 512] = edit(text).encode().ljust(20 * 512, b"\0")
    return bytes(data)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            lambda t: re.sub(r'RW (\d+) SPARSE "[^"]*"', r'RW \1 FLAT "/etc/shadow" 0', t),
            OvaUnsafeDisk,
            r"^disk x\.vmdk: VMDK extent 'FLAT' names another file; only streamOptimized/monolithicSparse images "
            r"with their own data are imported$",
        ),
        (lambda t: re.sub(r'SPARSE "[^"]*"', 'SPARSE "/dev/sda"', t), OvaUnsafeDisk, "plain file name"),
        (lambda t: t + 'RW 2048 FLAT "../../other/disk.qcow2" 0\n', OvaUnsafeDisk, "'FLAT' names another file"),
        (lambda t: t.replace("\n", "\r\n") + '\r\n  RW 8 VMFS "/dev/sdb"\r\n', OvaUnsafeDisk, "'VMFS'"),
        (lambda t: t + 'parentFileNameHint="/etc/shadow"\n', OvaUnsafeDisk, "parentFileNameHint"),
        (lambda t: t.replace("monolithicSparse", "twoGbMaxExtentSparse"), OvaUnsafeDisk, "createType"),
    ],
    ids=["flat", "device", "second-extent", "crlf-vmfs", "parent", "split-create-type"],
)
def test_probe_refuses_sparse_vmdks_whose_descriptor_names_other_files(
    tmp_path: Path, edit: Callable[[str], str], error: type[OvaDiskError], match: str
) -> None:
    data = _vmdk_with_descriptor(tmp_path, "monolithicSparse", edit)
    package = open_ova(_one_disk_package(tmp_path, "e.ova", "x.vmdk", data, "vmdk"))
    with pytest.raises(error, match=match):
        probe_disk(package.disks[0])


@pytest.mark.parametrize(
    ("href", "fmt", "data", "match"),
    [
        ("x.vmdk", "vmdk", b"COWD" + bytes(4092), "ESX sparse"),
        ("x.raw", "raw", b"KDMV" + bytes(4092), "declared raw but it is a vmdk image"),
        (
            "x.raw",
            "raw",
            b'# Disk DescriptorFile\nRW 8 FLAT "/etc/shadow" 0\n'.ljust(4096),
            "declared raw but it is a vmdk",
        ),
        ("x.vhd", "vpc", b"conectix" + bytes(4088), "format 'vpc' is not imported"),
        ("x.vdi", "vdi", bytes(4096), "format 'vdi' is not imported"),
        ("x.qcow2", "vmdk", None, "declared vmdk but it is a qcow2 image"),
    ],
)
def test_probe_refuses_format_confusion(tmp_path: Path, href: str, fmt: str, data: bytes | None, match: str) -> None:
    if data is None:
        data = make_qcow2(tmp_path / "q.qcow2", "1M").read_bytes()
    snapshot_set = make_set([("vda", "virtio", MiB)])
    descriptor = build_descriptor(snapshot_set, [OvfDisk("vda", href, len(data), "raw", MiB)])
    uri = {"vpc": b"http://technet.microsoft.com/vhd", "vdi": b"http://www.virtualbox.org/vdi", "vmdk": b"vmdk.html#x"}
    if fmt in uri:
        descriptor = descriptor.replace(b"http://en.wikipedia.org/wiki/Byte", uri[fmt])
    package = open_ova(tar_of(tmp_path / "c.ova", [("x.ovf", descriptor), (href, data)]))
    assert package.disks[0].format == fmt
    with pytest.raises(OvaDiskError, match=match):
        probe_disk(package.disks[0])


@pytest.mark.parametrize("fmt", ["monolithicSparse", "streamOptimized", "raw", "qcow2"])
def test_probe_accepts_self_contained_images_and_pins_the_verified_format(tmp_path: Path, fmt: str) -> None:
    src = make_qcow2(tmp_path / "src.qcow2", "1M", [(0x5A, 0, 64 * 1024)])
    out = tmp_path / "out.img"
    driver = "vmdk" if fmt.endswith(("Sparse", "Optimized")) else fmt
    options = ["-o", f"subformat={fmt}"] if driver == "vmdk" else []
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", driver, *options, str(src), str(out)], check=True)
    data = out.read_bytes()
    package = open_ova(_one_disk_package(tmp_path, "ok.ova", f"x.{driver}", data, driver))
    probe = probe_disk(package.disks[0])
    assert (probe.format, probe.virtual_size) == (driver, MiB)
    assert probe.subformat == {"vmdk": fmt, "qcow2": "qcow2 v3", "raw": ""}[driver]
    target = json.loads(qemu_json_for(package.disks[0]).removeprefix("json:"))
    assert target["driver"] == driver and target["backing"] is None
    assert target["file"] == {
        "driver": "raw",
        "offset": package.disks[0].offset,
        "size": -(-len(data) // 512) * 512,
        "file": {"driver": "file", "filename": str(package.path.resolve())},
    }
    assert qemu_img("compare", "-f", "qcow2", str(src), qemu_json_for(package.disks[0])).returncode == 0


def test_exported_packages_are_private_to_their_owner(tmp_path: Path, two_disks: tuple[Path, Path]) -> None:
    snapshot_set = make_set([("vda", "virtio", 64 * MiB)])
    previous = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        for mode in ("copy", "vmdk"):
            out = tmp_path / f"{mode}.ova"
            source = OvaDiskSource(f"p.{mode}", two_disks[0], "qcow2", "vda", mode)  # type: ignore[arg-type]
            write_ova(out, "p.ovf", factory(snapshot_set), [source])
            assert stat.S_IMODE(out.stat().st_mode) == 0o600, mode
    finally:
        os.umask(previous)
