"""The Store: blobs in a backend, their index in SQL, releases and tags on top.

Write order is always blob, then index row, then tag, so an interruption never leaves a row
or a tag pointing at a missing blob.

Each tag is also a ref object beside the blobs (artifacts/tagrefs.py, which says how the ref
object and the index agree during a move). Reading a release never needs the index: a Store
opened for reading (`create=False`) without a usable index resolves tags from the ref
objects, reads history by walking the tag-event chain, and lists the tagged releases; what
truly needs the index (writes, stats, gc, leases) raises `IndexRequired` in one line.
"""

from __future__ import annotations

import difflib
import getpass
import io
import json
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, select

from artifacts.backends import BlobBackend, PutResult, open_backend
from artifacts.config import INDEX_ENV, resolve_index_url, resolve_store_url
from artifacts.digest import Digest
from artifacts.errors import (
    AmbiguousReference,
    ArtifactError,
    BlobNotFound,
    IndexRequired,
    InvalidManifest,
    InvalidReference,
    ReferenceNotFound,
    SizeMismatch,
)
from artifacts.index import ops, queries
from artifacts.index.db import (
    display_url,
    ensure_schema,
    make_engine,
    sqlite_path,
    write_transaction,
)
from artifacts.index.models import BlobRow, ManifestRow, TagHistoryRow, TagRow
from artifacts.index.ops import apply_tag_event
from artifacts.index.queries import Compilation, Recipe, WeightsEntry
from artifacts.index.reader import open_for_reading
from artifacts.manifest import Release
from artifacts.records import CompilationRecord, RunRecord, TagEvent
from artifacts.refs import Reference, TagName, parse_reference, parse_tag_name
from artifacts.tagrefs import TagRef, has_refs, list_tag_refs, read_tag_ref, write_tag_ref

