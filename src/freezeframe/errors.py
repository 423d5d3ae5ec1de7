"""Typed errors, and the one table of what each category means to a person, a shell and an HTTP client.

Every category carries its CLI exit code, its HTTP status, the slug of its problem type
(``https://freezeframe.dev/problems/<slug>``), a title, and whether its message may be shown to an API client
(``public``: after host paths and URIs are redacted) or must be replaced by a generic message with an error id
(hypervisor, catalog, anything unexpected: their messages name hosts, files and drivers). Subclasses inherit their
category; ``category()`` answers for any exception, ``by_slug()`` for a slug recorded earlier (a failed job).
The CLI reads ``exit_code``; ``api/problems.py`` reads the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Category:
    exit_code: int
    http_status: int
    slug: str
    title: str
    public: bool
    """True: the message may reach API clients (redacted); False: a generic message with an error id instead."""


class FreezeframeError(Exception):
    """Base of every error the CLI turns into one line and an exit code; unclassified failures land here."""

    # Set from TABLE at the bottom of this module; read them on the class or on an instance.
    exit_code: ClassVar[int]
    http_status: ClassVar[int]
    slug: ClassVar[str]
    title: ClassVar[str]
    public: ClassVar[bool]

    @classmethod
    def category(cls) -> Category:
        return Category(cls.exit_code, cls.http_status, cls.slug, cls.title, cls.public)


INTERNAL = Category(1, 500, "internal-error", "Internal error", public=False)
"""Anything that is not a FreezeframeError: a bug. Clients get an error id, the log gets the traceback."""
INTERRUPTED = Category(130, 500, "interrupted", "Interrupted", public=False)
"""Ctrl-C, or a stop of the service while a job ran."""


class NotFound(FreezeframeError):
    pass


class InstanceNotFound(NotFound):
    pass


class SetNotFound(NotFound):
    pass


class InvalidRequest(FreezeframeError):
    pass


class RecordInvalid(InvalidRequest):
    """A stored or handed-over record of a set (catalog row, set.json, OVF section) holds a value we cannot use."""


class InstanceBusy(FreezeframeError):
    """Another freezeframe operation on the same instance is in flight."""


class PreflightFailed(FreezeframeError):
    pass


class ConsistencyUnavailable(FreezeframeError):
    """--require was given and the requested level cannot be reached."""


class CaptureFailed(FreezeframeError):
    pass


class FreezeWindowExceeded(CaptureFailed):
    pass


class GroupBarrierFailed(CaptureFailed):
    """A host of a group snapshot failed, aborted or stopped answering: every host's share of the group set fails."""


class RepositoryFull(CaptureFailed):
    """The repository ran out of space during the copy (after preflight found enough)."""


class HypervisorError(FreezeframeError):
    pass


class AgentUnavailable(HypervisorError):
    """The guest agent is missing, not connected or did not answer in time."""


class InsufficientSpace(PreflightFailed):
    pass


class CatalogError(FreezeframeError):
    pass


# ---- lifecycle.py ----------------------------------------------------------------------------------------


class VerifyFailed(FreezeframeError):
    """``verify`` found a member whose data no longer matches the catalog, or a clone that did not check out."""


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
    """The target filesystem filled up; the partial file has been removed (InsufficientSpace's category)."""


# ---- adapters/image_store.py -----------------------------------------------------------------------------


class ImageNotFound(NotFound):
    """No stored image matches the reference."""


class ImageStoreError(FreezeframeError):
    """The store could not keep or hand back a package (I/O, missing data)."""


# ---- adapters/service_store.py ---------------------------------------------------------------------------


class JobNotFound(NotFound):
    pass


class TokenNotFound(NotFound):
    pass


# ---- adapters/keystone.py, adapters/glance.py ------------------------------------------------------------


class CloudServiceError(FreezeframeError):
    """Keystone or Glance could not be reached or refused what the service user asked."""


# ---- off-site copies (ops/copy.py, adapters/s3_remote.py) ---------------------------------------------------


class RemoteNotFound(NotFound):
    pass


class PolicyNotFound(NotFound):
    pass


