"""Build (and cache) the tiny test guest: Debian's cloud kernel plus a busybox initramfs with qemu-ga.

Real VMs are the only honest way to test freeze/snapshot behaviour, and a full distro image is slow to boot
under TCG. This guest boots in seconds, runs the same qemu-guest-agent as production guests, and carries a
workload whose on-disk state tells whether a multi-disk capture was consistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from freezeframe.config import Settings

GUEST_DATA_DIR = Path(__file__).resolve().parent / "guest"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
HOST_PACKAGES = ("busybox-static", "qemu-guest-agent", "e2fsprogs", "libc6", "libc6-dev", "gcc")
BUILD_FORMAT = "1"
"""Bump when the image layout changes in a way the input hash cannot see."""

# Load order matters (there is no modules.dep in the image); the init script repeats it.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "failover",
    "net_failover",
    "virtio_net",
)
REQUIRED_MODULES = frozenset(MODULES[:7])
BUILTIN_NEEDED = ("ext4", "jbd2", "crc32c_generic")
"""Must be built into the kernel; checked against modules.builtin so a kernel change fails loudly."""

HOST_BINARIES = {
    "/usr/sbin/qemu-ga": "/usr/sbin/qemu-ga",
    "/usr/sbin/mke2fs": "/usr/sbin/mke2fs",
    "/usr/sbin/e2fsck": "/usr/sbin/e2fsck",
}
EXTRA_LINKS = {
    "/usr/sbin/mkfs.ext4": "mke2fs",
    "/usr/sbin/fsck.ext4": "e2fsck",
    "/var/run": "../run",
    "/sbin/init": "/init",
}
DYNAMIC_LOADER = "/lib64/ld-linux-x86-64.so.2"
APT_LISTS = Path("/var/lib/apt/lists")
DPKG_STATUS = Path("/var/lib/dpkg/status")


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: pass ``kernel`` and ``initrd`` to the domain's direct kernel boot."""

    kernel: Path
    initrd: Path
    key: str


class GuestBuildError(RuntimeError):
    """The guest cannot be built on this host (missing package, no Debian mirror, ...)."""


def default_cache_dir() -> Path:
    """FREEZEFRAME_CACHE_DIR wins so test sessions with a throw-away FREEZEFRAME_HOME share one cache."""
    if env := os.environ.get("FREEZEFRAME_CACHE_DIR"):
        return Path(env)
    return Settings.from_env().cache_dir


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the cached guest for the current inputs, building it first if the inputs changed."""
    root = (cache_dir or default_cache_dir()) / "guest"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        kernel_pkg, kernel_ver = _resolve_kernel_cached(root / "kernel-resolution.json")
        key, inputs = _input_key(kernel_pkg, kernel_ver)
        final = root / key
        image = GuestImage(kernel=final / "vmlinuz", initrd=final / "initrd.img", key=key)
        if image.kernel.is_file() and image.initrd.is_file():
            return image
        started = time.monotonic()
        deb = _download_kernel(root / "debs", kernel_pkg, kernel_ver)
        publish_build(final, inputs, lambda work: _build_into(work, deb))
        print(f"testbed: built guest {key} in {time.monotonic() - started:.1f}s at {final}")
        return image


def publish_build(final: Path, inputs: dict[str, object], build: Callable[[Path], None]) -> None:
    """Run ``build`` in a scratch folder beside ``final`` and rename it into place: a reader (under the cache's
    lock) sees a whole build or none, and a failed build leaves nothing behind."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    work.chmod(0o755)
    try:
        build(work)
        (work / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        if final.exists():  # a half-written leftover cannot exist (rename is atomic); stale only
            shutil.rmtree(final)
        work.rename(final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builds across processes (parallel test sessions share the cache)."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], *, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed; run scripts/setup-host.sh") from exc
    if check and proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


_apt_updated = False


def _apt_update() -> None:
    """Run apt-get update at most once per process: only when package lists are missing."""
    global _apt_updated
    if _apt_updated:
        return
    _apt_updated = True
    _run(["apt-get", "update", "-q"])


def _apt_state() -> list[int]:
    """What the kernel resolution depends on: the package lists and the dpkg database."""
    return [p.stat().st_mtime_ns if p.exists() else 0 for p in (APT_LISTS, DPKG_STATUS)]


def _resolve_kernel_cached(memo: Path) -> tuple[str, str]:
    """apt-cache takes seconds here; its answer only changes when the lists or dpkg status change."""
    state = _apt_state()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["state"] == state:
            return str(saved["package"]), str(saved["version"])
    pkg, version = _resolve_kernel()
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps({"state": _apt_state(), "package": pkg, "version": version}))
    tmp.replace(memo)
    return pkg, version


