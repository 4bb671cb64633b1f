"""gc: mark from tags, recent tag history and recent runs; plan first; rows before blobs."""

from __future__ import annotations

import json
import time

from artifacts.gc import GcPolicy, execute_gc, plan_gc
from artifacts.index.db import write_transaction
from artifacts.index.models import RunRow, TagHistoryRow
from artifacts.verify import verify_store

NO_MIN_AGE = GcPolicy(history_grace_s=3600, run_grace_s=3600, min_age_s=0)


def test_untagged_release_is_swept_and_tagged_kept(store, make_release) -> None:  # type: ignore[no-untyped-def]
    kept = make_release(tag="m:prod", seqs=(32,))
    dropped = make_release(seqs=(32, 64), weights=b"other weights")
    orphan = store.put_bytes(b"orphan bytes")
    plan = plan_gc(store, NO_MIN_AGE)
    doomed = {str(b.digest) for b in plan.delete}
    assert str(dropped) in doomed and str(orphan.digest) in doomed
    assert str(kept) not in doomed
    assert plan.manifests == (str(dropped),)
    # blobs shared with the kept release (its seq32 graph, its log) survive
    kept_release = store.load_release(kept)
    assert not doomed & {str(ref.digest) for _, ref in kept_release.blob_refs()}
    assert plan.bytes == sum(b.size for b in plan.delete) > 0

    report = execute_gc(store, plan)
    assert report.bytes_freed == plan.bytes
    assert not store.has_blob(dropped)
    assert store.resolve("m:prod").digest == kept
    assert verify_store(store).ok
    assert plan_gc(store, NO_MIN_AGE).delete == ()


def test_dry_run_plan_changes_nothing(store, make_release) -> None:  # type: ignore[no-untyped-def]
    dropped = make_release()
    plan_gc(store, NO_MIN_AGE)
    assert store.has_blob(dropped)


def test_grace_periods(store, make_release) -> None:  # type: ignore[no-untyped-def]
    old = make_release(tag="m:prod", seqs=(32,))
    new = make_release(seqs=(64,), weights=b"w2")
    store.tag(str(new), "m:prod")
    by_run = make_release(seqs=(128,), weights=b"w3")
    with write_transaction(store.engine) as conn:
        conn.execute(
            RunRow.__table__.insert(),
            {  # type: ignore[attr-defined]
                "id": "run-1",
                "started_at": time.time(),
                "finished_at": time.time(),
                "status": "ok",
                "spec_digest": None,
                "host": "h",
                "user": "u",
                "summary": json.dumps({"releases": [{"ref": "m:x", "digest": str(by_run)}]}),
                "record_digest": None,
            },
        )
    doomed = {str(b.digest) for b in plan_gc(store, NO_MIN_AGE).delete}
    assert str(old) not in doomed  # in tag history within the grace period
    assert str(by_run) not in doomed  # used by a recent run
    with write_transaction(store.engine) as conn:
        conn.execute(TagHistoryRow.__table__.update().values(at=0.0))  # type: ignore[attr-defined]
        conn.execute(RunRow.__table__.update().values(started_at=0.0))  # type: ignore[attr-defined]
    doomed = {str(b.digest) for b in plan_gc(store, NO_MIN_AGE).delete}
    assert {str(old), str(by_run)} <= doomed and str(new) not in doomed


def test_young_blobs_are_never_swept(store, make_release) -> None:  # type: ignore[no-untyped-def]
    make_release()
    assert plan_gc(store, GcPolicy(min_age_s=3600)).delete == ()