class RemoteError(FreezeframeError):
    """The object store refused or failed a request (unreachable endpoint, credentials, bucket, digest mismatch)."""


class DecryptionFailed(RemoteError):
    """A copy cannot be decrypted: the remote's key file is not the key it was written with, or the data changed."""


class GroupNotFound(NotFound):
    """No consistency group or group set by that name or id."""


# ---- many hosts (agents, hosts, the job queue) --------------------------------------------------------------


class HostNotFound(NotFound):
    pass


class AgentNotAuthorized(FreezeframeError):
    """An agent presented no key, or one that is not its host's (``freezeframe hosts enroll`` issues keys)."""


class HostUnavailable(FreezeframeError):
    """The host that runs the instance (or holds the set) stopped answering: its agent's heartbeat is stale."""


class WrongHost(FreezeframeError):
    """A job reached an agent that does not run its instance: agents act on their own host's instances only."""


# ---- the table ---------------------------------------------------------------------------------------------

_NO_SPACE = Category(5, 409, "preflight-failed", "Preflight check failed", public=True)

TABLE: dict[type[FreezeframeError], Category] = {
    FreezeframeError: Category(1, 500, "operation-failed", "Operation failed", public=True),
    NotFound: Category(2, 404, "not-found", "Not found", public=True),
    InvalidRequest: Category(3, 400, "invalid-request", "Invalid request", public=True),
    InstanceBusy: Category(4, 409, "busy", "Busy", public=True),
    PreflightFailed: _NO_SPACE,
    ConsistencyUnavailable: Category(6, 409, "consistency-unavailable", "Consistency level not reachable", public=True),
    CaptureFailed: Category(7, 500, "capture-failed", "Capture failed", public=True),
    HypervisorError: Category(8, 502, "hypervisor-error", "Hypervisor error", public=False),
    CatalogError: Category(9, 503, "catalog-unavailable", "Catalog unavailable", public=False),
    ImageStoreError: Category(9, 503, "image-store-unavailable", "Image store unavailable", public=False),
    VerifyFailed: Category(10, 500, "verify-failed", "Verification failed", public=True),
    OvaNoSpace: _NO_SPACE,
    CloudServiceError: Category(11, 502, "cloud-service-error", "Cloud service error", public=True),
    RemoteError: Category(12, 502, "remote-error", "Remote storage error", public=True),
    AgentNotAuthorized: Category(13, 403, "agent-not-authorized", "Agent not authorized", public=True),
    HostUnavailable: Category(14, 503, "host-unavailable", "Host unavailable", public=True),
    WrongHost: Category(15, 409, "wrong-host", "Wrong host", public=True),
}
"""The categories. Every other class inherits the row of its nearest listed ancestor (Python's MRO). OvfError,
OvaError and OvaWriteError have no row on purpose: their subclasses also derive from InvalidRequest or
InsufficientSpace, whose rows they must inherit; OvaNoSpace is listed because OvaWriteError comes first in its MRO."""

for _cls, _row in TABLE.items():
    _cls.exit_code, _cls.http_status, _cls.slug, _cls.title, _cls.public = (
        _row.exit_code, _row.http_status, _row.slug, _row.title, _row.public,
    )  # fmt: skip


def category(exc: BaseException) -> Category:
    """The row for any exception: its class's, ``INTERRUPTED`` for Ctrl-C, ``INTERNAL`` for anything else."""
    if isinstance(exc, FreezeframeError):
        return exc.category()
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    return INTERNAL


def _all_classes(root: type[FreezeframeError] = FreezeframeError) -> list[type[FreezeframeError]]:
    found = [root]
    for sub in root.__subclasses__():
        found += [c for c in _all_classes(sub) if c not in found]
    return found


def table() -> dict[type[FreezeframeError], Category]:
    """Every error class with its category (for docs and tests)."""
    return {cls: cls.category() for cls in _all_classes()}


def by_slug(slug: str) -> Category | None:
    """The category a slug stands for (a failed job stores only the slug)."""
    for row in (*table().values(), INTERNAL, INTERRUPTED):
        if row.slug == slug:
            return row
    return None
