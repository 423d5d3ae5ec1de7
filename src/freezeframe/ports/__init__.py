"""The outside systems every operation talks to, as Protocols (and the plain records they exchange).

The flow and the operations under ``freezeframe.ops`` import only these, the model and the errors; adapters
implement them and ``freezeframe.wiring`` plugs them in, so a scripted stand-in can drive any operation in a test.
One module per outside system; this package re-exports every name.
"""

from freezeframe.ports.domains import DiskUser, DomainDisk, DomainPlan, Domains, HostCapabilities
from freezeframe.ports.image_store import (
    IMAGE_AVAILABLE,
    IMAGE_DELETING,
    ImageDisk,
    ImageNic,
    ImageStore,
    ImageSummary,
    NewImage,
    StoredImage,
)
from freezeframe.ports.images import ImageCheck, ImageInfo, ImageRef, Images
from freezeframe.ports.packages import (
    DeclaredDisk,
    DeclaredNic,
    OpenedPackage,
    PackageFile,
    Packages,
    PackageSource,
    ProbedDisk,
    RecordedMember,
    RecordedSet,
    WrittenDisk,
    WrittenPackage,
)
from freezeframe.ports.snapshot import (
    MANIFEST,
    CaptureTarget,
    Catalog,
    Hypervisor,
    InstanceLocks,
    Journal,
    JournalEntry,
    ProgressCallback,
    Repository,
)
from freezeframe.ports.storage import Filesystem, HostFilesystems, MemberStore, Restores
from freezeframe.ports.tracking import ChangeTracking

__all__ = [
    "IMAGE_AVAILABLE",
    "IMAGE_DELETING",
    "MANIFEST",
    "CaptureTarget",
    "Catalog",
    "ChangeTracking",
    "DeclaredDisk",
    "DeclaredNic",
    "DiskUser",
    "DomainDisk",
    "DomainPlan",
    "Domains",
    "Filesystem",
    "HostCapabilities",
    "HostFilesystems",
    "Hypervisor",
    "ImageCheck",
    "ImageDisk",
    "ImageInfo",
    "ImageNic",
    "ImageRef",
    "ImageStore",
    "ImageSummary",
    "Images",
    "InstanceLocks",
    "Journal",
    "JournalEntry",
    "MemberStore",
    "NewImage",
    "OpenedPackage",
    "PackageFile",
    "PackageSource",
    "Packages",
    "ProbedDisk",
    "ProgressCallback",
    "RecordedMember",
    "RecordedSet",
    "Repository",
    "Restores",
    "StoredImage",
    "WrittenDisk",
    "WrittenPackage",
]
