"""Waiting for SQLite's write lock out loud: who holds it, how long the wait may last.

SQLite's own busy wait is silent and ends in a bare "database is locked". Here BEGIN
IMMEDIATE is retried in short busy waits, a notice goes to stderr once the wait is noticeable
(then periodically), and the final error names the lock, its holder and a remedy.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.config import env_seconds
from artifacts.errors import IndexLocked, StoreIndexError

TIMEOUT_ENV = "KILN_INDEX_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
FIRST_NOTICE_S = 2.0
NOTICE_EVERY_S = 30.0
WAL_WRITE_LOCK_BYTE = 120  # in the -shm file: (22 + SQLITE_SHM_NLOCK) * 4
RESERVED_BYTE = 0x40000001  # in the database file (rollback-journal mode)



@dataclass(frozen=True)
class LockHolder:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})" if self.command else f"pid {self.pid}"


def lock_timeout() -> float:
    """Seconds to wait for the index write lock: $KILN_INDEX_LOCK_TIMEOUT, else 120."""
    return env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, error=StoreIndexError)


def write_lock_holder(db_path: Path) -> LockHolder | None:
    """The process holding `db_path`'s write lock, from /proc/locks (Linux), if visible."""
    wal = db_path.with_name(db_path.name + "-shm")
    target, byte = (wal, WAL_WRITE_LOCK_BYTE) if wal.exists() else (db_path, RESERVED_BYTE)
    try:
        st = target.stat()
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or "->" in fields or fields[1] not in ("POSIX", "OFDLCK"):
            continue
        _, _, _, access, pid, where, start, end = fields[:8]
        if access != "WRITE" or where != ident or not pid.isdigit() or pid == "0":
            continue
        if int(start) <= byte and (end == "EOF" or byte <= int(end)):
            return LockHolder(int(pid), _command(int(pid)))
    return None


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if len(words) >= 3 and words[1:3] == ["-m", "kiln"]:
        words = ["kiln", *words[3:]]
    return " ".join(" ".join(words).split())[:120]  # one line, whatever the argv holds


def _is_locked(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "database is locked" in text or "database table is locked" in text


def begin_immediate(conn: Any, db_path: Path, busy_timeout_s: float) -> None:
    """BEGIN IMMEDIATE on a SQLAlchemy connection to SQLite, waiting out loud for the lock.

    The connection's busy timeout is `busy_timeout_s` outside this call and is restored."""
    timeout = lock_timeout()
    start = time.monotonic()
    deadline = start + timeout
    next_notice = start + FIRST_NOTICE_S
    step = min(FIRST_NOTICE_S, timeout)
    try:
        while True:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={int(step * 1000)}")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except Exception as exc:  # sqlalchemy OperationalError; the driver's is wrapped
                now = time.monotonic()
                if not _is_locked(exc):
                    raise
                holder = write_lock_holder(db_path)
                if now >= deadline:
                    by = f" by {holder}" if holder else " by another process"
                    raise IndexLocked(
                        f"index {db_path}: the write lock is still held{by} after"
                        f" {timeout:.0f}s; wait for that process to finish (or stop it) and"
                        f" retry, or wait longer with {TIMEOUT_ENV}=SECONDS"
                    ) from None
                if now >= next_notice:
                    by = f" held by {holder}" if holder else ""
                    sys.stderr.write(
                        f"kiln: waiting for the write lock on index {db_path}{by};"
                        f" giving up in {deadline - now:.0f}s\n"
                    )
                    sys.stderr.flush()
                    next_notice = now + NOTICE_EVERY_S
                step = max(0.05, min(NOTICE_EVERY_S, next_notice - now, deadline - now))
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
