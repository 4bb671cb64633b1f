"""The Store: blobs in a backend, their index in SQL, releases and tags on top.

Write order is always blob, then index row, then tag, so an interruption never leaves a row
or a tag pointing at a missing blob.
"""

from __future__ import annotations

import difflib
import getpass
import io
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from sqlalchemy import Engine, select

from artifacts.backends import BlobBackend, PutResult, open_backend
from artifacts.config import resolve_index_url, resolve_store_url
from artifacts.digest import Digest
from artifacts.errors import (
    AmbiguousReference,
    BlobNotFound,
    InvalidReference,
    ReferenceNotFound,
)
from artifacts.index import ops
from artifacts.index.db import ensure_schema, make_engine, write_transaction
from artifacts.index.models import BlobRow, ManifestBlobRow, ManifestRow, TagHistoryRow, TagRow
from artifacts.manifest import Release
from artifacts.records import TagEvent
from artifacts.refs import Reference, TagName, parse_reference, parse_tag_name

PUT_ATTEMPTS = 3


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to."""

    digest: Digest
    name: str | None = None
    tag: str | None = None


@dataclass(frozen=True)
class TagMove:
    name: str
    tag: str
    digest: str
    previous: str | None
    at: float
    user: str
    host: str
    reason: str


class Store:
    """A blob backend plus its SQL index."""

    def __init__(self, backend: BlobBackend, engine: Engine, index_url: str) -> None:
        self.backend = backend
        self.engine = engine
        self.index_url = index_url

    @classmethod
    def open(
        cls, store_url: str | None = None, index_url: str | None = None, create: bool = True
    ) -> Store:
        """Open (creating if needed) the store at `store_url` with its index."""
        url = resolve_store_url(store_url)
        backend = open_backend(url, create=create)
        index = resolve_index_url(url, index_url)
        engine = make_engine(index)
        ensure_schema(engine, index)
        return cls(backend, engine, index)

    def close(self) -> None:
        self.engine.dispose()

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
        start = stream.tell() if getattr(stream, "seekable", bool)() else None
        for _ in range(PUT_ATTEMPTS):
            result = self.backend.put(stream, expected)
            with write_transaction(self.engine) as conn:
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
        self._check_blobs(release)
        data = release.to_bytes()
        for _ in range(PUT_ATTEMPTS):
            result = self.backend.put(io.BytesIO(data))
            with write_transaction(self.engine) as conn:
                if self.backend.stat(result.digest) is None:
                    continue
                self._check_blobs(release)
                self._index_release(conn, result.digest, result.size, release)
                return result.digest
        raise BlobNotFound(result.digest, f"{self.backend.url} (the release manifest)")

    def _check_blobs(self, release: Release) -> None:
        for role, ref in release.blob_refs():
            info = self.backend.stat(ref.digest)
            if info is None:
                raise BlobNotFound(ref.digest, f"{self.backend.url} (the release's {role})")
            if info.size != ref.size:
                raise ReferenceNotFound(
                    f"release {release.name}: {role} blob {ref.digest} has size {info.size},"
                    f" manifest says {ref.size}"
                )

    def _index_release(self, conn, digest: Digest, size: int, release: Release) -> None:  # type: ignore[no-untyped-def]
        ops.record_blob(conn, str(digest), size, "release")
        for _, ref in release.blob_refs():
            ops.record_blob(conn, str(ref.digest), ref.size, None)
        ops.insert_ignore(
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
        ops.record_recipes(conn, release)
        ops.insert_ignore(
            conn,
            ManifestBlobRow.__table__,  # type: ignore[arg-type]
            [
                {"manifest_digest": str(digest), "blob_digest": d, "role": r}
                for d, r in roles.items()
            ],
        )

    def load_release(self, digest: Digest) -> Release:
        return Release.from_bytes(self.read_bytes(digest), source=f"manifest {digest}")

    # -- references --------------------------------------------------------------------------
    def resolve(self, text: str) -> Resolved:
        """Resolve a release reference to a manifest digest (errors list close matches)."""
        ref = parse_reference(text)
        with self.engine.connect() as conn:
            if ref.tag is not None:
                row = conn.execute(
                    select(TagRow.digest).where(TagRow.name == ref.name, TagRow.tag == ref.tag)
                ).first()
                if row is None:
                    raise ReferenceNotFound(self._not_found_message(conn, ref))
                return Resolved(Digest.parse(row[0]), ref.name, ref.tag)
            if ref.digest is not None:
                row = conn.execute(
                    select(ManifestRow.name).where(ManifestRow.digest == str(ref.digest))
                ).first()
                if row is None or (ref.name is not None and row[0] != ref.name):
                    raise ReferenceNotFound(self._not_found_message(conn, ref))
                return Resolved(ref.digest, row[0])
            assert ref.prefix is not None
            rows = conn.execute(
                select(ManifestRow.digest, ManifestRow.name)
                .where(ManifestRow.digest.like(f"sha256:{ref.prefix}%"))
                .limit(10)
            ).all()
            if not rows:
                raise ReferenceNotFound(self._not_found_message(conn, ref))
            if len(rows) > 1:
                listed = ", ".join(f"{r[1]}@{Digest.parse(r[0]).short}" for r in rows)
                raise AmbiguousReference(
                    f"digest prefix {ref.prefix!r} matches several releases: {listed};"
                    " give more digits"
                )
            return Resolved(Digest.parse(rows[0][0]), rows[0][1])

    def resolve_blob(self, text: str) -> Digest:
        """A full digest or unique prefix of any blob (not only releases)."""
        ref = parse_reference(text)
        if ref.digest is not None and ref.name is None:
            return ref.digest
        if ref.prefix is None:
            return self.resolve(text).digest
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(BlobRow.digest).where(BlobRow.digest.like(f"sha256:{ref.prefix}%")).limit(3)
            ).all()
        if len(rows) == 1:
            return Digest.parse(rows[0][0])
        if len(rows) > 1:
            raise AmbiguousReference(f"digest prefix {ref.prefix!r} matches several blobs")
        raise ReferenceNotFound(f"no blob or release matches {text!r}")

    def _not_found_message(self, conn, ref: Reference) -> str:  # type: ignore[no-untyped-def]
        candidates = [f"{n}:{t}" for n, t in conn.execute(select(TagRow.name, TagRow.tag)).all()]
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
            return f"{message}; existing tags: {', '.join(sorted(candidates)[:5])}"
        return f"{message}; the store has no tags yet"

    # -- tags --------------------------------------------------------------------------------
    def tag(self, source: str, destination: str, reason: str = "") -> TagMove:
        """Point `name:tag` at the release `source` resolves to, recording history."""
        target = self.resolve(source).digest
        dest = parse_tag_name(destination)
        return self.move_tag(dest, target, reason)

    def move_tag(self, dest: TagName, digest: Digest, reason: str = "") -> TagMove:
        """Move a tag under the write lock; the release is checked under it too, so a gc
        sweep either sees the new tag or has already deleted the release (and this fails)."""
        with write_transaction(self.engine) as conn:
            ops.lock_key(conn, f"tag:{dest}")
            if (
                conn.execute(
                    select(ManifestRow.digest).where(ManifestRow.digest == str(digest))
                ).first()
                is None
            ):
                raise InvalidReference(f"{digest} is not a release manifest in this store")
            row = conn.execute(
                select(TagRow.digest).where(TagRow.name == dest.name, TagRow.tag == dest.tag)
            ).first()
            event = TagEvent(
                name=dest.name,
                tag=dest.tag,
                digest=str(digest),
                previous=row[0] if row else None,
                at=time.time(),
                user=_user(),
                host=socket.gethostname(),
                reason=reason,
            )
            put = self.backend.put(io.BytesIO(event.to_bytes()))
            ops.record_blob(conn, str(put.digest), put.size, "tag-event")
            apply_tag_event(conn, event, str(put.digest))
        return TagMove(**{k: getattr(event, k) for k in TagMove.__dataclass_fields__})

    def history(self, name_tag: str) -> list[TagMove]:
        dest = parse_tag_name(name_tag)
        with self.engine.connect() as conn:
            table = TagHistoryRow.__table__
            rows = conn.execute(
                select(table)  # type: ignore[arg-type]
                .where(table.c.name == dest.name, table.c.tag == dest.tag)
                .order_by(table.c.id.desc())  # insertion order: written under the tag lock
            ).all()
            if not rows:
                raise ReferenceNotFound(
                    self._not_found_message(conn, Reference(name_tag, name=dest.name, tag=dest.tag))
                )
        return [
            TagMove(r.name, r.tag, r.digest, r.previous_digest, r.at, r.user, r.host, r.reason)
            for r in rows
        ]


def apply_tag_event(conn, event: TagEvent, event_digest: str) -> None:  # type: ignore[no-untyped-def]
    """Append the event to history and move the tag (used by tagging and by reindex)."""
    ops.insert_ignore(
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


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
