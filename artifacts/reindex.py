"""`kiln reindex`: rebuild the SQL index from the blobs alone (the blobs are the truth).

It never drops what it cannot read: a document blob (release, tag event, record) that fails
to read, verify or parse stops it, naming every such digest, with the index untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from artifacts.backends import BlobBackend, BlobInfo, open_backend
from artifacts.config import default_index_url, resolve_index_url, resolve_store_url
from artifacts.digest import Digest
from artifacts.errors import (
    ArtifactError,
    BlobCorrupted,
    BlobNotFound,
    InvalidManifest,
    ReindexRefused,
    StoreIndexError,
)
from artifacts.fsio import replace_durably
from artifacts.index import ops, queries
from artifacts.index.db import (
    ensure_schema,
    make_engine,
    sqlite_path,
    sqlite_sound,
    write_transaction,
)
from artifacts.index.ops import apply_tag_event, index_compilation, index_run
from artifacts.index.reader import refuse_foreign
from artifacts.manifest import Release
from artifacts.records import (
    KIND_BY_MEDIA_TYPE,
    SNIFF_LIMIT,
    CompilationRecord,
    RunRecord,
    TagEvent,
    sniff_document,
)
from artifacts.store import Store
from artifacts.tagrefs import TagRef, has_refs, read_tag_ref, write_tag_ref

__all__ = ["ReindexReport", "index_compilation", "index_run", "reindex"]

Progress = Callable[[int, int], None]


DOCUMENT_KINDS = frozenset(KIND_BY_MEDIA_TYPE.values())


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


@dataclass
class _Scan:
    """What the blobs say: every blob's kind and the documents to index."""

    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    kinds: dict[str, str | None] = field(default_factory=dict)
    releases: dict[str, tuple[int, Release]] = field(default_factory=dict)
    events: dict[str, TagEvent] = field(default_factory=dict)
    compilations: dict[str, CompilationRecord] = field(default_factory=dict)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def keep_only(self, present: set[str]) -> None:
        """Forget blobs deleted (by gc) since they were scanned."""
        for table in (
            self.blobs,
            self.kinds,
            self.releases,
            self.events,
            self.compilations,
            self.runs,
            self.unreadable,
        ):
            for digest in [d for d in table if d not in present]:
                del table[digest]


def reindex(
    store_url: str | None = None,
    index_url: str | None = None,
    progress: Progress | None = None,
    drop_unreadable: bool = False,
) -> ReindexReport:
    """Rebuild the index from the blobs; refuse (ReindexRefused, index untouched) when a
    document blob cannot be read, unless `drop_unreadable`.

    A readable index is rebuilt in place: blobs are scanned without the lock, then, under the
    exclusive write lock, blobs written meanwhile (a tag move's event) are scanned too and the
    tables are refilled in one transaction; a writer that comes later waits and then writes
    into the new index. A SQLite index that cannot be opened is built beside and swapped in.
    """
    url = resolve_store_url(store_url)
    backend = open_backend(url, create=False)
    index = resolve_index_url(url, index_url)
    path = sqlite_path(index)
    if path is not None and path != sqlite_path(default_index_url(url)):
        refuse_foreign(path)  # a file at Kiln's own default path is Kiln's to rebuild
    engine = make_engine(index)
    try:
        path = sqlite_path(index)
        try:
            ensure_schema(engine, index)
        except StoreIndexError:
            if path is None:
                raise
            sound = False
        else:
            sound = sqlite_sound(engine)
        if not sound and path is not None:
            engine.dispose()
            return _rebuild_beside(backend, path, progress, drop_unreadable)
        return _rebuild_in_place(Store(backend, engine, index), progress, drop_unreadable)
    finally:
        engine.dispose()


def _rebuild_in_place(store: Store, progress: Progress | None, drop: bool) -> ReindexReport:
    with store.engine.connect() as conn:
        known = queries.known_kinds(conn)
    scan = _Scan()
    _scan(store, list(store.backend.iter_blobs()), known, scan, progress)
    _refuse(scan, drop)
    with write_transaction(store.engine, exclusive=True) as conn:
        listed = list(store.backend.iter_blobs())
        scan.keep_only({str(b.digest) for b in listed})
        late = [b for b in listed if str(b.digest) not in scan.blobs]
        if late:
            _scan(store, late, queries.known_kinds(conn), scan, None)
            _refuse(scan, drop)
        ops.clear_all(conn)
        return _fill(conn, store, scan)


def _rebuild_beside(
    backend: BlobBackend, path: Path, progress: Progress | None, drop: bool
) -> ReindexReport:
    """Replace an index file that cannot be opened (nothing can be written into it)."""
    tmp = path.with_name(f"{path.name}.rebuild-{os.getpid()}")
    _remove_sqlite(tmp)
    engine = make_engine(f"sqlite:///{tmp}")
    try:
        ensure_schema(engine, str(tmp))
        store = Store(backend, engine, str(tmp))
        scan = _Scan()
        _scan(store, list(backend.iter_blobs()), {}, scan, progress)
        _refuse(scan, drop)
        with write_transaction(engine) as conn:
            report = _fill(conn, store, scan)
    except BaseException:
        engine.dispose()
        _remove_sqlite(tmp)
        raise
    engine.dispose()
    _remove_sqlite(path, keep_main=True)
    replace_durably(tmp, path)
    _remove_sqlite(tmp)
    return report


