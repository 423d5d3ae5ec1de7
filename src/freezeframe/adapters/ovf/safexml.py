"""Untrusted descriptor XML: parsed without DTDs, entities or network, then read namespace-tolerantly.

Descriptors come from VMware, VirtualBox, oVirt, COT and attackers; the same element can sit in the
OVF 1.x, 2.x or oVirt namespace, or in no namespace, and sections can be generic ``Section`` elements
typed by ``xsi:type``. ``DescriptorReader`` hides that; every section reader goes through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from lxml import etree

from freezeframe.adapters.ovf.model import MAX_DESCRIPTOR_BYTES, NS_XSI
from freezeframe.errors import OvfMalformed, OvfUnsafeXml


def qname(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def safe_parse(xml: bytes) -> etree._Element:
    """Parse untrusted XML: refuse DTDs/entities, never touch the network, bounded size."""
    if len(xml) > MAX_DESCRIPTOR_BYTES:
        raise OvfMalformed(f"descriptor is {len(xml)} bytes; more than {MAX_DESCRIPTOR_BYTES} is not an OVF")
    head = xml.replace(b"\x00", b"")  # UTF-16 text still shows its ASCII markup this way
    if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
        raise OvfUnsafeXml("descriptor declares a DOCTYPE/ENTITY; refused (entity expansion, external files)")
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        dtd_validation=False,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as exc:
        raise OvfMalformed(f"descriptor is not well-formed XML: {exc}") from exc
    except ValueError as exc:
        raise OvfMalformed(f"descriptor cannot be parsed: {exc}") from exc
    docinfo = root.getroottree().docinfo
    if getattr(docinfo, "doctype", "") or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise OvfUnsafeXml("descriptor declares a DOCTYPE; refused")
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise OvfUnsafeXml("descriptor uses entity references; refused")
    return root


def local_name(el: etree._Element) -> str:
    return etree.QName(el).localname


def namespace(el: etree._Element) -> str | None:
    return etree.QName(el).namespace


def text_of(el: etree._Element | None) -> str | None:
    """Stripped text of an element; None when absent or blank."""
    if el is None or el.text is None:
        return None
    text = el.text.strip()
    return text or None


_CONFIG_SPLIT = re.compile(r"\s+")


class DescriptorReader:
    """Namespace-tolerant access to one descriptor (DMTF 1.x/2.x and the oVirt dialect)."""

    def __init__(self, root: etree._Element, ns: str) -> None:
        self.root = root
        self.ns = ns

    def attr(self, el: etree._Element, name: str) -> str | None:
        value = el.get(qname(self.ns, name))
        if value is None:
            value = el.get(name)
        return value

    def kind(self, el: etree._Element) -> str:
        """Section/content kind: the element name, or the xsi:type of a generic Section/Content."""
        name = local_name(el)
        if name in ("Section", "Content"):
            xsi_type = el.get(qname(NS_XSI, "type")) or ""
            xsi_type = xsi_type.rsplit(":", 1)[-1]
            return xsi_type.removesuffix("_Type") or name
        return name

    def children(self, el: etree._Element, name: str | None = None) -> Iterator[etree._Element]:
        for child in el:
            if not isinstance(child.tag, str):
                continue
            if namespace(child) not in (self.ns, None):
                continue
            if name is None or self.kind(child) == name:
                yield child

    def child(self, el: etree._Element, name: str) -> etree._Element | None:
        return next(self.children(el, name), None)

    def in_configuration(self, el: etree._Element, configuration: str | None) -> bool:
        """Whether ``el`` applies to the chosen DeploymentOptionSection configuration."""
        wanted = self.attr(el, "configuration")
        if wanted is None or configuration is None:
            return True
        return configuration in _CONFIG_SPLIT.split(wanted.strip())
