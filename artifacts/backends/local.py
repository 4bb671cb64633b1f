"""Local filesystem blob backend: `<root>/blobs/sha256/ab/<rest>`, atomic and verified."""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from artifacts.backends.base import (
    BLOB_DIR,
    REFS_DIR,
    TEMP_AGE_S,
    TEMP_DIR,
    BlobBackend,
    BlobInfo,
    PutResult,
    VerifyingReader,
    blob_key,
    digest_at,
)
from artifacts.digest import CHUNK_SIZE, Digest, Hasher
from artifacts.diskspace import is_disk_full
from artifacts.errors import BlobCorrupted, BlobNotFound, NoSpace, StoreConfigError
from artifacts.fsio import TEMP_SUFFIX, AtomicFile, fsync_dir, iter_chunks, write_all, write_atomic


class LocalBlobBackend(BlobBackend):
    """Blobs as files. Writes go to `tmp/` in the same filesystem, are fsynced and renamed."""

    def __init__(self, root: Path | str, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self.blob_root = self.root / BLOB_DIR
        self.tmp_root = self.root / TEMP_DIR
        self.ref_root = self.root / REFS_DIR
        if create:
            try:
                self.blob_root.mkdir(parents=True, exist_ok=True)
                self.tmp_root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreConfigError(
                    f"cannot create store at {self.root}: {exc.strerror}"
                ) from exc
        if not self.root.is_dir():
            raise StoreConfigError(f"store folder {self.root} does not exist")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreConfigError(f"store folder {self.root} is not readable")

    def path_of(self, digest: Digest) -> Path:
        return self.root / blob_key(digest)

    def location(self, digest: Digest) -> str:
        return str(self.path_of(digest))

    def has(self, digest: Digest) -> bool:
        return self.path_of(digest).is_file()

    def stat(self, digest: Digest) -> BlobInfo | None:
        try:
            st = self.path_of(digest).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(digest, st.st_size, st.st_mtime)

    def open(self, digest: Digest) -> IO[bytes]:
        path = self.path_of(digest)
        try:
            raw = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise BlobNotFound(digest, self.url) from None
        size = os.fstat(raw.fileno()).st_size
        return VerifyingReader(raw, digest, str(path), size)  # type: ignore[return-value]

    def put(self, stream: IO[bytes], expected: Digest | None = None) -> PutResult:
        if expected is not None and self.has(expected):
            # Same digest, same bytes: nothing to read. (A corrupted copy is repaired by a
            # put without `expected`, or by deleting it first.)
            return PutResult(expected, self.path_of(expected).stat().st_size, False)
        try:
            return self._put(stream, expected)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise NoSpace(
                f"cannot write to {self.root}: no space left on device; the blob being"
                " written was discarded (free space and rerun)"
            ) from None

    def _put(self, stream: IO[bytes], expected: Digest | None) -> PutResult:
        # A reader that already verifies `expected` raises before EOF on other bytes: hash once.
        trusted = expected is not None and getattr(stream, "verifies", None) == expected
        hasher = Hasher()
        size = 0
        with AtomicFile(self.tmp_root, mode=0o444) as tmp:
            for chunk in iter_chunks(stream, CHUNK_SIZE):
                if not trusted:
                    hasher.update(chunk)
                size += len(chunk)
                write_all(tmp.file, chunk)
            digest = expected if trusted and expected is not None else hasher.digest()
            if expected is not None and digest != expected:
                raise BlobCorrupted(expected, digest, "<upload stream>")
            final = self.path_of(digest)
            created = not final.exists()
            # Even when the blob exists, the verified bytes replace it: that repairs a
            # corrupted copy, and an atomic replace by identical bytes is harmless.
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                fsync_dir(final.parent.parent)
            tmp.commit(final)
        return PutResult(digest, size, created)

    def link_from(self, source: Path, expected: Digest) -> PutResult | None:
        """Add the blob file `source` of another local store as a hard link, verified,
        without copying its bytes (as `git clone` of a local path links its objects).
        Blob files are never written in place (only replaced by a rename), so the two
        stores cannot see each other's writes. The link's own inode is what is hashed, so
        a file replaced at `source` meanwhile changes nothing. None when it cannot be
        linked (another filesystem, no permission, not a regular file): copy it instead."""
        if self.has(expected):
            return PutResult(expected, self.path_of(expected).stat().st_size, False)
        try:
            if not stat.S_ISREG(os.stat(source).st_mode):
                return None
            self.tmp_root.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp_root / f"link-{uuid.uuid4().hex}{TEMP_SUFFIX}"
            os.link(source, tmp)
        except OSError:
            return None
        try:
            hasher = Hasher()
            with open(tmp, "rb", buffering=0) as f:
                for chunk in iter_chunks(f, CHUNK_SIZE):
                    hasher.update(chunk)
            if hasher.digest() != expected:
                raise BlobCorrupted(expected, hasher.digest(), str(source))
            final = self.path_of(expected)
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                fsync_dir(final.parent.parent)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # another process's clean_temp took the old-dated link
                return None
            fsync_dir(final.parent)
            return PutResult(expected, hasher.size, True)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, digest: Digest) -> bool:
        try:
            self.path_of(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_blobs(self) -> Iterator[BlobInfo]:
        if not self.blob_root.is_dir():
            return
        with os.scandir(self.blob_root) as shards:
            for shard in sorted(shards, key=lambda e: e.name):
                if len(shard.name) != 2 or not shard.is_dir():
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in sorted(entries, key=lambda e: e.name):
                        digest = digest_at(shard.name, entry.name)
                        if digest is None:
                            continue
                        try:
                            st = entry.stat()
                        except FileNotFoundError:
                            continue  # deleted since the folder was read
                        yield BlobInfo(digest, st.st_size, st.st_mtime)

    def clean_temp(self, older_than_seconds: float = TEMP_AGE_S) -> int:
        """Remove abandoned temp files (from killed writers); returns how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for entry in os.scandir(self.tmp_root):
            if entry.name.endswith(TEMP_SUFFIX) and entry.stat().st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed

    # -- ref objects: small named files beside the blobs (artifacts/tagrefs.py) -----------
    def ref_location(self, key: str) -> str:
        return str(self.ref_root / key)

    def read_ref(self, key: str) -> bytes | None:
        """The bytes of ref object `key` (`name/tag`), or None if there is none."""
        try:
            return (self.ref_root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_ref(self, key: str, data: bytes) -> None:
        """Replace ref object `key` atomically: temp file, fsync, rename, fsync the folder.
        A reader sees the old bytes or the new, never a mix."""
        final = self.ref_root / key
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        write_atomic(final, data, tmp_dir=self.tmp_root)

    def delete_ref(self, key: str) -> bool:
        try:
            (self.ref_root / key).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_refs(self, prefix: str = "") -> Iterator[str]:
        """Keys of the ref objects whose key starts with `prefix` (a `name/` lists one name)."""
        start = self.ref_root / prefix.rpartition("/")[0] if "/" in prefix else self.ref_root
        if not start.is_dir():
            return
        for folder, dirs, files in os.walk(start):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                if file.startswith("."):
                    continue
                key = str(Path(folder, file).relative_to(self.ref_root))
                if key.startswith(prefix):
                    yield key
