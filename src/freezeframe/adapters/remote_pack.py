"""The MemberPacker port over qemu-img: a member becomes a zstd-compressed qcow2 (what a remote keeps).

A full member: ``qemu-img convert -c -o compression_type=zstd`` of its whole data (file or RBD snapshot).
An incremental member: the same with ``-B PARENT -F qcow2``, which writes only the clusters the member's own layer
holds (zero clusters included), then ``qemu-img rebase -u`` names the parent relatively
(``../<parent set>/<target>.qcow2``): downloaded side by side, the objects form the same chain as the repository,
and ``qemu-img info/convert/compare`` read them with no freezeframe at all.
The output is written under a ``.part`` name and renamed when complete, so a staged file is always whole.
"""

from __future__ import annotations

from pathlib import Path

from freezeframe.adapters.qemu_img import run, source_args
from freezeframe.durable import sha256_file
from freezeframe.errors import HypervisorError, InsufficientSpace
from freezeframe.ports import ImageRef

PACK_FORMAT = "qcow2"
COMPRESSION = {"compression_type": "zstd"}


def _check(argv: list[str], what: str) -> None:
    done = run(argv, what, None)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        if "No space left" in detail[0]:
            raise InsufficientSpace(f"{what}: no space left ({detail[0]})")
        raise HypervisorError(f"{what} failed: {detail[0]}")


class QemuPacker:
    def pack(self, source: ImageRef, dst: Path, over: ImageRef | None, backing_name: str | None) -> None:
        partial = dst.with_name(dst.name + ".part")
        options = ",".join(f"{k}={v}" for k, v in COMPRESSION.items())
        argv = ["convert", "-c", "-o", options, *source_args(source)]
        if over is not None:
            argv += ["-B", str(over.path.resolve()), "-F", over.format]
        argv += ["-O", PACK_FORMAT, str(partial)]
        try:
            _check(argv, f"packing {source.path}")
            if over is not None and backing_name is not None:
                _check(["rebase", "-u", "-f", PACK_FORMAT, "-b", backing_name, "-F", over.format, str(partial)],
                       f"naming the parent of {dst.name}")  # fmt: skip
            partial.rename(dst)
        finally:
            partial.unlink(missing_ok=True)

    def sha256(self, path: Path) -> str:
        return sha256_file(path)
