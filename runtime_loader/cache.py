"""The host's local cache: content-addressed like the store, shared by every model.

`<cache>/blobs/sha256/ab/<rest>` holds verified blobs (written atomically); `<cache>/refs/`
remembers which manifest a `name:tag` resolved to at the last online load, for offline use.
A blob's mtime is touched when a model uses it, so pruning removes least recently used first.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from artifacts.backends.local import LocalBlobBackend
from artifacts.config import CACHE_ENV, user_cache_dir
from artifacts.digest import Digest
from artifacts.diskspace import is_disk_full
from artifacts.errors import BlobCorrupted, BlobNotFound, InvalidReference, SizeMismatch
from artifacts.fsio import write_atomic
from artifacts.refs import DEFAULT_TAG, parse_tag_name
from runtime_loader.errors import CacheFull, LoaderError

CHUNK = 8 << 20

log = logging.getLogger("kiln")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir() / "loader")


@dataclass(frozen=True)
class CachedBlob:
    digest: str
    size: int
    last_used: float


class LocalCache:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()
        self.backend = LocalBlobBackend(self.root)
        self.refs = self.root / "refs"
        self._warned = False

    def has(self, digest: Digest) -> bool:
        return self.backend.has(digest)

    def read(self, digest: Digest) -> bytes:
        """Verified bytes of a cached blob (BlobCorrupted / BlobNotFound otherwise)."""
        with self.backend.open(digest) as reader:
            data = reader.read_all()  # type: ignore[attr-defined]
        self.touch(digest)
        return data

    def map(self, digest: Digest) -> mmap.mmap:
        """A cached blob memory-mapped copy-on-write (writable, as DLPack needs; writes never
        reach the file). It is verified by one pass of plain reads (which, unlike reading
        through the map, leaves nothing resident), unless its verification record says this
        very file (same inode, size, mtime and ctime) was hashed already: the blob a pull
        just wrote, or a warm load's. BlobCorrupted / BlobNotFound otherwise."""
        try:
            f = open(self.backend.path_of(digest), "rb")
        except FileNotFoundError:
            self._verify(digest)  # raises the backend's BlobNotFound
            raise
        with f:
            if not self.is_recorded_verified(digest, os.fstat(f.fileno())):
                self._verify(digest)
            if os.fstat(f.fileno()).st_size == 0:
                mapped = mmap.mmap(-1, 1)
            else:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            try:
                os.utime(f.fileno())
            except OSError:
                pass
            self._record_verified(digest, os.fstat(f.fileno()))
        return mapped

    def _verify(self, digest: Digest) -> None:
        with self.backend.open(digest) as reader:
            buffer = bytearray(CHUNK)
            while reader.readinto(buffer):  # type: ignore[attr-defined]
                pass

    def _verified_path(self, digest: Digest) -> Path:
        return self.root / "verified" / digest.algorithm / digest.hex

    @staticmethod
    def _identity(st: os.stat_result) -> list[int]:
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def is_recorded_verified(self, digest: Digest, st: os.stat_result) -> bool:
        try:
            recorded = json.loads(self._verified_path(digest).read_text())
        except (OSError, ValueError):
            return False
        return recorded == self._identity(st)

    def mark_verified(self, digest: Digest) -> None:
        """Record that the cached file of `digest`, as it is now, hashed to it (a pull calls
        this after its verified write, so the first load does not hash it again)."""
        try:
            st = os.stat(self.backend.path_of(digest))
        except OSError:
            return
        self._record_verified(digest, st)

    def _record_verified(self, digest: Digest, st: os.stat_result) -> None:
        """Best effort: a cache this process cannot write just verifies on every load; a
        record torn by a crash does not parse, so it verifies again."""
        path = self._verified_path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = json.dumps(self._identity(st)).encode()
            write_atomic(path, record, suffix=".tmp", durable=False)
        except OSError:
            pass

    def touch(self, digest: Digest) -> None:
        try:
            os.utime(self.backend.path_of(digest))
        except OSError:
            pass

    def discard(self, digest: Digest) -> None:
        self._verified_path(digest).unlink(missing_ok=True)
        self.backend.delete(digest)

    def record_ref(self, ref: str, digest: Digest, store: str) -> bool:
        """Remember where `ref` resolved, for offline loads. A cache this process cannot
        write (a read-only mount, a shared cache owned by another user) still serves loads:
        the ref is then not recorded, with one warning per cache, and False is returned."""
        path = self._ref_path(ref)
        record = json.dumps({"digest": str(digest), "store": store, "at": time.time()})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, record.encode(), suffix=".tmp")
        except OSError as exc:
            if is_disk_full(exc):
                raise CacheFull(
                    f"the cache {self.root} ran out of space recording {ref} -> {digest}:"
                    " make room (kiln cache prune --max-size SIZE) or use a larger disk"
                ) from None
            if not self._warned:
                self._warned = True
                log.warning(
                    "kiln: warning: cannot record %s in the cache %s (%s); loads work, but"
                    " an offline load will not know this tag",
                    ref,
                    self.root,
                    exc.strerror or exc,
                )
            return False
        return True

    def lookup_ref(self, ref: str) -> Digest | None:
        try:
            return Digest.parse(json.loads(self._ref_path(ref).read_text())["digest"])
        except (OSError, ValueError, KeyError):
            return None

    def _ref_path(self, ref: str) -> Path:
        """`refs/<name>/<tag>`; the name grammar keeps it inside `refs/`, and this checks."""
        parsed = parse_tag_name(ref if ":" in ref else f"{ref}:{DEFAULT_TAG}")
        refs = Path(os.path.abspath(self.refs))
        path = Path(os.path.abspath(refs / parsed.name / parsed.tag))
        if path.parent == refs or refs not in path.parents:
            raise InvalidReference(f"reference {ref!r} maps outside the cache's refs folder")
        return path

    def blobs(self) -> list[CachedBlob]:
        return [
            CachedBlob(str(info.digest), info.size, info.modified_at)
            for info in self.backend.iter_blobs()
        ]

    def prune(self, max_bytes: int, dry_run: bool = False) -> list[CachedBlob]:
        """Delete least recently used blobs until the cache holds at most `max_bytes`."""
        blobs = sorted(self.blobs(), key=lambda b: b.last_used)
        total = sum(b.size for b in blobs)
        removed = []
        for blob in blobs:
            if total <= max_bytes:
                break
            if not dry_run:
                self.discard(Digest.parse(blob.digest))
            total -= blob.size
            removed.append(blob)
        self.backend.clean_temp()
        return removed


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, (BlobCorrupted, SizeMismatch))


__all__ = ["BlobNotFound", "LocalCache", "LoaderError", "default_cache_dir", "is_corruption"]
