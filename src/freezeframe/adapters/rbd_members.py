"""The MemberStore of kind ``rbd``: a member is a native RBD snapshot next to its parent image.

Restore is an RBD clone of the snapshot (clone v2: copy-on-write, no protection needed; ``full`` flattens it);
export, verify and extract read the snapshot through qemu-img's rbd driver (``rbd:POOL/IMAGE@SNAP:id=…:conf=…``);
remove deletes the snapshot and the set's tag on the image. Clones of a member are its dependants: ``children``
lists them and ``flatten`` makes one stand alone, so delete can refuse or flatten first.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from freezeframe.adapters.rbd_volumes import TAG_PREFIX, RbdVolumes, split_volume
from freezeframe.errors import HypervisorError, InvalidRequest, PreflightFailed
from freezeframe.model import RBD_STORE, DiskSpec, Member
from freezeframe.ports import ImageRef, ProgressCallback
from freezeframe.ports.volumes import CLONE_SUFFIX, RBD_PREFIX, Extent, VolumeSnapshot
from freezeframe.volume_members import RBD_SNAPSHOT_KEY


def parse_source(path: str) -> tuple[str, str]:
    """``rbd:POOL/IMAGE@SNAP`` → (``POOL/IMAGE``, ``SNAP``)."""
    if not path.startswith(RBD_PREFIX) or "@" not in path:
        raise PreflightFailed(f"{path!r} is not an RBD member source (rbd:POOL/IMAGE@SNAPSHOT)")
    volume, _, snap = path[len(RBD_PREFIX) :].partition("@")
    split_volume(volume)
    return volume, snap


class RbdMembers:
    def __init__(self, volumes: RbdVolumes) -> None:
        self.volumes = volumes

    @property
    def kind(self) -> str:
        return RBD_STORE

    def _snap(self, member: Member) -> tuple[str, str]:
        volume, snap = parse_source(member.path)
        return volume, member.metadata.get(RBD_SNAPSHOT_KEY, snap)

    def present(self, member: Member) -> bool:
        volume, snap = self._snap(member)
        with self.volumes.cluster() as handle:
            try:
                with self.volumes.image(handle, volume) as img:
                    return any(s["name"] == snap for s in img.list_snaps())
            except PreflightFailed:
                return False

    def source(self, member: Member) -> ImageRef:
        volume, snap = self._snap(member)
        return ImageRef(Path(f"{RBD_PREFIX}{volume}@{snap}{self.volumes.settings.qemu_options()}"), "raw")

    def restore(self, member: Member, dst: Path, *, full: bool, progress: ProgressCallback | None = None) -> ImageRef:
        """A clone named after the restored instance's folder and the disk (``POOL/<instance>-<target>``)."""
        import rbd

        volume, snap = self._snap(member)
        pool, _ = split_volume(volume)
        name = f"{dst.parent.name}-{dst.stem}"
        with self.volumes.cluster() as handle:
            ioctx = handle.open_ioctx(pool)
            try:
                parent = split_volume(volume)[1]
                features = rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                try:
                    rbd.RBD().clone(ioctx, parent, snap, ioctx, name, features=features)
                except rbd.Error as exc:
                    raise HypervisorError(f"cloning {volume}@{snap} to {pool}/{name} failed: {exc}") from exc
                # Noted as soon as it is ours, so that an undo (a later step failing) or discard removes it.
                dst.with_suffix(CLONE_SUFFIX).write_text(f"{pool}/{name}\n")
                if full:
                    with rbd.Image(ioctx, name) as img:
                        img.flatten()
            finally:
                ioctx.close()
        if progress is not None:
            progress(member.virtual_size, member.virtual_size)
        return ImageRef(Path(f"{RBD_PREFIX}{pool}/{name}"), "raw")

    def base_of(self, member: Member) -> str:
        volume, snap = self._snap(member)
        return f"{RBD_PREFIX}{volume}@{snap}"

    def checksum(self, member: Member) -> str:
        volume, snap = self._snap(member)
        spec = DiskSpec(member.target, member.bus, volume, "raw", member.virtual_size, "network", protocol="rbd")
        return self.volumes.checksum(VolumeSnapshot(spec, snap, self.base_of(member)))

    def changed_extents(self, member: Member, since: Member | None) -> list[Extent]:
        """librbd's ``diff_iterate`` (what ``rbd diff --from-snap`` prints) between the two snapshots of one image."""
        volume, snap = self._snap(member)
        older = None
        if since is not None:
            since_volume, older = self._snap(since)
            if since_volume != volume:
                raise InvalidRequest(
                    f"{since.target} of set {since.set_id} ({since_volume}) and {member.target} of set "
                    f"{member.set_id} ({volume}) are not snapshots of one RBD image; no diff between them"
                )
        extents: list[Extent] = []

        def collect(offset: int, length: int, exists: bool) -> None:
            last = extents[-1] if extents else None
            if last is not None and last.offset + last.length == offset and last.zero is not exists:
                extents[-1] = Extent(last.offset, last.length + length, last.zero)
            else:
                extents.append(Extent(offset, length, zero=not exists))

        with self.volumes.cluster() as handle, self.volumes.image(handle, volume, snap, read_only=True) as img:
            img.diff_iterate(0, img.size(), older, collect, include_parent=True, whole_object=False)
        return sorted(extents, key=lambda e: e.offset)

    def children(self, member: Member) -> list[str]:
        """``POOL/IMAGE`` of every clone of the member's snapshot (its copy-on-write dependants)."""
        volume, snap = self._snap(member)
        with self.volumes.cluster() as handle:
            try:
                with self.volumes.image(handle, volume, snap, read_only=True) as img:
                    return [f"{c['pool']}/{c['image']}" for c in img.list_children2() if not c.get("trash")]
            except PreflightFailed:
                return []

    def flatten(self, clone: str) -> None:
        """Copy the parent's data into the clone so it no longer depends on the snapshot."""
        with self.volumes.cluster() as handle, self.volumes.image(handle, clone) as img:
            img.flatten()

    def remove_clone(self, clone: str) -> None:
        """Retried while a just-stopped QEMU's watch lingers on the image (the OSD drops it within 30 s)."""
        import rbd

        pool, name = split_volume(clone)
        deadline = time.monotonic() + 45
        with self.volumes.cluster() as handle:
            ioctx = handle.open_ioctx(pool)
            try:
                while True:
                    try:
                        rbd.RBD().remove(ioctx, name)
                        return
                    except rbd.ImageNotFound:
                        return
                    except rbd.ImageBusy as exc:
                        if time.monotonic() > deadline:
                            raise HypervisorError(f"RBD image {clone} is still in use: {exc}") from exc
                        time.sleep(1)
            finally:
                ioctx.close()

    # ---- whole images: restore --disk --to rbd:…, import --storage rbd, revert ------------------------------

    def new_image(self, volume: str, size: int) -> ImageRef:
        """Layering + exclusive-lock, what Nova and Cinder create (no object-map: see the host notes)."""
        import rados
        import rbd

        pool, name = split_volume(volume)
        with self.volumes.cluster() as handle:
            try:
                ioctx = handle.open_ioctx(pool)
            except rados.Error as exc:
                raise PreflightFailed(f"RBD pool {pool!r} cannot be opened: {exc}") from exc
            try:
                features = rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                rbd.RBD().create(ioctx, name, size, old_format=False, features=features)
            except rbd.ImageExists:
                raise InvalidRequest(
                    f"RBD image {volume} already exists; freezeframe does not overwrite it: choose another name"
                ) from None
            except rbd.Error as exc:
                raise HypervisorError(f"creating RBD image {volume} failed: {exc}") from exc
            finally:
                ioctx.close()
        return self.readable(volume)

    def readable(self, volume: str) -> ImageRef:
        split_volume(volume)
        return ImageRef(Path(f"{RBD_PREFIX}{volume}{self.volumes.settings.qemu_options()}"), "raw")

    def remove_image(self, volume: str) -> None:
        self.remove_clone(volume)

    def rollback(self, source: str) -> None:
        import rbd

        volume, snap = parse_source(source)
        with self.volumes.cluster() as handle, self.volumes.image(handle, volume) as img:
            try:
                img.rollback_to_snap(snap)
            except rbd.Error as exc:
                raise HypervisorError(f"rolling {volume} back to {snap} failed: {exc}") from exc

    def remove(self, member: Member) -> None:
        import rbd

        volume, snap = self._snap(member)
        with self.volumes.cluster() as handle:
            try:
                with self.volumes.image(handle, volume) as img:
                    if any(s["name"] == snap for s in img.list_snaps()):
                        img.remove_snap(snap)
                    with contextlib.suppress(rbd.ObjectNotFound, KeyError):
                        img.metadata_remove(TAG_PREFIX + member.set_id)
            except PreflightFailed:
                return
