"""Export through a scripted package writer and image store (no QEMU), and the OVA adapter's own guarantees.

The operation's guarantees: refusals come before any write; the set is held during the write; when the write or
the store fails, no package, staging file or image record is left and an existing file given with ``force`` is
untouched.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.adapters import packages as packages_module
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.packages import OvaPackages
from freezeframe.errors import (
    InstanceBusy,
    InsufficientSpace,
    InvalidRequest,
    OvaNoSpace,
    PreflightFailed,
    SetNotFound,
)
from freezeframe.model import FILE_STORE, STORE_KEY, Consistency, DiskSpec, Hardware, Member, SetStatus, SnapshotSet
from freezeframe.ops.common import Holds, Stores
from freezeframe.ops.export import Exporter, package_base
from freezeframe.ports import (
    ImageRef,
    ImageSummary,
    NewImage,
    PackageSource,
    ProgressCallback,
    StoredImage,
    WrittenDisk,
    WrittenPackage,
)

MiB = 1 << 20


# ---- scripted adapters ----------------------------------------------------------------------------------------


@dataclass
class ScriptedCatalog:
    sets: dict[str, SnapshotSet] = field(default_factory=dict)

    def get_set(self, ref: str) -> SnapshotSet:
        if ref not in self.sets:
            raise SetNotFound(f"no set matches {ref!r}")
        return self.sets[ref]


class FilesHere:
    """Members as plain files (the ``file`` member store, without an image tool)."""

    kind = FILE_STORE

    def present(self, member: Member) -> bool:
        return Path(member.path).is_file()

    def source(self, member: Member) -> ImageRef:
        return ImageRef(Path(member.path), member.format)


@dataclass
class ScriptedPackages:
    """Writes a file as the real writer does (atomically); fails half-way when told to."""

    fail: Exception | None = None
    written: list[tuple[Path, tuple[PackageSource, ...], bool]] = field(default_factory=list)
    busy_check: Holds | None = None
    digests: list[str] = field(default_factory=list)

    def write(
        self,
        out: Path,
        snapshot_set: SnapshotSet,
        descriptor_name: str,
        sources: Sequence[PackageSource],
        ovf_version: int,
        progress: ProgressCallback | None,
        *,
        replace: bool = False,
        manifest_digest: str = "sha256",
    ) -> WrittenPackage:
        self.written.append((out, tuple(sources), replace))
        self.digests.append(manifest_digest)
        if self.busy_check is not None:
            probe = self.busy_check.hold(f"set-{snapshot_set.id}", "probe")
            with pytest.raises(InstanceBusy), probe:  # the set is held while its members are read
                pass
        partial = out.with_name(f".{out.name}.part")
        partial.write_bytes(b"half a package")
        try:
            if self.fail is not None:
                raise self.fail
            if progress is not None:
                progress(MiB, MiB)
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
        disks = tuple(WrittenDisk(s.target, s.href, "qcow2", MiB, 8 * MiB, MiB) for s in sources)
        summary = ImageSummary(snapshot_set.instance_name, 1, 128 * MiB, ovf_version, "qcow2")
        return WrittenPackage(out, 3 * MiB, 2 * MiB, 0.01, disks, summary)


@dataclass
class ScriptedStore:
    root: Path
    fail_put: bool = False
    records: list[StoredImage] = field(default_factory=list)
    uri: str = "file:///scripted"

    @contextlib.contextmanager
    def staging(self, filename: str) -> Iterator[Path]:
        folder = self.root / ".staging" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        try:
            yield folder / filename
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def put_file(self, path: Path, new: NewImage) -> StoredImage:
        if self.fail_put:
            raise InsufficientSpace("the image store is full: injected")
        image_id = str(uuid.uuid4())
        (self.root / image_id).mkdir()
        final = self.root / image_id / new.filename
        path.replace(final)
        image = StoredImage(
            image_id, new.name, new.filename, self.uri, 3 * MiB, "0" * 64, datetime.now(UTC), new.summary,
            new.source_set_id, location=str(final),
        )  # fmt: skip
        self.records.append(image)
        return image


def a_set(tmp_path: Path, status: SetStatus = SetStatus.AVAILABLE, data: bool = True) -> SnapshotSet:
    set_id = str(uuid.uuid4())
    members = []
    for target, bus in (("vda", "virtio"), ("hda", "ide")):
        path = tmp_path / "repo" / set_id / f"{target}.qcow2"
        if data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"member")
        members.append(Member(set_id, target, bus, None, 8 * MiB, "qcow2", str(path)))
    hw = Hardware(1, 131072, "x86_64", "pc", disks=(DiskSpec("vda", "virtio", "/x", "qcow2", 8 * MiB),))
    return SnapshotSet(
        id=set_id, name="nightly", instance_name="web 1/prod", instance_uuid=str(uuid.uuid4()),
        requested=Consistency.CRASH, status=status, created_at=datetime.now(UTC), hardware=hw, members=members,
    )  # fmt: skip


@dataclass
class World:
    tmp_path: Path
    snapshot_set: SnapshotSet
    packages: ScriptedPackages
    store: ScriptedStore
    holds: Holds
    exporter: Exporter

    def store_is_empty(self) -> bool:
        staging = self.store.root / ".staging"
        return (
            not self.store.records
            and sorted(p.name for p in self.store.root.iterdir()) == [".staging"]
            and not any(staging.iterdir())
        )


def world(tmp_path: Path, **set_options: object) -> World:
    s = a_set(tmp_path, **set_options)  # type: ignore[arg-type]
    packages = ScriptedPackages()
    store = ScriptedStore(tmp_path / "store")
    (tmp_path / "store" / ".staging").mkdir(parents=True)
    holds = Holds(FileLocks(tmp_path / "locks"))
    exporter = Exporter(ScriptedCatalog({s.id: s}), Stores({FILE_STORE: FilesHere()}), packages, store, holds)  # type: ignore[arg-type,dict-item]
    (tmp_path / "out").mkdir()
    return World(tmp_path, s, packages, store, holds, exporter)


# ---- the operation ---------------------------------------------------------------------------------------------


def test_export_names_members_and_holds_the_set(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.packages.busy_check = w.holds
    result = w.exporter.export(w.snapshot_set.id, tmp_path / "out" / "a.ova", disk_format="vmdk")
    out, sources, replace = w.packages.written[0]
    assert out == tmp_path / "out" / "a.ova" and not replace
    assert [(s.href, s.to_vmdk, s.adapter_type) for s in sources] == [
        ("web_1_prod-vda.vmdk", True, "lsilogic"), ("web_1_prod-hda.vmdk", True, "ide"),
    ]  # fmt: skip
    assert result.path == str(out) and result.disk_format == "vmdk" and [d.target for d in result.disks] == [
        "vda", "hda",
    ]  # fmt: skip
    with w.holds.hold(f"set-{w.snapshot_set.id}", "after"):
        pass  # released


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"disk_format": "vhd"}, "--disk-format"),
        ({"ovf_version": 3}, "--ovf-version"),
        ({"manifest_digest": "md5"}, "--manifest-digest"),
        ({"ovf_version": 2, "manifest_digest": "sha1"}, "OVF 2 manifest is SHA-256"),
    ],
)
def test_bad_options_are_refused_before_anything(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    w = world(tmp_path)
    with pytest.raises(InvalidRequest, match=match):
        w.exporter.export(w.snapshot_set.id, tmp_path / "out" / "a.ova", **kwargs)  # type: ignore[arg-type]
    assert w.packages.written == []


@pytest.mark.parametrize(
    ("version", "asked", "written"), [(1, None, "sha1"), (2, None, "sha256"), (1, "sha256", "sha256")]
)
def test_manifest_digest_defaults_to_what_each_ovf_version_expects(
    tmp_path: Path, version: int, asked: str | None, written: str
) -> None:
    w = world(tmp_path)
    result = w.exporter.export(
        w.snapshot_set.id, tmp_path / "out" / "a.ova", ovf_version=version, manifest_digest=asked
    )
    assert w.packages.digests == [written]
    assert result.manifest_digest == written and result.to_dict()["manifest_digest"] == written


def test_paths_are_checked_before_anything(tmp_path: Path) -> None:
    w = world(tmp_path)
    existing = tmp_path / "out" / "x.ova"
    existing.write_bytes(b"precious")
    for out, match in (
        (existing, "already exists; use --force"),
        (tmp_path / "out", "is a directory"),
        (tmp_path / "nowhere" / "x.ova", "does not exist"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            w.exporter.export(w.snapshot_set.id, out)
    assert w.packages.written == [] and existing.read_bytes() == b"precious"


def test_only_available_sets_with_their_data_are_exported(tmp_path: Path) -> None:
    w = world(tmp_path, status=SetStatus.FAILED)
    with pytest.raises(InvalidRequest, match="failed; only available sets can be exported"):
        w.exporter.export_to_store(w.snapshot_set.id)
    w = world(tmp_path / "2", data=False)
    with pytest.raises(PreflightFailed, match="missing member data"):
        w.exporter.export(w.snapshot_set.id, tmp_path / "2" / "out" / "a.ova")
    assert w.packages.written == [] and w.store_is_empty()


def test_a_member_in_an_unknown_store_is_refused_before_anything(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.snapshot_set.members[1].metadata[STORE_KEY] = "rbd"
    with pytest.raises(PreflightFailed, match="lives in a 'rbd' store"):
        w.exporter.export(w.snapshot_set.id, tmp_path / "out" / "a.ova")
    assert w.packages.written == []


def test_a_busy_set_is_refused(tmp_path: Path) -> None:
    w = world(tmp_path)
    with w.holds.hold(f"set-{w.snapshot_set.id}", "test"), pytest.raises(InstanceBusy, match="set nightly is in use"):
        w.exporter.export(w.snapshot_set.id, tmp_path / "out" / "a.ova")
    assert w.packages.written == []


def test_write_failure_leaves_no_package(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.packages.fail = OvaNoSpace("no space left on the device: injected")
    with pytest.raises(OvaNoSpace):
        w.exporter.export(w.snapshot_set.id, tmp_path / "out" / "a.ova")
    assert list((tmp_path / "out").iterdir()) == []


def test_replacing_asks_the_writer_to_replace(tmp_path: Path) -> None:
    w = world(tmp_path)
    existing = tmp_path / "out" / "a.ova"
    existing.write_bytes(b"precious")
    w.exporter.export(w.snapshot_set.id, existing, force=True)
    assert w.packages.written[0][2] is True


def test_to_store_records_the_written_package(tmp_path: Path) -> None:
    w = world(tmp_path)
    result = w.exporter.export_to_store(w.snapshot_set.id, name="golden")
    assert result.image is not None and result.image.name == "golden"
    assert result.image.source_set_id == w.snapshot_set.id and result.path == result.image.location
    assert result.image.filename == f"web_1_prod-{w.snapshot_set.id[:8]}.ova"
    assert Path(result.path).read_bytes() == b"half a package"
    assert not any((w.store.root / ".staging").iterdir())


@pytest.mark.parametrize("where", ["write", "put"])
def test_to_store_failure_leaves_no_record_and_no_staging(tmp_path: Path, where: str) -> None:
    w = world(tmp_path)
    if where == "write":
        w.packages.fail = OvaNoSpace("no space: injected")
    else:
        w.store.fail_put = True
    with pytest.raises((OvaNoSpace, InsufficientSpace)):
        w.exporter.export_to_store(w.snapshot_set.id)
    assert w.store_is_empty()
    with w.holds.hold(f"set-{w.snapshot_set.id}", "after"):
        pass  # released


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "x" * 256])
def test_image_names_are_checked(tmp_path: Path, name: str) -> None:
    w = world(tmp_path)
    with pytest.raises(InvalidRequest, match="image name"):
        w.exporter.export_to_store(w.snapshot_set.id, name=name)
    assert w.packages.written == []


def test_package_base_is_file_name_safe() -> None:
    assert package_base("web 1/prod") == "web_1_prod"
    assert package_base("../..") == "instance"


# ---- the OVA adapter: replacing is atomic, packages are private --------------------------------------------


needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed (qemu-utils)")


@needs_qemu
def test_ova_adapter_replaces_atomically_and_keeps_packages_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = a_set(tmp_path)
    for m in s.members:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", m.path, "8M"], check=True)
    sources = [PackageSource(f"{m.target}.qcow2", ImageRef(Path(m.path), "qcow2"), m.target) for m in s.members]
    out = tmp_path / "a.ova"
    out.write_bytes(b"precious")
    written = OvaPackages().write(out, s, "a.ovf", sources, 1, None, replace=True)
    assert written.size == out.stat().st_size and out.stat().st_mode & 0o777 == 0o600
    assert written.summary.vcpus == 1 and [d.target for d in written.summary.disks] == ["vda", "hda"]

    def full(*args: object, **kwargs: object) -> None:
        raise OvaNoSpace("no space left: injected")

    before = out.read_bytes()
    monkeypatch.setattr(packages_module, "write_ova", full)
    with pytest.raises(OvaNoSpace):
        OvaPackages().write(out, s, "a.ovf", sources, 1, None, replace=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.ova", "repo"]