def _resolve_kernel() -> tuple[str, str]:
    """The versioned cloud kernel package the meta package points at, and its version."""
    for attempt in range(2):
        deps = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], check=False)
        match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", deps.stdout)
        if match:
            pkg = match.group(1)
            installed = _run(["dpkg-query", "-W", "-f=${Version}", pkg], check=False)
            if installed.returncode == 0 and installed.stdout.strip():
                return pkg, installed.stdout.strip()
            policy = _run(["apt-cache", "policy", pkg], check=False)
            cand = re.search(r"Candidate:\s*(\S+)", policy.stdout)
            if cand and cand.group(1) != "(none)":
                return pkg, cand.group(1)
        if attempt == 0:
            _apt_update()
    raise GuestBuildError(
        f"cannot resolve {KERNEL_META_PACKAGE} with apt-cache; check the Debian mirror in /etc/apt/sources.list"
    )


def _input_key(kernel_pkg: str, kernel_ver: str) -> tuple[str, dict[str, object]]:
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(GUEST_DATA_DIR.iterdir()) if p.is_file()
    }
    query = _run(["dpkg-query", "-W", "-f=${Package} ${Version} ${Status}\n", *HOST_PACKAGES], check=False)
    versions: dict[str, str] = {}
    for line in query.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[2].endswith("installed"):
            versions[parts[0]] = parts[1]
    missing = [p for p in HOST_PACKAGES if p not in versions]
    if missing:
        raise GuestBuildError(f"missing Debian packages {', '.join(missing)}; run scripts/setup-host.sh")
    inputs: dict[str, object] = {
        "format": BUILD_FORMAT,
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "files": files,
        "packages": versions,
        "kernel": f"{kernel_pkg}={kernel_ver}",
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return digest, inputs


def _download_kernel(debs: Path, pkg: str, version: str) -> Path:
    """Fetch the kernel .deb once; it is kept so a rebuild after editing the init script stays offline."""
    debs.mkdir(parents=True, exist_ok=True)
    arch_version = version.split(":", 1)[-1]
    want = debs / f"{pkg}_{arch_version}_amd64.deb"
    if want.is_file():
        return want
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=debs))
    try:
        for attempt in range(2):
            proc = _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=tmp, check=False)
            got = sorted(tmp.glob(f"{pkg}_*.deb"))
            if proc.returncode == 0 and got:
                got[0].rename(want)
                return want
            if attempt == 0:
                _apt_update()
        raise GuestBuildError(f"apt-get download {pkg}={version} failed: {proc.stderr.strip()[-800:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Cpio:
    """A newc archive written in order; the kernel unpacks it as the initial root filesystem."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._names:
            return
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._chunks.append(data + b"\0" * (-len(data) % 4))

    def has(self, name: str) -> bool:
        return name.lstrip("/") in self._names

    def directory(self, name: str) -> None:
        if name.strip("/") in ("", "."):
            return
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(str(PurePosixPath(name.lstrip("/")).parent))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(str(PurePosixPath(name.lstrip("/")).parent))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.directory(str(PurePosixPath(name.lstrip("/")).parent))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = _Cpio()
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._chunks + trailer._chunks)


def _build_into(work: Path, deb: Path) -> None:
    """Extract the kernel, compile the workload and write initrd.img + vmlinuz into ``work``."""
    extract = work / "kernel-tree"
    try:
        _run(["dpkg", "-x", str(deb), str(extract)])
        vmlinuz = sorted((extract / "boot").glob("vmlinuz-*"))
        module_dirs = sorted((extract / "lib" / "modules").iterdir())
        if not vmlinuz or not module_dirs:
            raise GuestBuildError(f"{deb.name} holds no vmlinuz or no modules")
        shutil.copyfile(vmlinuz[0], work / "vmlinuz")
        modules = _collect_modules(module_dirs[0])
    finally:
        shutil.rmtree(extract, ignore_errors=True)

    workload = work / "ff-workload"
    _run(["gcc", "-static", "-O2", "-Wall", "-o", str(workload), str(GUEST_DATA_DIR / "workload.c")])

    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc/qemu", "var/tmp", "lib64", "bin", "sbin"):
        cpio.directory(d)
    cpio.chardev("/dev/console", 5, 1)
    cpio.chardev("/dev/null", 1, 3, 0o666)
    cpio.file("/init", (GUEST_DATA_DIR / "init").read_bytes(), 0o755)
    cpio.file("/sbin/shutdown", (GUEST_DATA_DIR / "shutdown").read_bytes(), 0o755)
    cpio.file("/etc/qemu/fsfreeze-hook", (GUEST_DATA_DIR / "fsfreeze-hook").read_bytes(), 0o755)
    cpio.file("/bin/ff-workload", workload.read_bytes(), 0o755)
    workload.unlink()
    cpio.file("/etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
    cpio.file("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("/etc/group", b"root:x:0:\n")
    for name, data in modules.items():
        cpio.file(f"/lib/modules/ff/{name}.ko", data)

    libraries: dict[str, Path] = {DYNAMIC_LOADER: Path(DYNAMIC_LOADER)}
    for dest, src in HOST_BINARIES.items():
        cpio.file(dest, Path(src).read_bytes(), 0o755)
        libraries.update(_shared_libraries(src))
    for dest, lib in sorted(libraries.items()):
        cpio.file(dest, lib.resolve().read_bytes(), 0o755)
    for link, target in EXTRA_LINKS.items():
        cpio.symlink(link, target)

    cpio.file("/bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    applets = _run(["/bin/busybox", "--list-full"]).stdout.split()
    for applet in applets:
        if not cpio.has(applet):  # our scripts and real e2fsprogs win over busybox applets
            cpio.symlink(applet, "/bin/busybox")

    # gzip level 1: the archive is mostly binaries, higher levels cost build time for little size.
    (work / "initrd.img").write_bytes(gzip.compress(cpio.getvalue(), compresslevel=1, mtime=0))


def _collect_modules(tree: Path) -> dict[str, bytes]:
    """Module name -> uncompressed .ko bytes, for the virtio drivers the guest needs."""
    builtin = (tree / "modules.builtin").read_text()
    for name in BUILTIN_NEEDED:
        if f"/{name}.ko" not in builtin:
            raise GuestBuildError(f"kernel in {tree} does not build in {name}; the guest image needs it")
    found: dict[str, bytes] = {}
    for path in (tree / "kernel").rglob("*.ko*"):
        base = path.name.split(".ko", 1)[0].replace("-", "_")
        if base not in MODULES:
            continue
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif not path.name.endswith(".ko"):
            raise GuestBuildError(f"unsupported module compression: {path.name}")
        found[base] = data
    missing = REQUIRED_MODULES - found.keys()
    if missing:
        raise GuestBuildError(f"kernel in {tree} lacks modules {', '.join(sorted(missing))}")
    return found


def _shared_libraries(binary: str) -> dict[str, Path]:
    """Libraries ``ldd`` lists, keyed by the path the loader looks them up at."""
    out = _run(["ldd", binary]).stdout
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line)
        if match:
            libs[match.group(2)] = Path(match.group(2))
            continue
        match = re.match(r"\s*(/\S+)\s+\(", line)
        if match:
            libs[match.group(1)] = Path(match.group(1))
    return libs
