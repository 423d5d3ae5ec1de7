"""Remote definitions from untrusted input (CLI and API share ``remote_spec``): ``s3://BUCKET[/PREFIX]``, an
``http(s)://`` endpoint, a region, an optional key file. No credential is ever accepted here: boto3's chain
(environment, ``AWS_PROFILE``, ``~/.aws/credentials``) supplies them when a remote is used."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from freezeframe.errors import InvalidRequest
from freezeframe.ports.remote import RemoteSpec
from freezeframe.validation import validate_name

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9._/-]{1,200}")
_REGION = re.compile(r"[a-z0-9-]{1,32}")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://BUCKET[/PREFIX]``; bucket names follow S3's rules."""
    if not url.startswith("s3://"):
        raise InvalidRequest(f"remote URL {url[:80]!r} must look like s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidRequest(f"bucket {bucket[:80]!r}: 3-63 lower-case letters, digits, dots and dashes")
    prefix = prefix.strip("/")
    if prefix and (not _PREFIX.fullmatch(prefix) or ".." in prefix.split("/") or "//" in prefix):
        raise InvalidRequest(f"prefix {prefix[:80]!r}: letters, digits, . _ - and / only, no empty or .. part")
    return bucket, prefix


def validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidRequest(f"--endpoint {endpoint[:80]!r}: an http:// or https:// URL without credentials in it")
    if parts.query or parts.fragment:
        raise InvalidRequest(f"--endpoint {endpoint[:80]!r}: no query or fragment")
    return endpoint.rstrip("/")


def remote_spec(
    name: str, url: str, endpoint: str | None, region: str | None = None, key_file: str | None = None
) -> RemoteSpec:
    bucket, prefix = parse_s3_url(url)
    if region is not None and not _REGION.fullmatch(region):
        raise InvalidRequest(f"--region {region[:40]!r}: lower-case letters, digits and dashes")
    if key_file is not None:
        path = Path(key_file)
        if not path.is_absolute():
            raise InvalidRequest(f"--key-file {key_file[:80]!r}: give an absolute path")
        if not path.is_file():
            raise InvalidRequest(f"--key-file {key_file[:80]!r} is not a file (create one with --new-key)")
    return RemoteSpec(
        name=validate_name(name, "remote name"), bucket=bucket, prefix=prefix,
        endpoint=validate_endpoint(endpoint) if endpoint else None, region=region, key_file=key_file,
    )  # fmt: skip
