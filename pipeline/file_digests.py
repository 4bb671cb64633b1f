"""A persistent record of source files' digests, so an unchanged file is not read again.

Keyed by what changes when a file does: (path, size, mtime_ns, inode), as git's index and
DVC's state database do. A touched file with the same bytes is hashed once more and its new
stat recorded; changed bytes give a new digest. The record lives in one small SQLite file
(WAL; every write its own transaction, INSERT OR REPLACE), so many processes can share it;
when it cannot be opened or written, files are simply hashed.

A file modified within `_RACY_NS` of being hashed is not recorded (git's "racily clean"
problem: a second write in the same mtime tick would keep size and mtime).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from artifacts.config import user_cache_dir

DIGESTS_ENV = "KILN_FILE_DIGESTS"
_RACY_NS = 2_000_000_000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS file_digests ("
    " path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
    " inode INTEGER NOT NULL, digest TEXT NOT NULL)"
)


def default_path() -> Path:
    return Path(os.environ.get(DIGESTS_ENV) or user_cache_dir() / "file-digests.db")


def hash_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


class FileDigests:
    """sha256 digests of files, remembered across processes by (path, size, mtime, inode)."""

    def __init__(
        self, db_path: Path | None = None, hasher: Callable[[Path], str] = hash_file
    ) -> None:
        self.db_path = db_path or default_path()
        self.hasher = hasher
        self._conn: sqlite3.Connection | None = None
        self._broken = False

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                self._conn = conn
            except (OSError, sqlite3.Error):
                self._broken = True
        return self._conn

    def digest(self, path: Path) -> str:
        """The file's digest: recorded if its stat is unchanged, else hashed (and recorded)."""
        key = str(Path(path).absolute())
        st = os.stat(key)
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        conn = self._connect()
        if conn is not None:
            try:
                row = conn.execute(
                    "SELECT size, mtime_ns, inode, digest FROM file_digests WHERE path = ?",
                    (key,),
                ).fetchone()
            except sqlite3.Error:
                row = None
            if row is not None and tuple(row[:3]) == stat:
                return str(row[3])
        started = time.time_ns()
        digest = self.hasher(Path(key))
        after = os.stat(key)
        unchanged = (after.st_size, after.st_mtime_ns, after.st_ino) == stat
        if conn is not None and unchanged and started - st.st_mtime_ns > _RACY_NS:
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO file_digests VALUES (?, ?, ?, ?, ?)",
                    (key, *stat, digest),
                )
            except sqlite3.Error:
                pass
        return digest

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_shared: FileDigests | None = None


def file_digest(path: Path) -> str:
    """The digest of `path` through the process-wide record (at $KILN_FILE_DIGESTS or the
    user's cache dir)."""
    global _shared  # noqa: PLW0603
    if _shared is None or _shared.db_path != default_path():
        _shared = FileDigests()
    return _shared.digest(path)
