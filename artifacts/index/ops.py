"""Every write to the index tables (portable over SQLite and PostgreSQL). Callers hold the
transaction (artifacts/index/db.py `write_transaction`): the Store for one write, reindex for
a whole rebuild."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, Table, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from artifacts.digest import Digest, canonical_json
from artifacts.index.models import (
    Base,
    BlobRow,
    CompilationRow,
    ManifestBlobRow,
    ManifestRow,
    RecipeRow,
    RunItemRow,
    RunRow,
    TagHistoryRow,
    TagRow,
    WeightsRow,
)
from artifacts.manifest import WEIGHTS_KEY_ANNOTATION, BlobRef, Release
from artifacts.records import RunRecord, RunStatus, TagEvent
from artifacts.weights_set import weights_set_digest


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


def record_recipes(
    conn: Connection, release: Release, weights_set: BlobRef | None = None
) -> None:
    """What a release proves: each graph's direct key -> HLO, and its weights key (for
    several weight blobs, the stored weights-set record `weights_set`)."""
    for graph in release.graphs:
        if graph.direct_key:
            record_recipe(
                conn, graph.direct_key, graph.hlo_key, str(graph.hlo.digest), graph.signature
            )
    key = release.annotations.get(WEIGHTS_KEY_ANNOTATION)
    if key and len(release.source.weights) == 1:
        weights = release.source.weights[0]
        record_weights(conn, key, str(weights.digest), weights.size)
    if key and weights_set is not None:
        record_weights(conn, key, str(weights_set.digest), weights_set.size)


def _stored_weights_set(conn: Connection, release: Release) -> BlobRef | None:
    """The weights-set record of a release whose weights are several blobs, if the index
    holds it: a release references it, so gc keeps it while the release lives, and reindex
    (which indexes every blob before any release) ties it to the release again."""
    digest = weights_set_digest(release)
    if digest is None:
        return None
    size = conn.execute(select(BlobRow.size).where(BlobRow.digest == str(digest))).scalar()
    return None if size is None else BlobRef(digest, int(size))


def index_release(conn: Connection, digest: Digest, size: int, release: Release) -> None:
    """Index a stored release manifest: its blobs (refreshing their age), row and recipes."""
    record_blob(conn, str(digest), size, "release")
    for _, ref in release.blob_refs():
        record_blob(conn, str(ref.digest), ref.size, None)
    insert_ignore(
        conn,
        ManifestRow.__table__,  # type: ignore[arg-type]
        [
            {
                "digest": str(digest),
                "name": release.name,
                "target": release.target,
                "task": release.source.task,
                "graph_count": len(release.graphs),
                "total_size": release.total_size + size,
                "created": release.provenance.created,
                "indexed_at": time.time(),
            }
        ],
    )
    roles: dict[str, str] = {}
    for role, ref in release.blob_refs():
        roles.setdefault(str(ref.digest), role)
    weights_set = _stored_weights_set(conn, release)
    record_recipes(conn, release, weights_set)
    if weights_set is not None:
        roles.setdefault(str(weights_set.digest), "weights-set")
    insert_ignore(
        conn,
        ManifestBlobRow.__table__,  # type: ignore[arg-type]
        [{"manifest_digest": str(digest), "blob_digest": d, "role": r} for d, r in roles.items()],
    )


def apply_tag_event(conn: Connection, event: TagEvent, event_digest: str) -> None:
    """Append the event to history and move the tag (used by tagging and by reindex)."""
    insert_ignore(
        conn,
        TagHistoryRow.__table__,  # type: ignore[arg-type]
        [
            {
                "name": event.name,
                "tag": event.tag,
                "digest": event.digest,
                "previous_digest": event.previous,
                "at": event.at,
                "user": event.user,
                "host": event.host,
                "reason": event.reason,
                "event_digest": event_digest,
            }
        ],
    )
    table = TagRow.__table__
    updated = conn.execute(
        table.update()  # type: ignore[attr-defined]
        .where(table.c.name == event.name, table.c.tag == event.tag)
        .values(digest=event.digest, updated_at=event.at)
    )
    if updated.rowcount == 0:
        conn.execute(
            table.insert(),  # type: ignore[attr-defined]
            {"name": event.name, "tag": event.tag, "digest": event.digest, "updated_at": event.at},
        )


def index_compilation(conn: Connection, record_digest: str, value: dict[str, Any]) -> None:
    """Index a compilation record document (CompilationRecord.to_json())."""
    columns = {c.name for c in CompilationRow.__table__.columns} - {"id", "record_digest"}
    row = {k: value.get(k) for k in columns}
    row["flags"] = json.dumps(value.get("flags", []))
    if isinstance(row.get("provenance"), dict):
        row["provenance"] = json.dumps(row["provenance"])
    row["record_digest"] = record_digest
    insert_ignore(conn, CompilationRow.__table__, [row])  # type: ignore[arg-type]
    recipe = value.get("recipe")
    if isinstance(recipe, dict) and recipe.get("direct_key"):
        insert_ignore(
            conn,
            RecipeRow.__table__,  # type: ignore[arg-type]
            [
                {
                    "direct_key": recipe["direct_key"],
                    "hlo_key": value["hlo_key"],
                    "hlo_digest": value["hlo_digest"],
                    "signature": json.dumps(recipe.get("signature", {}), sort_keys=True),
                    "created_at": value.get("created_at", 0.0),
                }
            ],
        )


def index_run(conn: Connection, record_digest: str, value: dict[str, Any]) -> None:
    """Index a run record document (RunRecord.to_json()), replacing its `running` row."""
    insert_ignore(
        conn,
        RunRow.__table__,  # type: ignore[arg-type]
        [
            {
                "id": value["id"],
                "started_at": value["started_at"],
                "finished_at": value.get("finished_at"),
                "status": str(value["status"]),
                "spec_digest": value.get("spec_digest"),
                "host": value.get("host", ""),
                "user": value.get("user", ""),
                "summary": json.dumps(value.get("summary", {}), sort_keys=True),
                "record_digest": record_digest,
            }
        ],
    )
    items = value.get("items", [])
    if items:
        columns = {c.name for c in RunItemRow.__table__.columns} - {"id"}
        conn.execute(
            RunItemRow.__table__.insert(),  # type: ignore[attr-defined]
            [{k: item.get(k) for k in columns} | {"run_id": value["id"]} for item in items],
        )


def delete_run(conn: Connection, run_id: str) -> None:
    conn.execute(RunRow.__table__.delete().where(RunRow.id == run_id))  # type: ignore[attr-defined]


def insert_running_run(conn: Connection, run: RunRecord) -> None:
    """The row of a run that has started (its record replaces it at the end)."""
    conn.execute(
        RunRow.__table__.insert(),
        {  # type: ignore[attr-defined]
            "id": run.id,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "status": run.status.value,
            "spec_digest": run.spec_digest,
            "host": run.host,
            "user": run.user,
            "summary": json.dumps(run.summary),
            "record_digest": None,
        },
    )


def mark_dead_runs_interrupted(conn: Connection, host: str, alive: Callable[[int], bool]) -> None:
    """Runs of `host` still `running` whose process is gone (SIGKILL, or the disk was too
    full to record the end) become `interrupted`."""
    rows = conn.execute(
        select(RunRow.id, RunRow.summary).where(
            RunRow.status == RunStatus.RUNNING.value, RunRow.host == host
        )
    ).all()
    for run_id, summary in rows:
        try:
            pid = json.loads(summary or "{}").get("pid")
        except (ValueError, AttributeError):
            continue
        if isinstance(pid, int) and not alive(pid):
            conn.execute(
                update(RunRow)
                .where(RunRow.id == run_id)
                .values(status=RunStatus.INTERRUPTED.value)
            )


def mark_run_interrupted(
    conn: Connection, run_id: str, finished_at: float, summary: dict[str, Any]
) -> None:
    conn.execute(
        update(RunRow)
        .where(RunRow.id == run_id)
        .values(
            status=RunStatus.INTERRUPTED.value, finished_at=finished_at, summary=json.dumps(summary)
        )
    )


def clear_all(conn: Connection) -> None:
    """Empty every table (reindex refills them in the same transaction)."""
    for table in reversed(Base.metadata.sorted_tables):
        conn.execute(delete(table))
