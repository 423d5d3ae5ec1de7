"""Deleting sets of a chain: the children take in what they read, stay bit-identical, and a crash is finished.

Real qcow2 files (qemu-img, qemu-io on a few MiB), a memory catalog: the chain is full S0 <- S1 <- S2, each
incremental holding a few written clusters over its parent's member.
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fakes import MemoryCatalog, MemoryRestores, ScriptedHostFs
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository, FileMembers
from freezeframe.errors import HypervisorError
from freezeframe.model import Consistency, DiskSpec, Hardware, Instance, Member, SetStatus, SnapshotSet
from freezeframe.ops.common import Holds, Stores
from freezeframe.ops.export import Exporter
from freezeframe.ops.retention import Retention
from freezeframe.ops.verify import Verify
from freezeframe.ports import ImageRef, PackageSource

MiB = 1 << 20
UUID = "11111111-2222-3333-4444-555555555555"
HW = Hardware(vcpus=1, memory_kib=1024, arch="x86_64", machine=None,
              disks=(DiskSpec("vda", "virtio", "/vm/vda.qcow2", "qcow2", 4 * MiB),))  # fmt: skip


class NoHypervisor:
    def lookup(self, ref: str) -> Instance:
        raise HypervisorError("no hypervisor in this test")


class Chain:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.images = QemuImg()
        self.catalog = MemoryCatalog()
        self.repository = DirectoryRepository(home / "repo", self.images)
        self.retention = Retention(
            self.catalog, self.repository, Stores({"file": FileMembers(self.images)}), self.images,
            lambda: pytest.fail("no domains needed"), MemoryRestores(), lambda: NoHypervisor(),  # type: ignore[arg-type,return-value]
            lambda request, progress=None: pytest.fail("no snapshot here"), Holds(FileLocks(home / "locks")), (),
        )  # fmt: skip
        self.sets: list[SnapshotSet] = []

    def add(self, writes: list[tuple[int, int]]) -> SnapshotSet:
        """A set whose vda member is incremental over the previous one (full for the first); ``writes`` are
        (pattern, offset in 64 KiB clusters)."""
        set_id = str(uuid.uuid4())
        parent = self.sets[-1] if self.sets else None
        parents = {"vda": parent.members[0].path} if parent else None
        target = self.repository.prepare(set_id, HW.disks, parents)[0]
        for pattern, cluster in writes:
            command = f"write -P {pattern} {cluster * 65536} 64k"
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(target.path)], check=True, capture_output=True)
        meta = {"freezeframe.set_uuid": set_id, "freezeframe.kind": "incremental" if parent else "full"}
        if parent:
            meta["freezeframe.parent_set"] = parent.id
            meta["freezeframe.chain_depth"] = str(len(self.sets))
        member = Member(set_id, "vda", "virtio", None, 4 * MiB, "qcow2", str(target.path), "/vm/vda.qcow2",
                        self.repository.checksum(target.path), meta)  # fmt: skip
        when = datetime.now(UTC) + timedelta(seconds=len(self.sets))
        s = SnapshotSet(set_id, f"s{len(self.sets)}", "vm1", UUID, Consistency.CRASH, SetStatus.AVAILABLE, when, HW,
                        achieved=Consistency.CRASH, completed_at=when, members=[member])  # fmt: skip
        self.catalog.add_set(s)
        self.repository.write_manifest(s)
        self.sets.append(s)
        return s

    def content(self, s: SnapshotSet, out: Path) -> Path:
        member = self.catalog.get_set(s.id).members[0]
        self.images.convert(ImageRef(Path(member.path), "qcow2"), ImageRef(out, "raw"))
        return out


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    c = Chain(tmp_path / "home")
    c.add([(1, 0), (1, 1), (1, 2)])
    c.add([(2, 1), (2, 5)])
    c.add([(3, 1), (3, 2), (3, 9)])
    return c


def _before(chain: Chain, tmp_path: Path) -> dict[str, bytes]:
    return {s.id: chain.content(s, tmp_path / f"{s.id}.raw").read_bytes() for s in chain.sets}


def test_deleting_a_middle_set_rebases_its_child_onto_the_grandparent(chain: Chain, tmp_path: Path) -> None:
    before = _before(chain, tmp_path)
    s0, s1, s2 = chain.sets
    chain.retention.delete(s1.id)
    child = chain.catalog.get_set(s2.id).members[0]
    assert child.metadata["freezeframe.parent_set"] == s0.id
    assert child.metadata["freezeframe.kind"] == "incremental" and child.metadata["freezeframe.chain_depth"] == "1"
    assert chain.images.info(ImageRef(Path(child.path), "qcow2")).backing == str(Path(s0.members[0].path).resolve())
    assert f"../{s0.id}/vda.qcow2".encode() in Path(child.path).read_bytes()[:4096], "still relative"
    assert chain.content(s2, tmp_path / "after2.raw").read_bytes() == before[s2.id]
    assert chain.content(s0, tmp_path / "after0.raw").read_bytes() == before[s0.id]
    assert child.sha256 == chain.repository.checksum(Path(child.path)), "the checksum follows the new file"
    assert chain.repository.manifest_checksums(s2.id) == {"vda": child.sha256}


def test_deleting_a_middle_set_lowers_the_chain_depth_of_every_descendant(chain: Chain, tmp_path: Path) -> None:
    """--max-chain counts the depth: a grandchild of the deleted set sits one level higher too."""
    s3 = chain.add([(4, 3)])
    s0, s1, s2 = chain.sets[:3]
    chain.retention.delete(s1.id)
    depths = {s.id: chain.catalog.get_set(s.id).members[0].metadata.get("freezeframe.chain_depth") for s in (s2, s3)}
    assert depths == {s2.id: "1", s3.id: "2"}
    assert chain.catalog.get_set(s3.id).members[0].metadata["freezeframe.parent_set"] == s2.id
    chain.retention.delete(s0.id)
    depths = {s.id: chain.catalog.get_set(s.id).members[0].metadata.get("freezeframe.chain_depth") for s in (s2, s3)}
    assert depths == {s2.id: None, s3.id: "1"}, "the new full head has no depth, its child is the first level"


def test_deleting_the_full_head_makes_its_child_standalone(chain: Chain, tmp_path: Path) -> None:
    before = _before(chain, tmp_path)
    s0, s1, s2 = chain.sets
    chain.retention.delete(s0.id)
    head = chain.catalog.get_set(s1.id).members[0]
    assert head.metadata["freezeframe.kind"] == "full" and "freezeframe.parent_set" not in head.metadata
    assert chain.images.info(ImageRef(Path(head.path), "qcow2")).backing is None
    for s in (s1, s2):
        assert chain.content(s, tmp_path / f"after-{s.id}.raw").read_bytes() == before[s.id]


def test_rotation_of_a_whole_chain_keeps_the_newest(chain: Chain, tmp_path: Path) -> None:
    before = _before(chain, tmp_path)
    for s in chain.sets:
        s.backup_type = "daily"
        chain.catalog.update_set(s)
    rotated, kept = chain.retention.rotate(UUID, "daily", 1)
    assert set(rotated) == {chain.sets[0].id, chain.sets[1].id} and kept == {}
    last = chain.sets[2]
    assert chain.catalog.get_set(last.id).members[0].metadata["freezeframe.kind"] == "full"
    assert chain.content(last, tmp_path / "last.raw").read_bytes() == before[last.id]


def test_a_delete_interrupted_after_the_rebase_is_finished_by_repair(chain: Chain, tmp_path: Path) -> None:
    before = _before(chain, tmp_path)
    s0, s1, s2 = chain.sets
    # The process died after marking s1 'deleting' and rebasing s2, before recording anything about s2.
    s1.status = SetStatus.DELETING
    chain.catalog.update_set(s1)
    relative = ImageRef(Path(f"../{s0.id}/vda.qcow2"), "qcow2")
    chain.images.rebase(Path(s2.members[0].path), "qcow2", relative)
    assert chain.catalog.get_set(s2.id).members[0].metadata["freezeframe.parent_set"] == s1.id

    reports = chain.retention.repair()
    assert len(reports) == 1 and "finished an interrupted delete" in reports[0]
    child = chain.catalog.get_set(s2.id).members[0]
    assert child.metadata["freezeframe.parent_set"] == s0.id
    assert child.sha256 == chain.repository.checksum(Path(child.path))
    assert not chain.repository.exists(s1.id)
    assert chain.content(s2, tmp_path / "after.raw").read_bytes() == before[s2.id]


def test_a_delete_interrupted_before_the_rebase_is_finished_by_repair(chain: Chain, tmp_path: Path) -> None:
    before = _before(chain, tmp_path)
    s1 = chain.sets[1]
    s1.status = SetStatus.DELETING
    chain.catalog.update_set(s1)
    chain.retention.repair()
    s2 = chain.sets[2]
    assert chain.catalog.get_set(s2.id).members[0].metadata["freezeframe.parent_set"] == chain.sets[0].id
    assert chain.content(s2, tmp_path / "after.raw").read_bytes() == before[s2.id]


def test_verify_of_an_incremental_set_checks_the_members_it_builds_on(chain: Chain, tmp_path: Path) -> None:
    verify = Verify(
        chain.catalog, chain.repository, Stores({"file": FileMembers(chain.images)}), chain.images,
        ScriptedHostFs(), lambda: NoHypervisor(), lambda: pytest.fail("no domains"), None,  # type: ignore[arg-type,return-value]
        Holds(FileLocks(chain.home / "locks")), tmp_path / "verify",
    )  # fmt: skip
    s0, _, s2 = chain.sets
    good = verify.verify(s2.id)
    assert good.ok and any(c.what == "chain" and c.ok for c in good.checks)
    corrupt = ["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 64k", s0.members[0].path]
    subprocess.run(corrupt, check=True, capture_output=True)
    bad = verify.verify(s2.id)
    assert not bad.ok and [c.what for c in bad.failures] == ["chain"]


def test_export_copies_an_incremental_member_as_one_standalone_qcow2(chain: Chain, tmp_path: Path) -> None:
    before = _before(chain, tmp_path)
    seen: list[tuple[str | None, bytes]] = []

    class Packages:
        def write(self, out: Path, snapshot_set: SnapshotSet, descriptor: str, sources: list[PackageSource],
                  *_: object, **__: object) -> None:  # fmt: skip
            for source in sources:
                raw = tmp_path / "exported.raw"
                chain.images.convert(source.image, ImageRef(raw, "raw"))
                seen.append((chain.images.info(source.image).backing, raw.read_bytes()))

    exporter = Exporter(chain.catalog, Stores({"file": FileMembers(chain.images)}), Packages(), None,  # type: ignore[arg-type]
                        Holds(FileLocks(chain.home / "locks")), chain.images)  # fmt: skip
    (tmp_path / "out").mkdir()
    last = chain.sets[-1]
    exporter._write(last, tmp_path / "out" / "set.ova", "qcow2", 1, "sha1", None)
    assert seen == [(None, before[last.id])]
    assert list((tmp_path / "out").iterdir()) == [], "the flattened copy is removed"
