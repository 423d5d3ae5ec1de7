"""Client-side encryption of what a remote keeps: AES-256-GCM (``cryptography``), chunk by chunk.

Format: ``FFSEAL1\\n`` + 4-byte chunk size + 4-byte random nonce prefix, then chunks of ``ciphertext || tag``.
Chunk *i* uses the nonce ``prefix || i`` (64-bit big-endian) and the associated data ``label || i || last?``,
where the label is the object's key: a chunk cannot be moved, dropped, reordered, or swapped with another object's
without decryption failing. The key is 32 bytes in a file the user names (raw, or 64 hex digits); it is read, never
stored. Lose the file and the copies cannot be read by anyone, freezeframe included.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from freezeframe.errors import DecryptionFailed, InvalidRequest

MAGIC = b"FFSEAL1\n"
CHUNK = 4 * 1024 * 1024
TAG = 16
KEY_BYTES = 32


def read_key(key_file: Path) -> bytes:
    """32 raw bytes, or 64 hex digits (with or without a trailing newline)."""
    try:
        raw = key_file.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"encryption key file {key_file} cannot be read ({exc.strerror})") from exc
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise InvalidRequest(f"encryption key file {key_file} must hold 32 bytes (raw, or 64 hex digits)")
    return key


def new_key_file(path: Path) -> None:
    """A fresh random key, written 0600 (``freezeframe remote add --new-key``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(os.urandom(KEY_BYTES).hex() + "\n")


def _aad(label: str, index: int, last: bool) -> bytes:
    return label.encode() + struct.pack(">QB", index, 1 if last else 0)


def _chunks(source: BinaryIO, size: int) -> Iterator[tuple[bytes, bool]]:
    """Each chunk with whether it is the last (one read ahead); an empty input is one empty last chunk."""
    current = source.read(size)
    while True:
        following = source.read(size)
        yield current, not following
        if not following:
            return
        current = following


class AesGcmSealer:
    """The Sealer port for one key."""

    def __init__(self, key_file: Path) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.key_file = key_file
        self._aead = AESGCM(read_key(key_file))

    def seal(self, plain: Path, sealed: Path, label: str) -> None:
        with plain.open("rb") as source, sealed.open("wb") as sink:
            self._seal(source, sink, label)

    def open(self, sealed: Path, plain: Path, label: str) -> None:
        with sealed.open("rb") as source, plain.open("wb") as sink:
            self._open(source, sink, label)

    def seal_bytes(self, data: bytes, label: str) -> bytes:
        import io

        sink = io.BytesIO()
        self._seal(io.BytesIO(data), sink, label)
        return sink.getvalue()

    def open_bytes(self, data: bytes, label: str) -> bytes:
        import io

        sink = io.BytesIO()
        self._open(io.BytesIO(data), sink, label)
        return sink.getvalue()

    def _seal(self, source: BinaryIO, sink: BinaryIO, label: str) -> None:
        prefix = os.urandom(4)
        sink.write(MAGIC + struct.pack(">I", CHUNK) + prefix)
        for index, (chunk, last) in enumerate(_chunks(source, CHUNK)):
            nonce = prefix + struct.pack(">Q", index)
            sink.write(self._aead.encrypt(nonce, chunk, _aad(label, index, last)))

    def _open(self, source: BinaryIO, sink: BinaryIO, label: str) -> None:
        from cryptography.exceptions import InvalidTag

        header = source.read(len(MAGIC) + 8)
        if len(header) != len(MAGIC) + 8 or not header.startswith(MAGIC):
            raise DecryptionFailed(f"{label} is not encrypted by freezeframe (no FFSEAL1 header)")
        (chunk_size,) = struct.unpack(">I", header[len(MAGIC) : len(MAGIC) + 4])
        prefix = header[len(MAGIC) + 4 :]
        for index, (chunk, last) in enumerate(_chunks(source, chunk_size + TAG)):
            nonce = prefix + struct.pack(">Q", index)
            try:
                sink.write(self._aead.decrypt(nonce, chunk, _aad(label, index, last)))
            except InvalidTag:
                raise DecryptionFailed(
                    f"{label} cannot be decrypted with the key in {self.key_file}: it is not the key this copy was "
                    "written with, or the copy was altered"
                ) from None
