"""Build (and cache) the database test guest: Debian 12 with PostgreSQL 15, data on vdb, WAL on vdc, pgbench.

The tiny busybox guest proves multi-disk consistency with our own ledger writer; this one proves it with a
database whose crash recovery and whose benchmark invariants nobody here wrote. The root filesystem is made by
mmdebstrap from Debian's packages (sysvinit as init, qemu-guest-agent, postgresql-15, the cloud kernel and its
initramfs); the PostgreSQL cluster is created at build time with ``pg_createcluster`` and split into three
images, so a boot needs no initdb. Everything is keyed by a hash of the inputs and built once per host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from freezeframe.testbed.guest import GuestBuildError, GuestImage, _locked, default_cache_dir, publish_build
from freezeframe.testbed.instance import MIB

DATA_DIR = Path(__file__).resolve().parent / "database_guest"
BUILD_FORMAT = "1"
"""Bump when the image layout changes in a way the input hash cannot see."""
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PACKAGES = (
    "sysvinit-core",
    "postgresql-15",
    "postgresql-client-15",
    "qemu-guest-agent",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "udev",
    "procps",
    "e2fsprogs",
)
EXCLUDED_PATHS = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*")
ROOT_SIZE = 2048 * MIB
DATA_SIZE = 1024 * MIB
WAL_SIZE = 512 * MIB
DATA_MOUNT = "srv/pgdata"
WAL_MOUNT = "srv/pgwal"
DATA_DIRECTORY = "main"
"""The cluster's data directory inside the data volume (``/srv/pgdata/main`` in the guest)."""
WAL_DIRECTORY = "pg_wal"
"""The cluster's WAL directory inside the WAL volume; ``main/pg_wal`` is a symlink to ``/srv/pgwal/pg_wal``."""


@dataclass(frozen=True)
class DatabaseGuestImage:
    """Kernel + initrd for direct boot, and the three prebuilt disks every instance overlays."""

    kernel: Path
    initrd: Path
    root: Path
    data: Path
    wal: Path
    key: str

    @property
    def boot(self) -> GuestImage:
        return GuestImage(kernel=self.kernel, initrd=self.initrd, key=self.key)


def build_database_guest(cache_dir: Path | None = None, mirror: str | None = None) -> DatabaseGuestImage:
    """Return the cached database guest for the current inputs, building it first (minutes) if needed."""
    root = (cache_dir or default_cache_dir()) / "database-guest"
    root.mkdir(parents=True, exist_ok=True)
    mirror = mirror or os.environ.get("FREEZEFRAME_DEBIAN_MIRROR", DEFAULT_MIRROR)
    with _locked(root / ".lock"):
        key, inputs = _input_key(mirror)
        final = root / key
        image = _image(final, key)
        if all(p.is_file() for p in (image.kernel, image.initrd, image.root, image.data, image.wal)):
            return image
        started = time.monotonic()
        publish_build(final, inputs, lambda work: _build_into(work, mirror))
        print(f"testbed: built database guest {key} in {time.monotonic() - started:.1f}s at {final}")
        return image


def _image(final: Path, key: str) -> DatabaseGuestImage:
    return DatabaseGuestImage(
        kernel=final / "vmlinuz",
        initrd=final / "initrd.img",
        root=final / "root.qcow2",
        data=final / "data.qcow2",
        wal=final / "wal.qcow2",
        key=key,
    )


def _run(argv: list[str], *, timeout: float = 1800.0) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed; run scripts/setup-host.sh") from exc
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise GuestBuildError(f"{' '.join(argv[:3])} ... failed ({proc.returncode}): {out}")
    return proc


def _input_key(mirror: str) -> tuple[str, dict[str, object]]:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(DATA_DIR.iterdir()) if p.is_file()}
    inputs: dict[str, object] = {
        "format": BUILD_FORMAT,
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "files": files,
        "suite": SUITE,
        "mirror": mirror,
        "packages": list(GUEST_PACKAGES),
        "sizes": [ROOT_SIZE, DATA_SIZE, WAL_SIZE],
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return digest, inputs


def _build_into(work: Path, mirror: str) -> None:
    """mmdebstrap the root filesystem, take out kernel + initrd, split it into root, data and WAL images."""
    if shutil.which("mmdebstrap") is None:
        raise GuestBuildError("mmdebstrap is not installed; run scripts/setup-host.sh")
    rootfs = work / "rootfs"
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory", "--quiet",
            f"--include={','.join(GUEST_PACKAGES)}"]  # fmt: skip
    argv += [f"--dpkgopt=path-exclude={p}" for p in EXCLUDED_PATHS]
    argv += [
        f'--setup-hook=sh {DATA_DIR / "setup-hook.sh"} "$1"',
        f'--customize-hook=sh {DATA_DIR / "customize-hook.sh"} "$1" {DATA_DIR}',
        SUITE,
        str(rootfs),
        mirror,
    ]
    try:
        _run(argv)
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise GuestBuildError(f"the root filesystem in {rootfs} has no kernel or no initrd in /boot")
        shutil.copyfile(kernels[-1], work / "vmlinuz")
        shutil.copyfile(initrds[-1], work / "initrd.img")
        for mount, name, size in ((DATA_MOUNT, "data", DATA_SIZE), (WAL_MOUNT, "wal", WAL_SIZE)):
            tree = work / f"{name}-tree"
            tree.mkdir()
            for entry in (rootfs / mount).iterdir():
                entry.rename(tree / entry.name)
            _ext4_image(tree, work / f"{name}.qcow2", size, label=f"pg{name}")
            shutil.rmtree(tree)
        _ext4_image(rootfs, work / "root.qcow2", ROOT_SIZE, label="root")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _ext4_image(tree: Path, out: Path, size: int, *, label: str) -> None:
    """An ext4 filesystem populated from ``tree`` (owners and modes kept), stored as a compact qcow2."""
    raw = out.with_suffix(".raw")
    try:
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-E", "nodiscard", "-d", str(tree), str(raw),
              f"{size // 1024}k"])  # fmt: skip
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    finally:
        raw.unlink(missing_ok=True)
