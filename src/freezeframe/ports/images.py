"""Image files on the host: every operation pins the format; one adapter implements it over qemu-img."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from freezeframe.ports.snapshot import (
    ProgressCallback,
)


@dataclass(frozen=True)
class ImageRef:
    """An image QEMU may open, its format always pinned: a whole file, or a byte range of one (a disk in an OVA)."""

    path: Path
    format: str
    offset: int = 0
    size: int | None = None
    """Bytes of the range from ``offset``; None: to the end of the file."""
    backing: bool = True
    """False: never open a backing file, whatever the image's header names (images from outside)."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None
    """The backing file, resolved to an absolute path; None for a standalone image."""
    backing_format: str | None
    extents: int | None = None
    """VMDK: how many extents the image names (None for other formats)."""


@dataclass(frozen=True)
class ImageCheck:
    """What ``qemu-img check`` found: ``ok``, ``leaks`` (harmless), ``corrupt`` or ``unsupported`` (no checker)."""

    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"


class Images(Protocol):
    """Image operations on host files (one adapter over ``qemu-img``); every call pins the image format.

    Errors: HypervisorError (tool missing, timeout, failure, with the tool's message); InsufficientSpace when the
    target filesystem is full.
    """

    def info(self, image: ImageRef) -> ImageInfo:
        """Works on images a running domain holds (shared read)."""

    def create(
        self,
        path: Path,
        fmt: str,
        size: int | None = None,
        *,
        backing: ImageRef | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        """A new image; with ``backing`` a copy-on-write child (``size`` None: the backing image's size).

        A relative ``backing.path`` is written as it is: QEMU resolves it from the new image's folder.
        """

    def convert(
        self,
        source: ImageRef,
        target: ImageRef,
        *,
        existing: bool = False,
        compress: bool = False,
        options: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> None:
        """Copy guest data; ``existing``: the target exists and reads as zeros (written in place, e.g. at an offset).

        ``options`` are creation options (``subformat=streamOptimized``, ``adapter_type``); progress is reported in
        bytes of the source's virtual size.
        """

    def rebase(self, path: Path, fmt: str, backing: ImageRef | None) -> None:
        """Put ``path`` over another backing image, copying what differs; ``None`` flattens it (copies all data in).

        A relative ``backing.path`` is resolved from ``path``'s folder, and written as it is.
        """

    def resize(self, path: Path, fmt: str, size: int) -> None: ...

    def check(self, image: ImageRef, timeout: float | None = None) -> ImageCheck: ...

    def measure(self, source: ImageRef, target_format: str) -> int:
        """Bytes a conversion of ``source`` to ``target_format`` needs at most."""

    def data_bytes(self, image: ImageRef) -> int:
        """Bytes of guest data the image holds (allocated, non-zero extents)."""
