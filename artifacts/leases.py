"""Leases: one worker at a time works on a key (e.g. compiling one HLO key) across processes
and machines sharing an index. A lease is a row with an owner and an expiry; its holder
heartbeats it, so a crashed holder's lease expires and another worker takes it over.

Every change runs in one write transaction that serialises the key's writers: SQLite's
BEGIN IMMEDIATE (`write_transaction`), PostgreSQL's transaction-level advisory lock. Times
come from the database's clock on PostgreSQL (one clock for a whole farm) and from this
machine's on SQLite (whose writers share a machine).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, Engine, delete, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from artifacts.config import env_seconds
from artifacts.errors import StoreIndexError
from artifacts.index import ops
from artifacts.index.db import write_transaction
from artifacts.index.models import LeaseRow
from artifacts.store import Store

TTL_ENV = "KILN_LEASE_TTL"
DEFAULT_TTL_S = 60.0
POLL_S = 0.5
NOTICE_EVERY_S = 15.0

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseInfo:
    """A lease row as read, with the database's time of reading."""

    key: str
    owner: str
    expires_at: float
    heartbeat_at: float
    acquired_at: float
    now: float

    @property
    def live(self) -> bool:
        return self.expires_at > self.now


def lease_ttl() -> float:
    """The lease time-to-live in seconds: $KILN_LEASE_TTL, else 60."""
    return env_seconds(TTL_ENV, DEFAULT_TTL_S, positive=True)


def new_owner() -> str:
    """A unique owner name that says where the holder runs: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _engine(store: Store | Engine) -> Engine:
    return store.engine if isinstance(store, Store) else store


def _now(conn: Connection) -> float:
    if conn.dialect.name == "postgresql":
        return float(
            conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one()
        )
    return time.time()


def _read(conn: Connection, key: str) -> LeaseInfo | None:
    row = conn.execute(select(LeaseRow.__table__).where(LeaseRow.key == key)).first()  # type: ignore[arg-type]
    if row is None:
        return None
    return LeaseInfo(
        row.key, row.owner, row.expires_at, row.heartbeat_at, row.acquired_at, _now(conn)
    )


def holder(store: Store | Engine, key: str) -> LeaseInfo | None:
    """The lease on `key` (live or expired), or None."""
    with _engine(store).connect() as conn:
        return _read(conn, key)


def acquire(store: Store | Engine, key: str, owner: str, ttl: float) -> bool:
    """Take `key` for `owner` for `ttl` seconds: when free, expired, or already `owner`'s.

    False while another owner's lease is live. A read first spares the write lock then.
    """
    engine = _engine(store)
    current = holder(engine, key)
    if current is not None and current.live and current.owner != owner:
        if not _stale(engine, current):
            return False
    with write_transaction(engine) as conn:
        ops.lock_key(conn, f"lease:{key}")
        current = _read(conn, key)
        now = _now(conn)
        values = {"owner": owner, "expires_at": now + ttl, "heartbeat_at": now}
        if current is None:
            conn.execute(
                LeaseRow.__table__.insert(),  # type: ignore[attr-defined]
                {"key": key, "acquired_at": now, **values},
            )
            return True
        if current.owner != owner and current.expires_at > now and not _stale(engine, current):
            return False
        if current.owner != owner:
            values["acquired_at"] = now
            log.info("lease %s: %s takes over from %s (expired)", key, owner, current.owner)
        conn.execute(update(LeaseRow).where(LeaseRow.key == key).values(**values))
        return True


def heartbeat(store: Store | Engine, key: str, owner: str, ttl: float) -> bool:
    """Extend `owner`'s lease by `ttl` from now; False if another owner has taken it."""
    with write_transaction(_engine(store)) as conn:
        ops.lock_key(conn, f"lease:{key}")
        now = _now(conn)
        result = conn.execute(
            update(LeaseRow)
            .where(LeaseRow.key == key, LeaseRow.owner == owner)
            .values(expires_at=now + ttl, heartbeat_at=now)
        )
        return result.rowcount == 1


