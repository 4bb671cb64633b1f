"""Content digests (`sha256:<hex>`) and streaming hashing."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from artifacts.errors import InvalidDigest

ALGORITHM = "sha256"
HEX_LENGTH = 64
_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
CHUNK_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, order=True)
class Digest:
    """Identity of a blob: an algorithm and the lowercase hex of its hash."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `sha256:<64 hex>`; raise InvalidDigest naming the text otherwise."""
        algorithm, sep, hexpart = str(text).partition(":")
        if not sep or algorithm != ALGORITHM or not _HEX.match(hexpart):
            raise InvalidDigest(f"invalid digest {text!r}: expected sha256:<64 lowercase hex>")
        return cls(algorithm, hexpart)

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        return cls(ALGORITHM, hashlib.sha256(data).hexdigest())

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(text: str) -> bool:
    try:
        Digest.parse(text)
    except InvalidDigest:
        return False
    return True


class Hasher:
    """Incremental sha256 that also counts bytes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(ALGORITHM, self._hash.hexdigest())


def hash_stream(stream: IO[bytes]) -> tuple[Digest, int]:
    """Hash a binary stream to its end; returns (digest, size)."""
    hasher = Hasher()
    for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
        hasher.update(chunk)
    return hasher.digest(), hasher.size


def iter_chunks(data: bytes, size: int = CHUNK_SIZE) -> Iterable[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield view[start : start + size]


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8. Used for manifests and keys."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
