"""The blob backend interface and the verifying reader every backend returns."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

from artifacts.digest import CHUNK_SIZE, Digest, Hasher
from artifacts.errors import BlobCorrupted, SizeMismatch


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob's identity and size."""

    digest: Digest
    size: int


@dataclass(frozen=True)
class PutResult:
    """What a put stored: the digest, the size, and whether the blob was new."""

    digest: Digest
    size: int
    created: bool


@runtime_checkable
class BlobBackend(Protocol):
    """Where blob bytes live. Contract:

    - `put` hashes while it writes and makes the blob visible atomically (whole or not at
      all); if `expected` is given and the content does not match, nothing is stored.
    - `open` returns a reader that verifies the content against the digest when it reaches
      the end (BlobCorrupted names the digest and location); `BlobNotFound` if absent.
    - `iter_blobs` lists only complete blobs.
    """

    url: str

    def has(self, digest: Digest) -> bool: ...

    def stat(self, digest: Digest) -> BlobInfo | None: ...

    def open(self, digest: Digest) -> IO[bytes]: ...

    def put(self, stream: IO[bytes], expected: Digest | None = None) -> PutResult: ...

    def delete(self, digest: Digest) -> bool: ...

    def iter_blobs(self) -> Iterator[BlobInfo]: ...

    def location(self, digest: Digest) -> str: ...


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
        chunks = []
        while True:
            chunk = self.read(CHUNK_SIZE)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()
