"""Portable write helpers over the index tables."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Table, text
from sqlalchemy.dialects import postgresql, sqlite

from artifacts.index.models import BlobRow


def insert_ignore(conn: Connection, table: Table, rows: Iterable[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
    rows = list(rows)
    if not rows:
        return
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def record_blob(conn: Connection, digest: str, size: int, kind: str | None) -> None:
    insert_ignore(
        conn,
        BlobRow.__table__,  # type: ignore[arg-type]
        [{"digest": digest, "size": size, "kind": kind, "created_at": time.time()}],
    )


def lock_key(conn: Connection, key: str) -> None:
    """Serialise writers of one key: SQLite already holds the write lock (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})
