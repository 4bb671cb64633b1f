"""Portable write helpers over the index tables."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, text
from sqlalchemy.dialects import postgresql, sqlite

if TYPE_CHECKING:
    from artifacts.manifest import Release

from artifacts.digest import canonical_json
from artifacts.index.models import BlobRow, RecipeRow, WeightsRow

WEIGHTS_KEY_ANNOTATION = "io.kiln.weights_key"


def insert_ignore(conn: Connection, table: Table, rows: Iterable[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
    rows = list(rows)
    if not rows:
        return
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def record_blob(conn: Connection, digest: str, size: int, kind: str | None) -> None:
    """Index a blob, or refresh `touched_at` of one already indexed (gc spares it a while)."""
    now = time.time()
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    statement = dialect.insert(BlobRow.__table__).values(  # type: ignore[arg-type]
        digest=digest, size=size, kind=kind, created_at=now, touched_at=now
    )
    conn.execute(
        statement.on_conflict_do_update(index_elements=["digest"], set_={"touched_at": now})
    )


def lock_key(conn: Connection, key: str) -> None:
    """Serialise writers of one key: SQLite already holds the write lock (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})


def record_recipe(
    conn: Connection, direct_key: str, hlo_key: str, hlo_digest: str, signature: dict[str, Any]
) -> None:
    insert_ignore(
        conn,
        RecipeRow.__table__,
        [
            {  # type: ignore[arg-type]
                "direct_key": direct_key,
                "hlo_key": hlo_key,
                "hlo_digest": hlo_digest,
                "signature": canonical_json(signature).decode(),
                "created_at": time.time(),
            }
        ],
    )


def record_weights(conn: Connection, weights_key: str, digest: str, size: int) -> None:
    insert_ignore(
        conn,
        WeightsRow.__table__,
        [
            {  # type: ignore[arg-type]
                "weights_key": weights_key,
                "digest": digest,
                "size": size,
                "created_at": time.time(),
            }
        ],
    )


def record_recipes(conn: Connection, release: Release) -> None:
    """What a release proves: each graph's direct key -> HLO, and its weights key."""
    for graph in release.graphs:
        if graph.direct_key:
            record_recipe(
                conn, graph.direct_key, graph.hlo_key, str(graph.hlo.digest), graph.signature
            )
    key = release.annotations.get(WEIGHTS_KEY_ANNOTATION)
    if key and len(release.source.weights) == 1:
        weights = release.source.weights[0]
        record_weights(conn, key, str(weights.digest), weights.size)
