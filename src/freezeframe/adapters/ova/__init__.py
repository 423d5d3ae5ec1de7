"""OVA packages: a streaming writer and a defensive reader.

* ``writer``: ``write_ova`` lays out the tar itself, ``disk_writer`` puts each disk in place (copied or
  converted to streamOptimized VMDK) without staging copies;
* ``reader``: ``open_ova`` checks the layout (``tar``) and the manifest (``manifest``) before the
  descriptor is believed;
* ``probe``: ``verify_disk`` checks each disk's header without QEMU (``adapters/image_guard``), then
  ``probe_disk`` / ``qemu_json_for`` give QEMU the verified format, pinned, and nothing else.

This package re-exports the names the rest of freezeframe uses. See docs/ovf.md.
"""

from freezeframe.adapters.ova.disk_writer import OvaDiskSource
from freezeframe.adapters.ova.manifest import parse_manifest
from freezeframe.adapters.ova.probe import DiskProbe, probe_disk, qemu_json_for, verify_disk
from freezeframe.adapters.ova.reader import OvaDiskMember, OvaPackage, open_ova, open_ova_collection
from freezeframe.adapters.ova.tar import OvaMember
from freezeframe.adapters.ova.writer import DescriptorFactory, OvaResult, OvaWrittenMember, write_ova

__all__ = [
    "DescriptorFactory",
    "DiskProbe",
    "OvaDiskMember",
    "OvaDiskSource",
    "OvaMember",
    "OvaPackage",
    "OvaResult",
    "OvaWrittenMember",
    "open_ova",
    "open_ova_collection",
    "parse_manifest",
    "probe_disk",
    "qemu_json_for",
    "verify_disk",
    "write_ova",
]
