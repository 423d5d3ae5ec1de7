"""The OVA manifest (``.mf``): one digest line per file, written by us and read from any tool."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from freezeframe.errors import OvaManifestError

MAX_MANIFEST_BYTES = 2**20
DIGESTS: Mapping[str, tuple[str, int]] = {"SHA1": ("sha1", 40), "SHA256": ("sha256", 64), "SHA512": ("sha512", 128)}
"""Manifest algorithm -> (hashlib name, hex digest length)."""

_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")


MANIFEST_ALGORITHMS: Mapping[str, str] = {"sha1": "SHA1", "sha256": "SHA256"}
"""What we write (hashlib name -> manifest keyword): OVF 1.x readers (COT, older VMware) expect SHA-1."""


def manifest_algorithm(digest: str) -> str:
    """The manifest keyword for a hashlib name we write; refuses any other."""
    if digest not in MANIFEST_ALGORITHMS:
        raise OvaManifestError(f"manifest digest {digest!r}: use one of {', '.join(MANIFEST_ALGORITHMS)}")
    return MANIFEST_ALGORITHMS[digest]


def format_manifest(entries: Sequence[tuple[str, str]], digest: str = "sha256") -> bytes:
    """``SHA256(name)= digest`` (or ``SHA1(...)``) lines for (name, hex digest) pairs."""
    keyword = manifest_algorithm(digest)
    return "".join(f"{keyword}({name})= {value}\n" for name, value in entries).encode("ascii")


def parse_manifest(text: bytes) -> list[tuple[str, str, str]]:
    """(algorithm, file name, lower-case hex digest) for each line; both spacing variants accepted."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OvaManifestError(f"manifest is not UTF-8 text: {exc}") from exc
    entries: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(decoded.splitlines(), start=1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if match is None:
            raise OvaManifestError(f"manifest line {number} is not 'SHA256(file)= digest': {line[:80]!r}")
        algorithm, name, digest = match.group(1), match.group(2).strip(), match.group(3).lower()
        if len(digest) != DIGESTS[algorithm][1]:
            raise OvaManifestError(f"manifest line {number}: {algorithm} digest has the wrong length")
        if name in seen:
            raise OvaManifestError(f"manifest lists {name!r} twice")
        seen.add(name)
        entries.append((algorithm, name, digest))
    return entries
