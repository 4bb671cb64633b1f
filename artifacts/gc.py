"""`kiln gc`: mark what tags, recent history and recent runs reach; sweep the rest.

Planning and executing are separate: the plan is what `--dry-run` prints. Execution removes
index rows before blobs, so an interruption never leaves a row pointing at a missing blob.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from artifacts.backends import BlobInfo
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


def plan_gc(store: Store, policy: GcPolicy = GcPolicy(), now: float | None = None) -> GcPlan:
    """Decide what to delete without deleting anything."""
    now = time.time() if now is None else now
    with store.engine.connect() as conn:
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
                select(ManifestRow.digest).where(ManifestRow.indexed_at >= now - policy.min_age_s)
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
        manifests = {d for (d,) in conn.execute(select(ManifestRow.digest))}
        roots &= manifests
        marked: set[str] = set(roots)
        for (blob,) in conn.execute(
            select(ManifestBlobRow.blob_digest).where(ManifestBlobRow.manifest_digest.in_(roots))
        ):
            marked.add(blob)
        marked |= {
            d
            for (d,) in conn.execute(
                select(BlobRow.digest).where(
                    (BlobRow.kind.in_(ALWAYS_KEPT_KINDS))
                    | (BlobRow.created_at >= now - policy.min_age_s)
                )
            )
        }
        swept_compilations = []
        for row in conn.execute(select(CompilationRow.__table__)).all():  # type: ignore[arg-type]
            used = row.hlo_key in recent_keys or row.executable_digest in marked
            if used or row.created_at >= now - policy.min_age_s:
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

    delete_list: list[BlobInfo] = []
    kept = kept_bytes = 0
    for info in store.backend.iter_blobs():
        if str(info.digest) in marked or _young(store, info, now - policy.min_age_s):
            kept += 1
            kept_bytes += info.size
        else:
            delete_list.append(info)
    return GcPlan(
        tuple(delete_list),
        tuple(sorted((manifests - roots) & {str(b.digest) for b in delete_list})),
        tuple(swept_compilations),
        kept,
        kept_bytes,
    )


def _young(store: Store, info: BlobInfo, cutoff: float) -> bool:
    """Written after `cutoff` (by file mtime, or the object's modification time on S3)."""
    modified_at = getattr(store.backend, "modified_at", None)
    if modified_at is not None:
        when = modified_at(info.digest)
        return when is not None and when >= cutoff
    path_of = getattr(store.backend, "path_of", None)
    if path_of is None:
        return True  # unknown age: never sweep what might be in flight
    try:
        return os.stat(path_of(info.digest)).st_mtime >= cutoff
    except FileNotFoundError:
        return False


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

    def to_json(self) -> dict[str, int]:
        return self.__dict__.copy()


def execute_gc(store: Store, plan: GcPlan) -> GcReport:
    """Apply a plan: index rows first, then blobs."""
    digests = [str(b.digest) for b in plan.delete]
    with write_transaction(store.engine) as conn:
        if plan.compilations:
            ids = list(plan.compilations)
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
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            conn.execute(delete(ManifestBlobRow).where(ManifestBlobRow.manifest_digest.in_(chunk)))
            conn.execute(delete(ManifestRow).where(ManifestRow.digest.in_(chunk)))
            conn.execute(delete(BlobRow).where(BlobRow.digest.in_(chunk)))
    freed = 0
    for info in plan.delete:
        if store.backend.delete(info.digest):
            freed += info.size
    clean = getattr(store.backend, "clean_temp", None)
    if clean is not None:
        clean()
    return GcReport(len(plan.delete), freed, len(plan.manifests), len(plan.compilations))
