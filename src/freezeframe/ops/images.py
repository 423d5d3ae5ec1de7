"""The image store as users see it: list, show, delete (never under a running import), repair."""

from __future__ import annotations

from freezeframe.ops.common import Holds
from freezeframe.ports import ImageStore, StoredImage


class StoredImages:
    def __init__(self, store: ImageStore, holds: Holds) -> None:
        self.store = store
        self.holds = holds

    def images(self) -> list[StoredImage]:
        return self.store.list_images()

    def image(self, ref: str) -> StoredImage:
        return self.store.find(ref)

    def delete_image(self, ref: str) -> StoredImage:
        """Remove a stored image (record and package); refused while an import reads it (same hold)."""
        image = self.store.find(ref)
        with self.holds.hold(f"image-{image.id}", f"image {image.name}"):
            return self.store.delete(image.id)

    def repair(self) -> list[str]:
        """Finish interrupted image deletes and remove half-written packages (half-made imports: lifecycle)."""
        return self.store.repair()