def _remove_sqlite(path: Path, keep_main: bool = False) -> None:
    suffixes = ("-wal", "-shm", "-journal") if keep_main else ("", "-wal", "-shm", "-journal")
    for suffix in suffixes:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _scan(
    store: Store,
    blobs: list[BlobInfo],
    known: dict[str, str | None],
    scan: _Scan,
    progress: Progress | None,
) -> None:
    """Read every blob that is, or may be, a document (the old index's documents always)."""
    for i, info in enumerate(blobs):
        digest = str(info.digest)
        was = known.get(digest)
        try:
            if was in DOCUMENT_KINDS or (
                info.size <= SNIFF_LIMIT and _starts_with_brace(store.backend, info.digest)
            ):
                _read_document(store, info, was, digest not in known, scan)
            else:
                scan.kinds[digest] = was
            scan.blobs[digest] = info
        except BlobNotFound:
            pass  # deleted since listed (a concurrent gc): not in the new index either
        if progress:
            progress(i + 1, len(blobs))


def _read_document(
    store: Store, info: BlobInfo, was: str | None, unknown: bool, scan: _Scan
) -> None:
    """Index one document; a damaged one is unreadable unless the old index knew the blob
    as something else (an executable that happens to start with a brace)."""
    digest = str(info.digest)
    scan.kinds[digest] = was
    try:
        data = store.read_bytes(info.digest)
    except BlobNotFound:
        raise
    except (ArtifactError, OSError) as exc:
        if unknown or was in DOCUMENT_KINDS:
            scan.unreadable[digest] = _reason(exc)
        return
    sniffed = sniff_document(data)
    if sniffed is None:
        if was in DOCUMENT_KINDS:
            scan.unreadable[digest] = f"the index knew it as a {was}; it is not one now"
        return
    kind, value = sniffed
    scan.kinds[digest] = kind
    try:
        if kind == "release":
            scan.releases[digest] = (info.size, Release.from_json(value, digest))
        elif kind == "tag-event":
            scan.events[digest] = TagEvent.from_json(value, digest)
        elif kind == "compilation":
            scan.compilations[digest] = CompilationRecord.from_json(value, digest)
        elif kind == "run":
            scan.runs[digest] = RunRecord.from_json(value, digest)
    except InvalidManifest as exc:
        scan.unreadable[digest] = _reason(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BlobCorrupted):
        return f"corrupted: its content hashes to {exc.actual}"
    text = str(exc) if isinstance(exc, ArtifactError) else f"unreadable: {exc}"
    return text.splitlines()[0] if text else type(exc).__name__


def _refuse(scan: _Scan, drop: bool) -> None:
    if not scan.unreadable or drop:
        return
    listed = "; ".join(f"{d} ({why})" for d, why in sorted(scan.unreadable.items()))
    raise ReindexRefused(
        f"reindex: {len(scan.unreadable)} document blob(s) cannot be read, and the releases,"
        f" tags or records in them would be dropped: {listed}. The index was left as it was;"
        " restore those blobs (`kiln verify` lists all damage) or pass --drop-unreadable"
    )


def _fill(conn: Connection, store: Store, scan: _Scan) -> ReindexReport:
    for digest, info in scan.blobs.items():
        ops.record_blob(conn, digest, info.size, scan.kinds.get(digest))
    for digest, (size, release) in scan.releases.items():
        ops.index_release(conn, Digest.parse(digest), size, release)
    events = sorted(scan.events.items(), key=lambda e: (e[1].at, e[0]))
    for digest, event in events:
        apply_tag_event(conn, event, digest)
    _write_missing_refs(store, events)
    for digest, compilation in scan.compilations.items():
        index_compilation(conn, digest, compilation.to_json())
    for digest, run in scan.runs.items():
        index_run(conn, digest, run.to_json())
    return ReindexReport(
        len(scan.blobs),
        len(scan.releases),
        len(events),
        len({(e.name, e.tag) for _, e in events}),
        len(scan.compilations),
        len(scan.runs),
        tuple(f"{d}: {why}" for d, why in sorted(scan.unreadable.items())),
    )


def _write_missing_refs(store: Store, events: list[tuple[str, TagEvent]]) -> None:
    """Give every tag that has events but no ref object (tagged before ref objects existed)
    a ref object from its latest event, so hosts without the index can resolve it too. A ref
    object that exists is left alone: it is what readers already see."""
    if not has_refs(store.backend):
        return
    latest = {(event.name, event.tag): (digest, event) for digest, event in events}
    for (name, tag), (digest, event) in latest.items():
        if read_tag_ref(store.backend, name, tag) is None:  # type: ignore[arg-type]
            write_tag_ref(
                store.backend,  # type: ignore[arg-type]
                TagRef(name, tag, event.digest, digest, event.at),
            )


def _starts_with_brace(backend: BlobBackend, digest: Any) -> bool:
    raw = backend.open(digest)
    try:
        return raw.read(1) == b"{"
    finally:
        raw.close()
