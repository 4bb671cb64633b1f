"""`kiln gc`: mark what tags, recent history and recent runs reach; sweep the rest.

Planning and sweeping are separate: the plan is what `--dry-run` prints. The sweep is a
barrier against writers that run meanwhile (a tag move, a compile reusing old blobs and
publishing a release): under the index's write lock it marks again and deletes only planned
blobs that are still unreachable and old. Writers put, reference and tag under that lock too
(`Store.put_stream`, `touch_blobs`, `put_release`, `move_tag`), so each writer is wholly
before the sweep (the sweep sees its row, tag or fresh age and spares the blob) or after it
(the writer finds the blob gone under the lock, and stores it again or fails naming it).

Index rows go first, in one transaction; then, under the lock again, each blob whose row no
writer re-created in between. An interruption leaves at worst unindexed blobs, never a row
pointing at a missing blob.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, select

from artifacts.backends import BlobInfo
from artifacts.digest import Digest
from artifacts.errors import ArtifactError
from artifacts.index.db import write_transaction
from artifacts.index.models import (
    BlobRow,
    CompilationRow,
    ManifestBlobRow,
    ManifestRow,
    RecipeRow,
    RunItemRow,
    RunRow,
    TagHistoryRow,
    TagRow,
)
from artifacts.store import Store

DAY = 86400.0
ALWAYS_KEPT_KINDS = ("tag-event", "run")
SWEEP_BATCH = 500  # blobs per locked sweep step: writers wait for one step at most


@dataclass(frozen=True)
class GcPolicy:
    history_grace_s: float = 7 * DAY
    run_grace_s: float = 7 * DAY
    min_age_s: float = 3600.0


@dataclass(frozen=True)
class GcPlan:
    delete: tuple[BlobInfo, ...]
    manifests: tuple[str, ...]
    compilations: tuple[int, ...]
    kept_blobs: int
    kept_bytes: int
    policy: GcPolicy = GcPolicy()

    @property
    def bytes(self) -> int:
        return sum(b.size for b in self.delete)

    def to_json(self) -> dict[str, Any]:
        return {
            "blobs": len(self.delete),
            "bytes": self.bytes,
            "manifests": list(self.manifests),
            "compilations": len(self.compilations),
            "kept_blobs": self.kept_blobs,
            "kept_bytes": self.kept_bytes,
            "digests": [str(b.digest) for b in self.delete],
        }


@dataclass(frozen=True)
class _Marks:
    """What the index says must stay, at one moment."""

    marked: frozenset[str]
    manifests: frozenset[str]
    roots: frozenset[str]
    swept_compilations: tuple[int, ...]


def plan_gc(store: Store, policy: GcPolicy = GcPolicy(), now: float | None = None) -> GcPlan:
    """Decide what to delete without deleting anything."""
    now = time.time() if now is None else now
    with store.engine.connect() as conn:
        marks = _mark(conn, policy, now)
    marked = marks.marked | _ref_marks(store)
    delete_list: list[BlobInfo] = []
    kept = kept_bytes = 0
    for info in store.backend.iter_blobs():
        if str(info.digest) in marked or info.modified_at >= now - policy.min_age_s:
            kept += 1
            kept_bytes += info.size
        else:
            delete_list.append(info)
    return GcPlan(
        tuple(delete_list),
        tuple(sorted((marks.manifests - marks.roots) & {str(b.digest) for b in delete_list})),
        marks.swept_compilations,
        kept,
        kept_bytes,
        policy,
    )


def _ref_marks(store: Store) -> set[str]:
    """What the store's ref objects reach: each tag's release and its blobs, and the tag
    event. A ref is the truth for readers, and after a crash between writing a ref and
    committing its index rows it is ahead of the index, so it is a root of its own."""
    marked: set[str] = set()
    for ref in store.tag_refs():
        marked.update(d for d in (ref.digest, ref.event) if d)
        try:
            release = store.load_release(Digest.parse(ref.digest))
        except ArtifactError:
            continue  # a release already gone: `kiln verify` names the dangling tag
        marked.update(str(blob.digest) for _, blob in release.blob_refs())
    return marked


def _mark(conn: Connection, policy: GcPolicy, now: float) -> _Marks:
    cutoff = now - policy.min_age_s
    roots = {d for (d,) in conn.execute(select(TagRow.digest))}
    roots |= {
        d
        for (d,) in conn.execute(
            select(TagHistoryRow.digest).where(TagHistoryRow.at >= now - policy.history_grace_s)
        )
    }
    roots |= {
        d
        for (d,) in conn.execute(
            select(ManifestRow.digest).where(ManifestRow.indexed_at >= cutoff)
        )
    }
    recent_runs = conn.execute(
        select(RunRow.id, RunRow.summary, RunRow.record_digest).where(
            RunRow.started_at >= now - policy.run_grace_s
        )
    ).all()
    for _, summary, _ in recent_runs:
        roots |= set(_run_releases(summary))
    recent_keys = {
        k
        for (k,) in conn.execute(
            select(RunItemRow.hlo_key).where(
                RunItemRow.run_id.in_([r[0] for r in recent_runs]),
                RunItemRow.hlo_key.is_not(None),
            )
        )
    }
    kept_rows = conn.execute(
        select(BlobRow.digest, BlobRow.kind, BlobRow.created_at, BlobRow.touched_at).where(
            BlobRow.kind.in_(ALWAYS_KEPT_KINDS)
            | (BlobRow.created_at >= cutoff)
            | (BlobRow.touched_at >= cutoff)
        )
    ).all()
    young = {r.digest for r in kept_rows if max(r.created_at, r.touched_at or 0.0) >= cutoff}
    manifests = {d for (d,) in conn.execute(select(ManifestRow.digest))}
    roots |= young  # a release put or referenced lately is kept whole
    roots &= manifests
    marked: set[str] = set(roots)
    for (blob,) in conn.execute(
        select(ManifestBlobRow.blob_digest).where(ManifestBlobRow.manifest_digest.in_(roots))
    ):
        marked.add(blob)
    marked |= {r.digest for r in kept_rows}
    swept_compilations = []
    for row in conn.execute(select(CompilationRow.__table__)).all():  # type: ignore[arg-type]
        used = row.hlo_key in recent_keys or row.executable_digest in marked
        if used or row.created_at >= cutoff:
            marked.update(
                d
                for d in (
                    row.record_digest,
                    row.hlo_digest,
                    row.executable_digest,
                    row.log_digest,
                )
                if d
            )
        else:
            swept_compilations.append(row.id)
    return _Marks(
        frozenset(marked), frozenset(manifests), frozenset(roots), tuple(swept_compilations)
    )


def _young(store: Store, info: BlobInfo, cutoff: float) -> bool:
    """Written after `cutoff`, asked again now: a put since the listing may have rewritten it."""
    current = store.backend.stat(info.digest)
    return current is not None and current.modified_at >= cutoff


def _run_releases(summary: str) -> list[str]:
    try:
        value = json.loads(summary)
    except (TypeError, json.JSONDecodeError):
        return []
    releases = value.get("releases", []) if isinstance(value, dict) else []
    return [r["digest"] for r in releases if isinstance(r, dict) and "digest" in r]


@dataclass(frozen=True)
class GcReport:
    blobs_deleted: int
    bytes_freed: int
    manifests_deleted: int
    compilations_deleted: int
    spared: int = 0  # planned, but a writer used it before the sweep (or it was gone)

    def to_json(self) -> dict[str, int]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class _Unindexed:
    blobs: tuple[BlobInfo, ...]
    manifests: int
    compilations: int


def execute_gc(store: Store, plan: GcPlan) -> GcReport:
    """Apply a plan in batches; each re-marks under the write lock (see the module doc)."""
    batches = [
        plan.delete[i : i + SWEEP_BATCH] for i in range(0, len(plan.delete), SWEEP_BATCH)
    ] or [()]
    compilations = set(plan.compilations)
    deleted = freed = manifests = swept = 0
    for batch in batches:
        unindexed = _unindex(store, plan.policy, batch, compilations)
        compilations = set()
        manifests += unindexed.manifests
        swept += unindexed.compilations
        n, size = _delete_blobs(store, unindexed.blobs)
        deleted += n
        freed += size
    store.backend.clean_temp()
    return GcReport(deleted, freed, manifests, swept, len(plan.delete) - deleted)


def _unindex(
    store: Store, policy: GcPolicy, batch: tuple[BlobInfo, ...], compilations: set[int]
) -> _Unindexed:
    """Under the lock: mark again, drop what is still garbage from the index."""
    with write_transaction(store.engine, exclusive=True) as conn:
        now = time.time()
        marks = _mark(conn, policy, now)
        by_ref = _ref_marks(store)
        doomed = tuple(
            b
            for b in batch
            if str(b.digest) not in marks.marked
            and str(b.digest) not in by_ref
            and not _young(store, b, now - policy.min_age_s)
        )
        ids = sorted(compilations & set(marks.swept_compilations))
        if ids:
            keys = [
                k
                for (k,) in conn.execute(
                    select(CompilationRow.hlo_key).where(CompilationRow.id.in_(ids))
                )
            ]
            conn.execute(delete(CompilationRow).where(CompilationRow.id.in_(ids)))
            alive = {k for (k,) in conn.execute(select(CompilationRow.hlo_key))}
            dead = [k for k in keys if k not in alive]
            if dead:
                conn.execute(delete(RecipeRow).where(RecipeRow.hlo_key.in_(dead)))
        digests = [str(b.digest) for b in doomed]
        if digests:
            conn.execute(delete(ManifestBlobRow).where(ManifestBlobRow.manifest_digest.in_(digests)))
            conn.execute(delete(ManifestRow).where(ManifestRow.digest.in_(digests)))
            conn.execute(delete(BlobRow).where(BlobRow.digest.in_(digests)))
    return _Unindexed(doomed, len(marks.manifests & set(digests)), len(ids))


def _delete_blobs(store: Store, doomed: tuple[BlobInfo, ...]) -> tuple[int, int]:
    """Under the lock: delete each blob no writer re-indexed since `_unindex`."""
    if not doomed:
        return 0, 0
    deleted = freed = 0
    with write_transaction(store.engine, exclusive=True) as conn:
        revived = {
            d
            for (d,) in conn.execute(
                select(BlobRow.digest).where(BlobRow.digest.in_([str(b.digest) for b in doomed]))
            )
        }
        for info in doomed:
            if str(info.digest) not in revived and store.backend.delete(info.digest):
                deleted += 1
                freed += info.size
    return deleted, freed
