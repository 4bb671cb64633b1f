"""Read-only reports over a store: listing, statistics, one release, and release diffs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from artifacts.digest import Digest
from artifacts.errors import BlobNotFound
from artifacts.index.db import display_url
from artifacts.index.models import (
    BlobRow,
    CompilationRow,
    ManifestBlobRow,
    ManifestRow,
    RunRow,
    TagRow,
)
from artifacts.manifest import Graph, Release
from artifacts.store import Store


@dataclass(frozen=True)
class ReleaseSummary:
    digest: str
    name: str
    target: str
    task: str
    graphs: int
    size: int
    created: str
    tags: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "tags": list(self.tags)}


def list_releases(store: Store, name: str | None = None) -> list[ReleaseSummary]:
    """Every release (optionally of one model), newest first, with the tags on it. Without an
    index, the releases some tag points at (from the ref objects and their manifests)."""
    if not store.has_index:
        return _tagged_releases(store, name)
    with store.engine.connect() as conn:
        query = select(
            ManifestRow.digest,
            ManifestRow.name,
            ManifestRow.target,
            ManifestRow.task,
            ManifestRow.graph_count,
            ManifestRow.total_size,
            ManifestRow.created,
        ).order_by(ManifestRow.name, ManifestRow.created.desc())
        tag_query = select(TagRow.digest, TagRow.name, TagRow.tag)
        if name:
            query = query.where(ManifestRow.name == name)
            tag_query = tag_query.where(TagRow.name == name)
        tags: dict[str, list[str]] = defaultdict(list)
        for digest, tag_name, tag in conn.execute(tag_query):
            tags[digest].append(f"{tag_name}:{tag}" if tag_name != name else tag)
        return [
            ReleaseSummary(d, n, t, k, g, s, c, tuple(sorted(tags.get(d, ()))))
            for d, n, t, k, g, s, c in conn.execute(query)
        ]


def _tagged_releases(store: Store, name: str | None) -> list[ReleaseSummary]:
    tags: dict[str, list[str]] = defaultdict(list)
    for (tag_name, tag), digest in store.tags(name).items():
        tags[digest].append(f"{tag_name}:{tag}" if tag_name != name else tag)
    out = []
    for digest, on_it in tags.items():
        data = store.read_bytes(Digest.parse(digest))
        r = Release.from_bytes(data, source=f"manifest {digest}")
        out.append(
            ReleaseSummary(
                digest,
                r.name,
                r.target,
                r.source.task,
                len(r.graphs),
                r.total_size + len(data),
                r.provenance.created,
                tuple(sorted(on_it)),
            )
        )
    out.sort(key=lambda s: s.created, reverse=True)
    out.sort(key=lambda s: s.name)
    return out


@dataclass(frozen=True)
class StoreStats:
    store: str
    index: str
    blobs: int
    bytes: int
    releases: int
    tags: int
    compilations: int
    runs: int
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["by_kind"] = {k: {"blobs": n, "bytes": b} for k, (n, b) in self.by_kind.items()}
        return out


def store_stats(store: Store) -> StoreStats:
    """Counts and sizes from the index (fast: aggregates, no walk of the blobs)."""
    with store.require_index("kiln stats").connect() as conn:
        by_kind = {
            (kind or "data"): (n, int(b or 0))
            for kind, n, b in conn.execute(
                select(BlobRow.kind, func.count(), func.sum(BlobRow.size)).group_by(BlobRow.kind)
            )
        }
        count = lambda model: conn.execute(select(func.count()).select_from(model)).scalar_one()  # noqa: E731
        return StoreStats(
            store=store.backend.url,
            index=display_url(store.index_url),
            blobs=sum(n for n, _ in by_kind.values()),
            bytes=sum(b for _, b in by_kind.values()),
            releases=count(ManifestRow),
            tags=count(TagRow),
            compilations=count(CompilationRow),
            runs=count(RunRow),
            by_kind=by_kind,
        )


@dataclass(frozen=True)
class ReleaseView:
    digest: Digest
    release: Release
    tags: tuple[str, ...]
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": str(self.digest),
            "tags": list(self.tags),
            "size": self.size,
            "manifest": self.release.to_json(),
        }


def show_release(store: Store, ref: str) -> ReleaseView:
    digest = store.resolve(ref).digest
    if not store.has_index:
        data = store.read_bytes(digest)
        release = Release.from_bytes(data, source=f"manifest {digest}")
        on_it = sorted(
            f"{n}:{t}" for (n, t), d in store.tags(release.name).items() if d == str(digest)
        )
        return ReleaseView(digest, release, tuple(on_it), release.total_size + len(data))
    release = store.load_release(digest)
    with store.engine.connect() as conn:
        tags = tuple(
            f"{n}:{t}"
            for n, t in conn.execute(
                select(TagRow.name, TagRow.tag).where(TagRow.digest == str(digest))
            )
        )
        size = conn.execute(
            select(ManifestRow.total_size).where(ManifestRow.digest == str(digest))
        ).scalar_one_or_none()
    return ReleaseView(digest, release, tags, size or release.total_size)


@dataclass(frozen=True)
class BlobView:
    digest: Digest
    size: int
    kind: str | None
    referenced_by: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": str(self.digest),
            "size": self.size,
            "kind": self.kind,
            "referenced_by": list(self.referenced_by),
        }


def show_blob(store: Store, digest: Digest) -> BlobView:
    info = store.backend.stat(digest)
    if info is None:
        raise BlobNotFound(digest, store.backend.url)
    if not store.has_index:
        return BlobView(digest, info.size, None, ())
    with store.engine.connect() as conn:
        kind = conn.execute(select(BlobRow.kind).where(BlobRow.digest == str(digest))).scalar()
        refs = tuple(
            f"{n}@{Digest.parse(d).short} ({role})"
            for n, d, role in conn.execute(
                select(ManifestRow.name, ManifestRow.digest, ManifestBlobRow.role)
                .join(ManifestRow, ManifestRow.digest == ManifestBlobRow.manifest_digest)
                .where(ManifestBlobRow.blob_digest == str(digest))
            )
        )
    return BlobView(digest, info.size, kind, refs)


@dataclass(frozen=True)
class GraphChange:
    kind: str
    bucket: str
    changes: tuple[str, ...]


@dataclass(frozen=True)
class ReleaseDiff:
    left: str
    right: str
    fields: tuple[tuple[str, str, str], ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[GraphChange, ...]
    unchanged: int
    size_left: int
    size_right: int

    @property
    def identical(self) -> bool:
        return not (self.fields or self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "left": self.left,
            "right": self.right,
            "fields": [{"field": f, "left": a, "right": b} for f, a, b in self.fields],
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": [
                {"graph": f"{c.kind} {c.bucket}", "changes": list(c.changes)} for c in self.changed
            ],
            "unchanged": self.unchanged,
            "size_left": self.size_left,
            "size_right": self.size_right,
        }


def _graph_label(g: Graph) -> str:
    return f"{g.kind} {g.bucket_label}"


def _flags(g: Graph) -> str:
    return " ".join(g.compiler.flags) or "(none)"


def _executable(g: Graph) -> str:
    return f"{g.executable.digest.short} ({g.executable.size} B)"


# What a graph diff compares (the value) and how it shows a change (the label and text).
_GRAPH_FIELDS: tuple[tuple[str, Callable[[Graph], object], Callable[[Graph], str]], ...] = (
    ("compiler", lambda g: g.compiler.name, lambda g: g.compiler.name),
    ("compiler version", lambda g: g.compiler.version, lambda g: g.compiler.version),
    ("flags", lambda g: g.compiler.flags, _flags),
    ("hlo", lambda g: g.hlo.digest, lambda g: str(g.hlo.digest.short)),
    ("executable", lambda g: g.executable.digest, _executable),
    ("format", lambda g: g.format, lambda g: g.format),
)


def _graph_changes(a: Graph, b: Graph) -> list[str]:
    return [
        f"{label} {show(a)} -> {show(b)}"
        for label, value, show in _GRAPH_FIELDS
        if value(a) != value(b)
    ]


def diff_releases(left: Release, right: Release, left_ref: str, right_ref: str) -> ReleaseDiff:
    """Graphs added/removed/changed (flags, compiler versions, digests, sizes) and top fields."""
    fields = []
    for name, a, b in (
        ("name", left.name, right.name),
        ("target", left.target, right.target),
        ("task", left.source.task, right.source.task),
        ("architecture", left.source.architecture_digest, right.source.architecture_digest),
        (
            "weights",
            ",".join(str(w.digest.short) for w in left.source.weights),
            ",".join(str(w.digest.short) for w in right.source.weights),
        ),
    ):
        if a != b:
            fields.append((name, a, b))
    lg = {g.identity: g for g in left.graphs}
    rg = {g.identity: g for g in right.graphs}
    added = tuple(_graph_label(rg[k]) for k in sorted(rg.keys() - lg.keys()))
    removed = tuple(_graph_label(lg[k]) for k in sorted(lg.keys() - rg.keys()))
    changed = []
    unchanged = 0
    for key in sorted(lg.keys() & rg.keys()):
        changes = _graph_changes(lg[key], rg[key])
        if changes:
            changed.append(GraphChange(key[0], key[1], tuple(changes)))
        else:
            unchanged += 1
    return ReleaseDiff(
        left_ref,
        right_ref,
        tuple(fields),
        added,
        removed,
        tuple(changed),
        unchanged,
        left.total_size,
        right.total_size,
    )
