"""Local filesystem blob backend: `<root>/blobs/sha256/ab/<rest>`, atomic and verified."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from artifacts.backends.base import BlobInfo, PutResult, VerifyingReader
from artifacts.digest import ALGORITHM, CHUNK_SIZE, Digest, Hasher
from artifacts.errors import (
    BlobCorrupted,
    BlobNotFound,
    InvalidDigest,
    NoSpace,
    StoreConfigError,
)

TEMP_SUFFIX = ".incomplete"
REFS_DIR = "refs"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobBackend:
    """Blobs as files. Writes go to `tmp/` in the same filesystem, are fsynced and renamed."""

    def __init__(self, root: Path | str, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self.blob_root = self.root / "blobs" / ALGORITHM
        self.tmp_root = self.root / "tmp"
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
        return self.blob_root / digest.hex[:2] / digest.hex[2:]

    def location(self, digest: Digest) -> str:
        return str(self.path_of(digest))

    def has(self, digest: Digest) -> bool:
        return self.path_of(digest).is_file()

    def stat(self, digest: Digest) -> BlobInfo | None:
        try:
            return BlobInfo(digest, self.path_of(digest).stat().st_size)
        except FileNotFoundError:
            return None

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
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
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
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_root, suffix=TEMP_SUFFIX)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                buffer = bytearray(CHUNK_SIZE)
                view = memoryview(buffer)
                readinto = getattr(stream, "readinto", None)
                while True:
                    if readinto is not None:
                        n = readinto(view)
                        if not n:
                            break
                        chunk = view[:n]
                    else:
                        data = stream.read(CHUNK_SIZE)
                        if not data:
                            break
                        chunk = memoryview(data)
                    if not trusted:
                        hasher.update(chunk)
                    size += len(chunk)
                    _write_all(out, chunk)
                os.fsync(out.fileno())
            digest = expected if trusted and expected is not None else hasher.digest()
            if expected is not None and digest != expected:
                raise BlobCorrupted(expected, digest, "<upload stream>")
            final = self.path_of(digest)
            created = not final.exists()
            # Even when the blob exists, the verified bytes replace it: that repairs a
            # corrupted copy, and an atomic replace by identical bytes is harmless.
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                _fsync_dir(final.parent.parent)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return PutResult(digest, size, created)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
                        try:
                            digest = Digest.parse(f"{ALGORITHM}:{shard.name}{entry.name}")
                        except InvalidDigest:
                            continue
                        yield BlobInfo(digest, entry.stat().st_size)

    def clean_temp(self, older_than_seconds: float = 3600.0) -> int:
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
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_root, suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

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

def _write_all(out: IO[bytes], chunk: memoryview) -> None:
    """An unbuffered write may be short (a disk that is nearly full takes what fits and
    says so only in the count): write the rest, so that a full disk raises ENOSPC instead of
    leaving a blob whose bytes are not the ones hashed."""
    while chunk:
        written = out.write(chunk)
        chunk = chunk[written:]
