"""Other people's OVF tools on our packages, unmodified: COT (PyPI ``cot``) and virt-v2v (Debian ``virt-v2v``).

A synthetic 3-disk, 2-NIC set is exported through the façade (OVF 1.x with its default SHA-1 manifest, and OVF 2),
each tool reads the package and the test checks what it read: no tampering, every disk, NIC, the vCPUs and memory.
A package COT extended (``cot add-disk``) comes back through our import. Known third-party limits are pinned as
strict xfails (they fail loudly the day the tool changes): virt-v2v 2.2 reads only the OVF 1.x namespace, and
COT 2.2 looks for OVF 2 ``StorageItem``/``EthernetPortItem`` fields in VirtualBox's ``….xsd`` namespaces, not
the DMTF schema's that we (and VMware) write.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.adapters.ova import open_ova
from freezeframe.config import Settings
from freezeframe.model import NicSpec
from freezeframe.service import Freezeframe
from freezeframe.testbed import GuestImage
from portable_support import PREFIX, Pt, guest_boot_dirs, remove_everything, synthetic_hardware, synthetic_set, xml_of

COT = shutil.which("cot", path=str(Path(sys.executable).parent)) or shutil.which("cot")
V2V = shutil.which("virt-v2v")
MEMORY = 192 * 2**20


def need(tool: str | None, what: str) -> str:
    if tool is None:
        # scripts/setup-host.sh installs both: a missing tool is a broken set-up, not a reason to skip.
        pytest.fail(f"{what} is not installed; run scripts/setup-host.sh")
    return tool


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage) -> Iterator[tuple[Pt, dict[str, Path]]]:
    """One set, exported as OVF 1 (default digest), OVF 1 with SHA-256, and OVF 2."""
    tmp = tmp_path_factory.mktemp("interop")
    with Freezeframe.open(Settings(home=tmp / "ffhome", agent_timeout_s=3)) as ff:
        pt = Pt(ff, guest_boot_dirs(guest_image))
        nics = (
            NicSpec("52:54:00:aa:bb:01", "virtio", "network", "default"),
            NicSpec("52:54:00:aa:bb:02", "e1000", "bridge", "br-lan"),
        )
        hw = synthetic_hardware(guest_image)
        hw = type(hw)(**{**vars(hw), "nics": nics})
        s = synthetic_set(ff, hw, {"vda": 0x11, "sda": 0x22, "hdb": 0x33})
        out = tmp / "out"
        out.mkdir()
        packages = {
            "1": pt.export(s.id, out / "v1.ova").path,
            "1-sha256": pt.export(s.id, out / "v1s.ova", manifest_digest="sha256").path,
            "2": pt.export(s.id, out / "v2.ova", ovf_version=2).path,
        }
        try:
            yield pt, {k: Path(v) for k, v in packages.items()}
        finally:
            remove_everything(pt)


def cot_info(package: Path) -> str:
    result = run(need(COT, "cot"), "info", "--verbose", str(package))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def assert_cot_read_everything(text: str) -> None:
    assert "tampered" not in text.lower(), text
    for target in ("vda", "sda", "hdb"):
        assert f"origin_vm-{target}.qcow2" in text
    assert re.findall(r"harddisk @ (\S+ \d+:\d+)", text) == ["SCSI 0:0", "SCSI 1:0", "IDE 0:0"], text
    assert re.search(r"None \(default\)\s+2\s+192 MiB\s+2\s+0\s+3 /", text), text  # CPUs, memory, NICs, disks
    assert re.search(r"ethernet0\s*: default", text) and re.search(r"ethernet1\s*: br-lan", text), text


def test_cot_reads_every_disk_nic_cpu_and_memory_of_our_ovf1_package(exported: tuple[Pt, dict[str, Path]]) -> None:
    _, packages = exported
    assert set(open_ova(packages["1"]).verified.values()) == {"SHA1"}
    assert_cot_read_everything(cot_info(packages["1"]))


def test_cot_reports_a_sha256_ovf1_manifest_as_tampered(exported: tuple[Pt, dict[str, Path]]) -> None:
    """Why OVF 1.x defaults to SHA-1: COT (like older VMware importers) assumes it and flags anything else."""
    _, packages = exported
    assert "may have been tampered with" in cot_info(packages["1-sha256"])


@pytest.mark.xfail(
    strict=True,
    reason="COT 2.2 reads OVF 2 StorageItem/EthernetPortItem InstanceIDs only in VirtualBox's CIM_*.xsd namespaces "
    "(OVFNameHelper2.NSM); we write the DMTF schema's namespaces, as VMware does, and COT stops with an AttributeError",
)
def test_cot_reads_our_ovf2_package(exported: tuple[Pt, dict[str, Path]]) -> None:
    _, packages = exported
    assert_cot_read_everything(cot_info(packages["2"]))


def v2v_source(package: Path) -> str:
    result = run(need(V2V, "virt-v2v"), "-i", "ova", str(package), "--print-source")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def assert_v2v_read_everything(text: str) -> None:
    assert re.search(rf"memory: {MEMORY} \(bytes\)", text), text
    assert re.search(r"nr vCPUs: 2\b", text), text
    disks = text.split("disks:", 1)[1].split("removable media:", 1)[0]
    assert [line.split()[1] for line in disks.strip().splitlines()] == ["[scsi]", "[scsi]", "[ide]"], text
    nics = text.split("NICs:", 1)[1]
    assert "52:54:00:aa:bb:01 [virtio]" in nics and "52:54:00:aa:bb:02 [e1000]" in nics, text


def test_virt_v2v_reads_every_disk_memory_vcpus_and_nics_of_our_ovf1_package(
    exported: tuple[Pt, dict[str, Path]],
) -> None:
    _, packages = exported
    assert_v2v_read_everything(v2v_source(packages["1"]))


@pytest.mark.xfail(
    strict=True,
    reason="virt-v2v 2.2 parses only the OVF 1.x envelope namespace: from any OVF 2 package it reads 0 disks, "
    "1 vCPU and its default 1 TiB of memory",
)
def test_virt_v2v_reads_our_ovf2_package(exported: tuple[Pt, dict[str, Path]]) -> None:
    _, packages = exported
    assert_v2v_read_everything(v2v_source(packages["2"]))


def test_a_package_cot_extended_imports_with_the_added_disk(
    exported: tuple[Pt, dict[str, Path]], tmp_path: Path
) -> None:
    pt, packages = exported
    extra = tmp_path / "extra.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(extra), "4M").returncode == 0
    edited = tmp_path / "edited.ova"
    added = run(need(COT, "cot"), "--force", "add-disk", str(extra), str(packages["1"]), "-o", str(edited))
    assert added.returncode == 0, added.stderr[-2000:]
    assert "extra.vmdk" in open_ova(edited).verified  # COT rewrote the manifest (SHA-1) with the new file

    imported = pt.import_package(edited, f"{PREFIX}cot-edited")
    assert imported.origin == "freezeframe"
    assert [(d.target, d.bus) for d in imported.disks] == [
        ("vda", "virtio"), ("sda", "scsi"), ("hdb", "ide"), ("hda", "ide"),
    ]  # fmt: skip
    assert any("'extra.vmdk' is not in the package's freezeframe section" in w for w in imported.warnings)
    root = xml_of(pt.service.hypervisor.conn, imported.name)
    assert sorted(el.get("dev") or "" for el in root.findall("devices/disk/target")) == ["hda", "hdb", "sda", "vda"]
    pt.service.lifecycle.discard(imported.name)
