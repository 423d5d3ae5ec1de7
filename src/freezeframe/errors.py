"""Typed errors. Each message says what went wrong and what the user can do about it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FreezeframeError(Exception):
    """Base of every error the CLI turns into one line and an exit code."""

    exit_code = 1


class NotFound(FreezeframeError):
    exit_code = 2


class InstanceNotFound(NotFound):
    pass


class SetNotFound(NotFound):
    pass


class InvalidRequest(FreezeframeError):
    exit_code = 3


class InstanceBusy(FreezeframeError):
    """Another freezeframe operation on the same instance is in flight."""

    exit_code = 4


class PreflightFailed(FreezeframeError):
    exit_code = 5


class ConsistencyUnavailable(FreezeframeError):
    """--require was given and the requested level cannot be reached."""

    exit_code = 6


class CaptureFailed(FreezeframeError):
    exit_code = 7


class FreezeWindowExceeded(CaptureFailed):
    pass


class RepositoryFull(CaptureFailed):
    """The repository ran out of space during the copy (after preflight found enough)."""


class HypervisorError(FreezeframeError):
    exit_code = 8


class AgentUnavailable(HypervisorError):
    """The guest agent is missing, not connected or did not answer in time."""


class InsufficientSpace(PreflightFailed):
    pass


class CatalogError(FreezeframeError):
    exit_code = 9


# ---- lifecycle.py ----------------------------------------------------------------------------------------


class VerifyFailed(FreezeframeError):
    """``verify`` found a member whose data no longer matches the catalog, or a clone that did not check out."""

    exit_code = 10


class SetHasDependants(InvalidRequest):
    """Restored instances still read the set's members (copy-on-write); ``--force`` flattens them first."""

    def __init__(self, message: str, dependants: Sequence[Any]) -> None:
        super().__init__(message)
        self.dependants = list(dependants)


# ---- adapters/ovf.py -------------------------------------------------------------------------------------


class OvfError(FreezeframeError):
    """Base of every OVF/OVA problem."""


class OvfRejected(OvfError, InvalidRequest):
    """A descriptor or package handed to us is refused (exit code of InvalidRequest)."""


class OvfUnsafeXml(OvfRejected):
    """DOCTYPE/ENTITY declarations: billion laughs and external entities are refused outright."""


class OvfMalformed(OvfRejected):
    """Not well-formed XML (lxml refused it) or too large to be a descriptor."""


class OvfNotOvf(OvfRejected):
    """Well-formed XML whose root is not an OVF Envelope."""


class OvfUnsupported(OvfRejected):
    """An OVF we understand but do not import (pre-standard 0.9, several virtual systems, ...)."""


class OvfInvalidValue(OvfRejected):
    """A number, unit or attribute that is missing or cannot be believed."""


class OvfMissingReference(OvfRejected):
    """A disk, file or controller reference that points at nothing."""


class OvfCapacityError(OvfRejected):
    """A disk capacity that is absurd (<= 0, > 64 TiB) or smaller than the data it holds."""


class OvfSchemaError(OvfRejected):
    """The descriptor does not validate against the DMTF OVF schema."""


class OvfBuildError(OvfError, InvalidRequest):
    """We were asked to describe something inconsistent (unknown member, bad file name, ...)."""


# ---- adapters/ova.py -------------------------------------------------------------------------------------


class OvaError(OvfError):
    """Base of every OVA package problem."""


class OvaRejected(OvaError, OvfRejected):
    """A package handed to us is refused."""


class OvaUnsafeMember(OvaRejected):
    """A tar member that could escape the package: absolute/.. paths, links, devices, fifos, dirs."""


class OvaLayoutError(OvaRejected):
    """Not a tar, not ustar, descriptor not first, duplicate names, truncated archive, ..."""


class OvaManifestError(OvaRejected):
    """A manifest we cannot read, or one listing files the package does not hold."""


class OvaDigestMismatch(OvaRejected):
    """A file's digest differs from the manifest: corrupt or tampered package."""


class OvaMissingFile(OvaRejected):
    """The descriptor references a file the package does not contain."""


class OvaDiskError(OvaRejected):
    """A disk member qemu cannot use: truncated, corrupt, wrong format or size."""


class OvaUnsafeDisk(OvaDiskError):
    """A disk image that would make qemu open files outside the package (backing, data-file, extents)."""


class OvaWriteError(OvaError):
    """Writing a package failed; the partial file has been removed."""


class OvaNoSpace(OvaWriteError, InsufficientSpace):
    """The target filesystem filled up; the partial file has been removed."""

    exit_code = InsufficientSpace.exit_code


# ---- adapters/image_store.py -----------------------------------------------------------------------------


class ImageNotFound(NotFound):
    """No stored image matches the reference."""


class ImageStoreError(FreezeframeError):
    """The store could not keep or hand back a package (I/O, missing data)."""

    exit_code = 9


# ---- adapters/service_store.py ---------------------------------------------------------------------------


class JobNotFound(NotFound):
    pass


class TokenNotFound(NotFound):
    pass