PUT_ATTEMPTS = 3


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to."""

    digest: Digest
    name: str | None = None
    tag: str | None = None


__all__ = ["Compilation", "Recipe", "Resolved", "Store", "WeightsEntry", "apply_tag_event"]


class Store:
    """A blob backend plus its SQL index (absent in a reader that has none: `engine` then
    raises IndexRequired, and reads go to the ref objects and blobs)."""

    def __init__(
        self,
        backend: BlobBackend,
        engine: Engine | None,
        index_url: str,
        index_problem: str = "",
    ) -> None:
        self.backend = backend
        self._engine = engine
        self.index_url = index_url
        self.index_problem = index_problem or "no index is open"

    @classmethod
    def open(
        cls, store_url: str | None = None, index_url: str | None = None, create: bool = True
    ) -> Store:
        """Open the store at `store_url` with its index. A writer (`create`) creates both as
        needed; a reader creates nothing and goes without an index it cannot use
        (artifacts/index/reader.py)."""
        url = resolve_store_url(store_url)
        backend = open_backend(url, create=create)
        index = resolve_index_url(url, index_url)
        if not create:
            engine, problem = open_for_reading(index)
            return cls(backend, engine, index, problem)
        engine = make_engine(index)
        ensure_schema(engine, index)
        return cls(backend, engine, index)

    @property
    def engine(self) -> Engine:
        """The index's engine; IndexRequired when this store was opened without one."""
        return self.require_index("this command")

    @property
    def has_index(self) -> bool:
        return self._engine is not None

    @property
    def index_path(self) -> Path | None:
        """The index's file when it is a SQLite file, else None."""
        return sqlite_path(self.index_url)

    @property
    def index_label(self) -> str:
        """The index as messages name it: its file, or its URL without credentials."""
        return display_url(self.index_url)

    def require_index(self, purpose: str) -> Engine:
        """The engine, or IndexRequired naming `purpose` and why there is no index."""
        if self._engine is None:
            hint = (
                "check that it is reachable"
                if "unreachable" in self.index_problem
                else f"pass --index URL or set {INDEX_ENV}"
            )
            raise IndexRequired(
                f"{purpose} needs the store's SQL index, and {self.index_problem}; {hint}"
                " (reading releases and tags works without one)"
            )
        return self._engine

    def probe(self) -> None:
        """Read one listing page of the backend, so a missing bucket, denied credentials or an
        unreachable endpoint is reported before a missing index is."""
        next(iter(self.backend.iter_blobs()), None)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs -------------------------------------------------------------------------------
    def put_stream(
        self, stream: IO[bytes], expected: Digest | None = None, kind: str | None = None
    ) -> PutResult:
        """Store a stream (hashed while written), then record it in the index.

        Recording happens under the write lock once the blob is confirmed present, which
        refreshes its age: a `kiln gc` sweeping at the same moment either spares the blob or
        had already deleted it, and then a seekable stream is stored again.
        """
        engine = self.require_index("writing to the store")
        start = stream.tell() if getattr(stream, "seekable", bool)() else None
        for _ in range(PUT_ATTEMPTS):
            result = self.backend.put(stream, expected)
            with write_transaction(engine) as conn:
                if self.backend.stat(result.digest) is not None:
                    ops.record_blob(conn, str(result.digest), result.size, kind)
                    return result
            if start is None:
                break
            stream.seek(start)
        raise BlobNotFound(
            result.digest,
            f"{self.backend.url}: a concurrent `kiln gc` deleted it while it was stored;"
            " store it again",
        )

    def touch_blobs(self, digests: Iterable[Digest | str]) -> list[str]:
        """Refresh the age of blobs a writer is about to reference (a compile reusing them),
        so gc spares them; returns the digests that are no longer in the store."""
        missing = []
        with write_transaction(self.engine) as conn:
            for text in dict.fromkeys(str(d) for d in digests):
                info = self.backend.stat(Digest.parse(text))
                if info is None:
                    missing.append(text)
                else:
                    ops.record_blob(conn, text, info.size, None)
        return missing

    def put_bytes(self, data: bytes, kind: str | None = None) -> PutResult:
        return self.put_stream(io.BytesIO(data), kind=kind)

    def open_blob(self, digest: Digest) -> IO[bytes]:
        """A reader that verifies the content against `digest` at EOF."""
        return self.backend.open(digest)

    def read_bytes(self, digest: Digest) -> bytes:
        with self.backend.open(digest) as reader:
            return reader.read_all()  # type: ignore[attr-defined]

    def has_blob(self, digest: Digest) -> bool:
        return self.backend.has(digest)

    # -- releases ----------------------------------------------------------------------------
    def put_release(self, release: Release) -> Digest:
        """Store a release manifest after checking every blob it references is present.

        The check runs under the write lock, in the transaction that indexes the release (and
        so refreshes its blobs' ages): gc's sweep, which deletes under the same lock, either
        sees the release or has already deleted a blob, and then this fails naming it.
        """
        engine = self.require_index("storing a release")
        self.check_blobs(release)
        data = release.to_bytes()
        for _ in range(PUT_ATTEMPTS):
            result = self.backend.put(io.BytesIO(data))
            with write_transaction(engine) as conn:
                if self.backend.stat(result.digest) is None:
                    continue
                self.check_blobs(release)
                ops.index_release(conn, result.digest, result.size, release)
                return result.digest
        raise BlobNotFound(result.digest, f"{self.backend.url} (the release manifest)")

    def check_blobs(self, release: Release) -> dict[Digest, int]:
        """The release's distinct blobs and sizes; BlobNotFound or SizeMismatch, naming the
        blob and its role, when the store does not hold one as the manifest says."""
        sizes: dict[Digest, int] = {}
        for role, ref in release.blob_refs():
            if ref.digest in sizes:
                continue
            info = self.backend.stat(ref.digest)
            if info is None:
                raise BlobNotFound(ref.digest, f"{self.backend.url} (the release's {role})")
            if info.size != ref.size:
                raise SizeMismatch(
                    f"release {release.name}: {role} blob {ref.digest} has size {info.size},"
                    f" manifest says {ref.size}"
                )
            sizes[ref.digest] = ref.size
        return sizes

    def load_release(self, digest: Digest) -> Release:
        return Release.from_bytes(self.read_bytes(digest), source=f"manifest {digest}")

    # -- references --------------------------------------------------------------------------
    def resolve(self, text: str) -> Resolved:
        """Resolve a release reference to a manifest digest (errors list close matches).

        A tag resolves from its ref object (one read of the store; the index is only consulted
        for tags written before ref objects existed), so a host needs no index to deploy."""
        ref = parse_reference(text)
        if ref.tag is not None:
            assert ref.name is not None
            digest = self.read_tag(ref.name, ref.tag)
            if digest is None:
                raise ReferenceNotFound(self._not_found_message(ref))
            return Resolved(Digest.parse(digest), ref.name, ref.tag)
        if self._engine is None:
            return self._resolve_without_index(ref)
        with self._engine.connect() as conn:
            if ref.digest is not None:
                row = conn.execute(
                    select(ManifestRow.name).where(ManifestRow.digest == str(ref.digest))
                ).first()
                if row is None or (ref.name is not None and row[0] != ref.name):
                    raise ReferenceNotFound(self._not_found_message(ref))
                return Resolved(ref.digest, row[0])
            assert ref.prefix is not None
            rows = conn.execute(
                select(ManifestRow.digest, ManifestRow.name)
                .where(ManifestRow.digest.like(f"sha256:{ref.prefix}%"))
                .limit(10)
            ).all()
        return self._one_match(ref, [(r[0], r[1]) for r in rows])

    def _one_match(self, ref: Reference, rows: list[tuple[str, str]]) -> Resolved:
        if not rows:
            raise ReferenceNotFound(self._not_found_message(ref))
        if len(rows) > 1:
            listed = ", ".join(f"{n}@{Digest.parse(d).short}" for d, n in rows)
            raise AmbiguousReference(
                f"digest prefix {ref.prefix!r} matches several releases: {listed};"
                " give more digits"
            )
        return Resolved(Digest.parse(rows[0][0]), rows[0][1])

    def _resolve_without_index(self, ref: Reference) -> Resolved:
        """A digest from the manifest blob itself; a prefix among the tagged releases."""
        if ref.digest is not None:
            try:
                release = self.load_release(ref.digest)
            except (BlobNotFound, InvalidManifest):
                raise ReferenceNotFound(self._not_found_message(ref)) from None
            if ref.name is not None and release.name != ref.name:
                raise ReferenceNotFound(self._not_found_message(ref))
            return Resolved(ref.digest, release.name)
        matches = sorted(
            {
                (r.digest, r.name)
                for r in self.tag_refs()
                if r.digest.startswith(f"sha256:{ref.prefix}")
            }
        )
        return self._one_match(ref, matches)

    def resolve_blob(self, text: str) -> Digest:
        """A full digest or unique prefix of any blob (not only releases)."""
        ref = parse_reference(text)
        if ref.digest is not None and ref.name is None:
            return ref.digest
        if ref.prefix is None or self._engine is None:
            return self.resolve(text).digest
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(BlobRow.digest).where(BlobRow.digest.like(f"sha256:{ref.prefix}%")).limit(3)
            ).all()
        if len(rows) == 1:
            return Digest.parse(rows[0][0])
        if len(rows) > 1:
            raise AmbiguousReference(f"digest prefix {ref.prefix!r} matches several blobs")
        raise ReferenceNotFound(f"no blob or release matches {text!r}")

    def _not_found_message(self, ref: Reference) -> str:
        candidates = sorted({f"{n}:{t}" for n, t in self.tags()})
        if ref.tag is not None:
            probe = f"{ref.name}:{ref.tag}"
            close = difflib.get_close_matches(probe, candidates, n=5, cutoff=0.4)
            close += [c for c in candidates if c.startswith(f"{ref.name}:") and c not in close]
            message = f"unknown reference {ref.text!r}"
        else:
            close = []
            message = f"no release matches {ref.text!r}"
        if close:
            return f"{message}; closest: {', '.join(close[:5])}"
        if candidates:
            return f"{message}; existing tags: {', '.join(candidates[:5])}"
        return f"{message}; the store {self.backend.url} has no tags yet"

    # -- tag reads (ref objects first; the index only for tags older than ref objects) -------
    def read_tag(self, name: str, tag: str) -> str | None:
        """The manifest digest `name:tag` points at, or None."""
        if has_refs(self.backend):
            ref = read_tag_ref(self.backend, name, tag)  # type: ignore[arg-type]
            if ref is not None:
                return ref.digest
        if self._engine is None:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(
                select(TagRow.digest).where(TagRow.name == name, TagRow.tag == tag)
            ).first()
        return row[0] if row else None

    def tag_refs(self, name: str | None = None) -> list[TagRef]:
        """The ref objects in the store (of one model when `name` is given)."""
        if not has_refs(self.backend):
            return []
        return list_tag_refs(self.backend, name)  # type: ignore[arg-type]

    def tags(self, name: str | None = None) -> dict[tuple[str, str], str]:
        """(name, tag) -> manifest digest: the index's rows when there is an index (fast),
        the ref objects when there is not."""
        if self._engine is None:
            return {(r.name, r.tag): r.digest for r in self.tag_refs(name)}
        query = select(TagRow.name, TagRow.tag, TagRow.digest)
        if name is not None:
            query = query.where(TagRow.name == name)
        with self._engine.connect() as conn:
            return {(n, t): d for n, t, d in conn.execute(query)}

    # -- tags --------------------------------------------------------------------------------
    def tag(self, source: str, destination: str, reason: str = "") -> TagEvent:
        """Point `name:tag` at the release `source` resolves to, recording history."""
        target = self.resolve(source).digest
        dest = parse_tag_name(destination)
        return self.move_tag(dest, target, reason)

    def move_tag(self, dest: TagName, digest: Digest, reason: str = "") -> TagEvent:
        """Point `dest` at `digest`: tag-event blob, index rows, ref object, commit, all under
        the index's write lock and its lock on this tag (artifacts/tagrefs.py says what
        readers see). The release is checked under the lock too, so a gc sweep either sees the
        new tag or has already deleted the release (and this fails)."""
        engine = self.require_index(f"moving tag {dest}")
        with write_transaction(engine) as conn:
            ops.lock_key(conn, f"tag:{dest}")
            if (
                conn.execute(
                    select(ManifestRow.digest).where(ManifestRow.digest == str(digest))
                ).first()
                is None
            ):
                raise InvalidReference(f"{digest} is not a release manifest in this store")
            previous, previous_event = self._tag_head(conn, dest)
            event = TagEvent(
                name=dest.name,
                tag=dest.tag,
                digest=str(digest),
                previous=previous,
                at=time.time(),
                user=_user(),
                host=socket.gethostname(),
                reason=reason,
                previous_event=previous_event,
            )
            put = self.backend.put(io.BytesIO(event.to_bytes()))
            ops.record_blob(conn, str(put.digest), put.size, "tag-event")
            apply_tag_event(conn, event, str(put.digest))
            if has_refs(self.backend):
                write_tag_ref(
                    self.backend,  # type: ignore[arg-type]
                    TagRef(dest.name, dest.tag, str(digest), str(put.digest), event.at),
                )
        return event

    def _tag_head(self, conn, dest: TagName) -> tuple[str | None, str | None]:  # type: ignore[no-untyped-def]
        """(manifest, event) the tag points at now: the ref object is the truth; the index
        answers for a tag that has none yet (tagged before ref objects existed)."""
        if has_refs(self.backend):
            ref = read_tag_ref(self.backend, dest.name, dest.tag)  # type: ignore[arg-type]
            if ref is not None:
                return ref.digest, ref.event
        row = conn.execute(
            select(TagRow.digest).where(TagRow.name == dest.name, TagRow.tag == dest.tag)
        ).first()
        if row is None:
            return None, None
        table = TagHistoryRow.__table__
        last = conn.execute(
            select(table.c.event_digest)  # type: ignore[arg-type]
            .where(table.c.name == dest.name, table.c.tag == dest.tag)
            .order_by(table.c.id.desc())
            .limit(1)
        ).scalar()
        return row[0], last

    def history(self, name_tag: str) -> list[TagEvent]:
        """Every move of a tag, newest first: from the index when it agrees with the ref
        object, else by walking the tag-event chain from the ref object (store alone). From
        the index, an event's `previous_event` is the event of the move before it."""
        dest = parse_tag_name(name_tag)
        ref = None
        if has_refs(self.backend):
            ref = read_tag_ref(self.backend, dest.name, dest.tag)  # type: ignore[arg-type]
        if self._engine is not None:
            with self._engine.connect() as conn:
                table = TagHistoryRow.__table__
                rows = conn.execute(
                    select(table)  # type: ignore[arg-type]
                    .where(table.c.name == dest.name, table.c.tag == dest.tag)
                    .order_by(table.c.id.desc())  # insertion order: written under the tag lock
                ).all()
            if rows and (ref is None or rows[0].event_digest == ref.event):
                older = [r.event_digest for r in rows[1:]] + [None]
                return [
                    TagEvent(
                        r.name,
                        r.tag,
                        r.digest,
                        r.previous_digest,
                        r.at,
                        r.user,
                        r.host,
                        r.reason,
                        previous_event,
                    )
                    for r, previous_event in zip(rows, older, strict=True)
                ]
        if ref is None:
            raise ReferenceNotFound(
                self._not_found_message(Reference(name_tag, name=dest.name, tag=dest.tag))
            )
        return self._walk_history(ref)

    def _walk_history(self, ref: TagRef) -> list[TagEvent]:
        moves: list[TagEvent] = []
        seen: set[str] = set()
        event_digest = ref.event
        while event_digest is not None and event_digest not in seen:
            seen.add(event_digest)
            try:
                data = self.read_bytes(Digest.parse(event_digest))
                event = TagEvent.from_json(json.loads(data), f"tag event {event_digest}")
            except BlobNotFound:
                break  # collected, or from a store copied without its history
            except (ValueError, ArtifactError) as exc:
                raise InvalidManifest(
                    f"tag event {event_digest} of {ref.name}:{ref.tag}: {exc}"
                ) from None
            moves.append(event)
            event_digest = event.previous_event
        return moves


    # -- compilations, recipes, weights and runs (the build side's rows) --------------------
    def compilations(
        self,
        *,
        hlo_key: str | None = None,
        record_digest: str | None = None,
        log_digest: str | None = None,
        ok_only: bool = False,
    ) -> list[Compilation]:
        """The compilations of an HLO key, a compile record or a log, newest first."""
        with self.require_index("looking up compilations").connect() as conn:
            return queries.compilations(
                conn,
                hlo_key=hlo_key,
                record_digest=record_digest,
                log_digest=log_digest,
                ok_only=ok_only,
            )

    def last_compilation_id(self, hlo_key: str) -> int:
        """The row id of the latest compile of `hlo_key` (0 for none): a waiter's mark."""
        with self.engine.connect() as conn:
            return queries.last_compilation_id(conn, hlo_key)

    def failure_since(self, hlo_key: str, after_id: int) -> Compilation | None:
        """The latest failed compile of `hlo_key` recorded after row `after_id`, or None."""
        with self.engine.connect() as conn:
            return queries.failure_since(conn, hlo_key, after_id)

    def recorded_provenance(self, compiler: str, target: str, containing: str) -> list[str | None]:
        """Provenance JSON of successful compiles on `compiler`/`target` mentioning `containing`."""
        with self.engine.connect() as conn:
            return queries.recorded_provenance(conn, compiler, target, containing)

    def recipes(self, direct_keys: Iterable[str]) -> dict[str, Recipe]:
        """direct key -> its recipe, for those of `direct_keys` the index knows."""
        with self.engine.connect() as conn:
            return queries.recipes(conn, direct_keys)

    def weights_entry(self, weights_key: str) -> WeightsEntry | None:
        with self.engine.connect() as conn:
            return queries.weights(conn, weights_key)

    def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        """digest -> size, for those of `digests` the index knows."""
        with self.engine.connect() as conn:
            return queries.blob_sizes(conn, digests)

    def blob_kind(self, digest: str) -> str | None:
        """The kind the blob was stored as, or None (unknown, or not indexed)."""
        with self.engine.connect() as conn:
            return queries.blob_kind(conn, digest)

    def record_compilation(self, record: CompilationRecord) -> PutResult:
        """Store a compile record (after its blobs), then index it with its recipe."""
        value = record.to_json()
        put = self.put_bytes(record.to_bytes(), kind="compilation")
        with write_transaction(self.engine) as conn:
            ops.index_compilation(conn, str(put.digest), value)
        return put

    def record_recipe(
        self, direct_key: str, hlo_key: str, hlo_digest: str, signature: dict[str, Any]
    ) -> None:
        with write_transaction(self.engine) as conn:
            ops.record_recipe(conn, direct_key, hlo_key, hlo_digest, signature)

    def record_weights(self, weights_key: str, digest: str, size: int) -> None:
        with write_transaction(self.engine) as conn:
            ops.record_weights(conn, weights_key, digest, size)

    def record_run_started(self, run: RunRecord, alive: Callable[[int], bool]) -> None:
        """Index a `running` run (its record comes at its end; `run.summary` holds its pid).
        Earlier runs of its host still `running` whose pid is not `alive` become
        `interrupted` first."""
        with write_transaction(self.engine) as conn:
            ops.mark_dead_runs_interrupted(conn, run.host, alive)
            ops.insert_running_run(conn, run)

    def record_run(self, record: RunRecord) -> PutResult:
        """Store a run's record, then let its rows replace the `running` row."""
        put = self.put_bytes(record.to_bytes(), kind="run")
        with write_transaction(self.engine) as conn:
            ops.delete_run(conn, record.id)
            ops.index_run(conn, str(put.digest), record.to_json())
        return put

    def mark_run_interrupted(
        self, run_id: str, finished_at: float, summary: dict[str, Any]
    ) -> None:
        """The run's row alone says `interrupted` (when its record cannot be written)."""
        with write_transaction(self.engine) as conn:
            ops.mark_run_interrupted(conn, run_id, finished_at, summary)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
