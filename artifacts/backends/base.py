"""The blob backend interface and the verifying reader every backend returns."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from artifacts.digest import ALGORITHM, CHUNK_SIZE, Digest, Hasher
from artifacts.errors import BlobCorrupted, InvalidDigest, SizeMismatch
from artifacts.fsio import read_all

BLOB_DIR = f"blobs/{ALGORITHM}"
TEMP_DIR = "tmp"
REFS_DIR = "refs"
TEMP_AGE_S = 3600.0  # a temp file or upload older than this belongs to a writer that died


def blob_key(digest: Digest) -> str:
    """A blob's place below a store's root, the same on every backend: `blobs/sha256/ab/<rest>`."""
    return f"{BLOB_DIR}/{digest.hex[:2]}/{digest.hex[2:]}"


def digest_at(shard: str, rest: str) -> Digest | None:
    """The digest a listed `<shard>/<rest>` below `blobs/sha256/` names, or None for a name
    that is no blob's (a foreign or partial file)."""
    if len(shard) != 2 or "/" in rest:
        return None
    try:
        return Digest.parse(f"{ALGORITHM}:{shard}{rest}")
    except InvalidDigest:
        return None


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob's identity, size and when it was last written (epoch seconds)."""

    digest: Digest
    size: int
    modified_at: float


@dataclass(frozen=True)
class PutResult:
    """What a put stored: the digest, the size, and whether the blob was new."""

    digest: Digest
    size: int
    created: bool


class BlobBackend(ABC):
    """Where blob bytes live, at `blob_key(digest)` below the store's root. Contract:

    - `put` hashes while it writes and makes the blob visible atomically (whole or not at
      all); if `expected` is given and the content does not match, nothing is stored.
    - `open` returns a reader that verifies the content against the digest when it reaches
      the end (BlobCorrupted names the digest and location); `BlobNotFound` if absent.
    - `stat` and `iter_blobs` give size and modification time; `iter_blobs` lists only
      complete blobs.
    - a writer that dies mid-put leaves at most a temp file or upload, never a partial blob;
      `clean_temp` removes those older than `older_than_seconds` (younger ones may belong to
      a put still in flight) and returns how many.
    """

    url: str

    @abstractmethod
    def has(self, digest: Digest) -> bool: ...

    @abstractmethod
    def stat(self, digest: Digest) -> BlobInfo | None: ...

    @abstractmethod
    def open(self, digest: Digest) -> IO[bytes]: ...

    @abstractmethod
    def put(self, stream: IO[bytes], expected: Digest | None = None) -> PutResult: ...

    @abstractmethod
    def delete(self, digest: Digest) -> bool: ...

    @abstractmethod
    def iter_blobs(self) -> Iterator[BlobInfo]: ...

    @abstractmethod
    def location(self, digest: Digest) -> str: ...

    @abstractmethod
    def clean_temp(self, older_than_seconds: float = TEMP_AGE_S) -> int: ...


class VerifyingReader(io.RawIOBase):
    """Wraps a raw stream; hashes what is read and checks digest and size at EOF."""

    def __init__(self, raw: IO[bytes], digest: Digest, location: str, size: int | None = None):
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._location = location
        self._size = size
        self._hasher = Hasher()
        self._checked = False

    @property
    def verifies(self) -> Digest:
        """The digest this reader checks its bytes against (raising at EOF otherwise)."""
        return self._digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            self._hasher.update(memoryview(buffer)[:n])
            # With a known size, check as the last bytes arrive: a reader that stops at
            # `size` without reading EOF still never gets unverified bytes.
            if self._size is not None and self._hasher.size >= self._size and not self._checked:
                self._check()
        elif not self._checked:
            self._check()
        return n or 0

    def _check(self) -> None:
        self._checked = True
        if self._size is not None and self._hasher.size != self._size:
            raise SizeMismatch(
                f"blob {self._digest} at {self._location}: read {self._hasher.size} bytes,"
                f" expected {self._size}"
            )
        actual = self._hasher.digest()
        if actual != self._digest:
            raise BlobCorrupted(self._digest, actual, self._location)

    def read_all(self) -> bytes:
        """Read everything (verified)."""
        return read_all(self, CHUNK_SIZE)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()
