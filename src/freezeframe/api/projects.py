"""The project every resource belongs to, for the API's access checks and the CLI's ``project`` commands.

An instance's project is the admin's mapping if there is one, else the ``<ff:project>`` element of the domain's
``<metadata>`` (namespace ``https://freezeframe.dev/xmlns/1``). A set is pinned to the project it was taken under
(``freezeframe.project`` in its metadata); a set the CLI made without one follows its instance. Jobs and images
record their project when they are created. No web stack here: ``freezeframe project unassign`` imports it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from lxml import etree

from freezeframe.adapters.service_store import ProjectAssignment
from freezeframe.errors import HypervisorError, NotFound
from freezeframe.model import Instance, SnapshotSet
from freezeframe.set_query import PROJECT_KEY

__all__ = ["JOB_KEY", "PROJECT_KEY", "ProjectResolver", "project_from_metadata"]

PROJECT_NS = "https://freezeframe.dev/xmlns/1"
JOB_KEY = "freezeframe.job_id"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


class Instances(Protocol):
    """The façade's instance lookup (``Freezeframe.instance``)."""

    def instance(self, ref: str) -> Instance: ...

    def instances(self) -> list[Instance]: ...


class ProjectLookup(Protocol):
    """The admin's instance -> project mapping (``ProjectMap``)."""

    def get(self, instance_uuid: str) -> str | None: ...
    def all(self) -> dict[str, ProjectAssignment]: ...


def project_from_metadata(metadata_xml: str | None) -> str | None:
    """The ``<ff:project>`` text of a domain's ``<metadata>``, if any."""
    if not metadata_xml:
        return None
    try:
        root = etree.fromstring(metadata_xml.encode(), _PARSER)
    except etree.XMLSyntaxError:
        return None
    found = root.find(f"{{{PROJECT_NS}}}project") if root.tag == "metadata" else None
    if found is None and root.tag == f"{{{PROJECT_NS}}}project":
        found = root
    text = (found.text or "").strip() if found is not None else ""
    return text or None


class ProjectResolver:
    """Projects of instances and sets; libvirt answers are cached briefly since listing sets asks for many."""

    def __init__(self, service: Instances, mapping: ProjectLookup, ttl_s: float = 5.0) -> None:
        self.service = service
        self.mapping = mapping
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._members: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def of_instance(self, instance: Instance, mapping: Mapping[str, str] | None = None) -> tuple[str | None, str]:
        """(project, where it came from: 'mapping', 'metadata' or 'none'); ``mapping``: one read for a listing."""
        mapped = mapping.get(instance.uuid) if mapping is not None else self.mapping.get(instance.uuid)
        if mapped is not None:
            return mapped, "mapping"
        from_xml = project_from_metadata(instance.hardware.metadata_xml)
        if from_xml is not None:
            return from_xml, "metadata"
        return None, "none"

    def of_set(self, snapshot_set: SnapshotSet) -> str | None:
        return self.of_set_parts(snapshot_set.instance_uuid, snapshot_set.metadata)

    def of_set_parts(
        self, instance_uuid: str, metadata: dict[str, str], mapping: Callable[[], dict[str, str]] | None = None
    ) -> str | None:
        """``mapping``: the whole mapping, read once per listing and only if some set is not pinned."""
        pinned = metadata.get(PROJECT_KEY)
        if pinned:
            return pinned
        mapped = mapping().get(instance_uuid) if mapping is not None else self.mapping.get(instance_uuid)
        if mapped is not None:
            return mapped
        return self._from_libvirt(instance_uuid)

    def instances_of(self, project: str) -> tuple[str, ...]:
        """UUIDs of the instances now in ``project`` (mapped to it, or unmapped with it in their domain metadata):
        a listing's database filter takes their sets that are not pinned to a project. Cached for ``ttl_s``."""
        now = time.monotonic()
        with self._lock:
            hit = self._members.get(project)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        mapping = self.mapping_snapshot()
        found = {uuid for uuid, mapped in mapping.items() if mapped == project}
        try:
            on_host = self.service.instances()
        except HypervisorError:
            on_host = []  # libvirt away: the mapped instances still count
        found |= {i.uuid for i in on_host if i.uuid not in mapping and self.of_instance(i, mapping)[0] == project}
        members = tuple(sorted(found))
        with self._lock:
            self._members[project] = (now, members)
        return members

    def mapping_snapshot(self) -> dict[str, str]:
        """One read of the mapping for a whole listing."""
        return {uuid: a.project for uuid, a in self.mapping.all().items()}

    def lazy_mapping(self) -> Callable[[], dict[str, str]]:
        cached: list[dict[str, str]] = []

        def get() -> dict[str, str]:
            if not cached:
                cached.append(self.mapping_snapshot())
            return cached[0]

        return get

    def _from_libvirt(self, instance_uuid: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(instance_uuid)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        try:
            metadata_xml = self.service.instance(instance_uuid).hardware.metadata_xml
        except (NotFound, HypervisorError):
            metadata_xml = None  # the instance is gone: its CLI-made sets are the admin's to see
        project = project_from_metadata(metadata_xml)
        with self._lock:
            self._cache[instance_uuid] = (now, project)
        return project
