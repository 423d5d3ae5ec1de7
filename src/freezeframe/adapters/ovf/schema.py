"""Offline validation of a descriptor against the DMTF DSP8023 schema (OVF 1.x or 2.x)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

from lxml import etree

from freezeframe.adapters.ovf.safexml import safe_parse
from freezeframe.errors import OvfError, OvfSchemaError

SCHEMA_FILES: Mapping[int, str] = {1: "ovf1/dsp8023_1.1.1.xsd", 2: "ovf2/dsp8023_2.0.1.xsd"}


@functools.lru_cache(maxsize=4)
def _schema(path: Path) -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
    try:
        return etree.XMLSchema(etree.parse(str(path), parser))
    except (OSError, etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
        raise OvfError(f"cannot load the OVF schema {path}: {exc}") from exc


def schema_path(ovf_version: int, xsd_root: Path) -> Path:
    """The DSP8023 entry schema under ``xsd_root`` (the directory holding ovf1/ and ovf2/)."""
    if ovf_version not in SCHEMA_FILES:
        raise OvfError(f"no schema for OVF version {ovf_version}")
    path = xsd_root / SCHEMA_FILES[ovf_version]
    if not path.is_file() and (xsd_root / "xsd" / SCHEMA_FILES[ovf_version]).is_file():
        path = xsd_root / "xsd" / SCHEMA_FILES[ovf_version]
    return path


def validate_descriptor(xml: bytes, ovf_version: int, xsd_root: Path) -> None:
    """Raise OvfSchemaError with the schema's first message unless ``xml`` validates offline.

    The entry xsd imports common.xsd by a relative path first, so the CIM schemas' absolute
    http:// imports resolve to the already-loaded copy: nothing is fetched.
    """
    path = schema_path(ovf_version, xsd_root)
    if not path.is_file():
        raise OvfError(f"OVF schema {path} not found")
    schema = _schema(path.resolve())
    doc = safe_parse(xml)
    if not schema.validate(doc.getroottree()):
        errors = list(cast(Iterable[etree._LogEntry], schema.error_log))
        first = errors[0] if errors else None
        where = f"line {first.line}: " if first is not None else ""
        message = first.message if first is not None else "invalid"
        raise OvfSchemaError(f"descriptor is not valid OVF {ovf_version}.x: {where}{message}")
