"""OVF descriptors: write ours, read ours and other tools', validate against the DMTF schema.

Export must produce something VMware, VirtualBox, oVirt and virt-v2v accept, and import must survive
whatever those tools (or an attacker) put in a descriptor. One module per part:

* ``model``: the values written and read (``OvfDisk``, ``ImportedMachine`` ...), namespaces, format URIs;
* ``writer``: ``build_descriptor``;
* ``reader``: ``parse_descriptor`` (envelope, References, DiskSection, networks, configuration),
  with ``hardware`` (VirtualHardwareSection) and ``product`` (our ProductSection, both ways);
* ``safexml``: defensive XML parsing and namespace-tolerant access; ``units``: numbers and units;
* ``schema``: offline DSP8023 validation.

This package re-exports the names the rest of freezeframe uses. See docs/ovf.md.
"""

from freezeframe.adapters.ovf.model import (
    FORMAT_URI_QCOW2,
    FORMAT_URI_RAW,
    FORMAT_URI_VMDK_STREAM,
    FREEZEFRAME_CLASS,
    MAX_CAPACITY,
    MAX_DESCRIPTOR_BYTES,
    MAX_MEMORY,
    MAX_VCPUS,
    NS_OVF1,
    NS_OVF2,
    NS_RASD,
    NS_VSSD,
    WRITE_FORMAT_URIS,
    FreezeframeInfo,
    FreezeframeMember,
    ImportedDisk,
    ImportedMachine,
    ImportedNic,
    OvfDisk,
    OvfFileRef,
    format_from_uri,
)
from freezeframe.adapters.ovf.reader import parse_collection, parse_descriptor
from freezeframe.adapters.ovf.schema import schema_path, validate_descriptor
from freezeframe.adapters.ovf.units import parse_byte_units
from freezeframe.adapters.ovf.writer import build_collection_descriptor, build_descriptor

__all__ = [
    "FORMAT_URI_QCOW2",
    "FORMAT_URI_RAW",
    "FORMAT_URI_VMDK_STREAM",
    "FREEZEFRAME_CLASS",
    "MAX_CAPACITY",
    "MAX_DESCRIPTOR_BYTES",
    "MAX_MEMORY",
    "MAX_VCPUS",
    "NS_OVF1",
    "NS_OVF2",
    "NS_RASD",
    "NS_VSSD",
    "WRITE_FORMAT_URIS",
    "FreezeframeInfo",
    "FreezeframeMember",
    "ImportedDisk",
    "ImportedMachine",
    "ImportedNic",
    "OvfDisk",
    "OvfFileRef",
    "build_collection_descriptor",
    "build_descriptor",
    "format_from_uri",
    "parse_byte_units",
    "parse_collection",
    "parse_descriptor",
    "schema_path",
    "validate_descriptor",
]
