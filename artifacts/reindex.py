"""`kiln reindex`: rebuild the SQL index from the blobs alone (the blobs are the truth)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete

from artifacts.backends import BlobBackend
from artifacts.config import default_index_url, resolve_index_url, resolve_store_url
from artifacts.errors import ArtifactError, InvalidManifest
from artifacts.index import ops
from artifacts.index.db import _sqlite_path, ensure_schema, make_engine, write_transaction
from artifacts.index.models import (
    Base,
    CompilationRow,
    RecipeRow,
    RunItemRow,
    RunRow,
)
from artifacts.manifest import Release
from artifacts.records import SNIFF_LIMIT, TagEvent, sniff_document
from artifacts.store import Store, apply_tag_event

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReindexReport:
    blobs: int
    releases: int
    tag_events: int
    tags: int
    compilations: int
    runs: int
    skipped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "blobs": self.blobs,
            "releases": self.releases,
            "tag_events": self.tag_events,
            "tags": self.tags,
            "compilations": self.compilations,
            "runs": self.runs,
            "skipped": list(self.skipped),
        }


def reindex(
    store_url: str | None = None, index_url: str | None = None, progress: Progress | None = None
) -> ReindexReport:
    """Rebuild the index. A SQLite index is built beside the old one and swapped in whole."""
    from artifacts.backends import open_backend  # noqa: PLC0415

    url = resolve_store_url(store_url)
    backend = open_backend(url, create=False)
    index = resolve_index_url(url, index_url)
    path = _sqlite_path(index)
    if path is not None and path != _sqlite_path(default_index_url(url)):
        from artifacts.index.reader import refuse_foreign  # noqa: PLC0415

        refuse_foreign(path)  # a file at Kiln's own default path is Kiln's to rebuild
    if path is not None:
        tmp = path.with_name(f"{path.name}.rebuild-{os.getpid()}")
        _remove_sqlite(tmp)
        engine = make_engine(f"sqlite:///{tmp}")
        try:
            ensure_schema(engine, str(tmp))
            report = _fill(Store(backend, engine, str(tmp)), progress)
        finally:
            engine.dispose()
        _remove_sqlite(path, keep_main=True)
        os.replace(tmp, path)
        _remove_sqlite(tmp)
        return report
    engine = make_engine(index)
    ensure_schema(engine, index)
    try:
        return _fill(Store(backend, engine, index), progress, clear=True)
    finally:
        engine.dispose()


def _remove_sqlite(path: Path, keep_main: bool = False) -> None:
    suffixes = ("-wal", "-shm", "-journal") if keep_main else ("", "-wal", "-shm", "-journal")
    for suffix in suffixes:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fill(store: Store, progress: Progress | None, clear: bool = False) -> ReindexReport:
    backend: BlobBackend = store.backend
    blobs = list(backend.iter_blobs())
    releases: list[tuple[str, int, Release]] = []
    events: list[tuple[str, TagEvent]] = []
    compilations: list[tuple[str, dict[str, Any]]] = []
    runs: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    kinds: dict[str, str | None] = {}
    for i, info in enumerate(blobs):
        digest = str(info.digest)
        kinds[digest] = None
        if info.size <= SNIFF_LIMIT and _starts_with_brace(backend, info.digest):
            try:
                data = store.read_bytes(info.digest)
            except ArtifactError as exc:
                skipped.append(f"{digest}: {exc}")
                continue
            sniffed = sniff_document(data)
            if sniffed is not None:
                kind, value = sniffed
                kinds[digest] = kind
                try:
                    if kind == "release":
                        releases.append((digest, info.size, Release.from_json(value, digest)))
                    elif kind == "tag-event":
                        events.append((digest, TagEvent.from_json(value, digest)))
                    elif kind == "compilation":
                        compilations.append((digest, value))
                    elif kind == "run":
                        runs.append((digest, value))
                except InvalidManifest as exc:
                    skipped.append(f"{digest}: {exc}")
        if progress:
            progress(i + 1, len(blobs))

    events.sort(key=lambda e: (e[1].at, e[0]))
    with write_transaction(store.engine) as conn:
        if clear:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))
        for info in blobs:
            ops.record_blob(conn, str(info.digest), info.size, kinds[str(info.digest)])
        from artifacts.digest import Digest  # noqa: PLC0415

        for digest, size, release in releases:
            store._index_release(conn, Digest.parse(digest), size, release)
        for digest, event in events:
            apply_tag_event(conn, event, digest)
        for digest, value in compilations:
            index_compilation(conn, digest, value)
        for digest, value in runs:
            index_run(conn, digest, value)
    tags = {(e.name, e.tag) for _, e in events}
    return ReindexReport(
        len(blobs),
        len(releases),
        len(events),
        len(tags),
        len(compilations),
        len(runs),
        tuple(skipped),
    )


def _starts_with_brace(backend: BlobBackend, digest: Any) -> bool:
    raw = backend.open(digest)
    try:
        return raw.read(1) == b"{"
    finally:
        raw.close()


def index_compilation(conn: Connection, record_digest: str, value: dict[str, Any]) -> None:
    """Index a compilation record document (written by the pipeline)."""
    columns = {c.name for c in CompilationRow.__table__.columns} - {"id", "record_digest"}
    row = {k: value.get(k) for k in columns}
    row["flags"] = json.dumps(value.get("flags", []))
    if isinstance(row.get("provenance"), dict):
        row["provenance"] = json.dumps(row["provenance"])
    row["record_digest"] = record_digest
    ops.insert_ignore(conn, CompilationRow.__table__, [row])  # type: ignore[arg-type]
    recipe = value.get("recipe")
    if isinstance(recipe, dict) and recipe.get("direct_key"):
        ops.insert_ignore(
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
    """Index a run record document (written by the pipeline at the end of a run)."""
    ops.insert_ignore(
        conn,
        RunRow.__table__,  # type: ignore[arg-type]
        [
            {
                "id": value["id"],
                "started_at": value["started_at"],
                "finished_at": value.get("finished_at"),
                "status": value["status"],
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