def release(store: Store | Engine, key: str, owner: str) -> bool:
    """Give the lease back (only `owner`'s: a lease taken over is left alone)."""
    with write_transaction(_engine(store)) as conn:
        ops.lock_key(conn, f"lease:{key}")
        result = conn.execute(delete(LeaseRow).where(LeaseRow.key == key, LeaseRow.owner == owner))
        return result.rowcount == 1


class KeptLease:
    """Context manager: heartbeat an acquired lease from a background thread every
    `interval` seconds (ttl/3 by default); release it on exit. `lost` is set if another
    owner took it over meanwhile (our heartbeats stopped for longer than the ttl)."""

    def __init__(
        self,
        store: Store | Engine,
        key: str,
        owner: str,
        ttl: float,
        interval: float | None = None,
    ) -> None:
        self.engine = _engine(store)
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self.interval = interval if interval is not None else ttl / 3
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {key}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                alive = heartbeat(self.engine, self.key, self.owner, self.ttl)
            except (SQLAlchemyError, StoreIndexError) as exc:  # the next beat may get through
                log.warning("lease %s: heartbeat failed: %s", self.key, exc)
                continue
            if not alive:
                log.warning("lease %s: taken over from %s", self.key, self.owner)
                self.lost.set()
                return

    def __enter__(self) -> KeptLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            release(self.engine, self.key, self.owner)
        except (SQLAlchemyError, StoreIndexError) as error:  # it expires on its own
            log.warning("lease %s: release failed: %s", self.key, error)


def keep(
    store: Store | Engine, key: str, owner: str, ttl: float, interval: float | None = None
) -> KeptLease:
    """Keep an acquired lease alive while the `with` block runs; release it afterwards."""
    return KeptLease(store, key, owner, ttl, interval)


def describe_wait(key: str, info: LeaseInfo) -> str:
    """One line for a waiter: who holds `key`, since when, and when the lease runs out."""
    host, _, rest = info.owner.partition(":")
    pid = rest.partition(":")[0]
    where = f"pid {pid} on {host}" if pid.isdigit() else info.owner
    dead = f" (pid {pid} is no longer running: the lease is stale)"
    dead = dead if _dead_here(info.owner) else ""
    return (
        f"waiting for lease {key}, held by {where}{dead} for {info.now - info.acquired_at:.0f}s,"
        f" last heartbeat {info.now - info.heartbeat_at:.0f}s ago; it expires in"
        f" {max(0.0, info.expires_at - info.now):.0f}s unless renewed"
    )


def _dead_here(owner: str) -> bool:
    """Whether `owner` (host:pid:random) names a process of this host that has exited."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def _stale(engine: Engine, info: LeaseInfo) -> bool:
    """A live-looking lease whose holder is known dead: on SQLite every holder runs on this
    machine, so a holder pid that has exited (a killed `kiln compile`) frees the lease now
    instead of at its expiry. (On a shared PostgreSQL index pids of other hosts, or of other
    containers with the same host name, prove nothing.)"""
    return engine.dialect.name == "sqlite" and _dead_here(info.owner)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists
        return True
    return True


def print_wait(line: str) -> None:
    sys.stderr.write(f"kiln: {line}\n")
    sys.stderr.flush()


def acquire_or_wait(
    store: Store | Engine,
    key: str,
    owner: str,
    ttl: float,
    ready: Callable[[], T | None],
    poll: float = POLL_S,
    notify: Callable[[str], None] | None = print_wait,
    notify_every: float = NOTICE_EVERY_S,
) -> T | None:
    """Acquire `key` (returns None: the caller holds it now), or, while another live owner
    holds it, poll `ready()` until it returns a result (returned) or the lease is released
    or expires (taken over: returns None).

    While waiting, `notify` gets a line saying who holds the lease and when it expires: once
    at the start, then every `notify_every` seconds."""
    next_notice = time.monotonic()
    while True:
        if acquire(store, key, owner, ttl):
            return None
        result = ready()
        if result is not None:
            return result
        if notify is not None and time.monotonic() >= next_notice:
            current = holder(store, key)
            if current is not None and current.owner != owner:
                notify(describe_wait(key, current))
                next_notice = time.monotonic() + notify_every
        time.sleep(poll * random.uniform(0.8, 1.2))
