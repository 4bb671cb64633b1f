"""gc against concurrent writers (issue 9), as real processes, many times each.

A gc worker process and a writer process share the store and its index. Each try makes a
fresh old, untagged release (the garbage gc plans to free), then runs gc's plan and sweep
and the writer's steps in one of several interleavings: the writer wholly between plan and
sweep (what lost data before: gc swept from its stale plan), a step on each side of the
sweep, or both running freely at random offsets. After every try nothing is lost: `verify`
is clean and every tagged release's manifest and blobs read back verified.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from artifacts.digest import Digest, canonical_json
from artifacts.index.db import write_transaction
from artifacts.index.models import BlobRow, ManifestRow, TagRow
from artifacts.records import COMPILATION_MEDIA_TYPE
from artifacts.reindex import index_compilation
from artifacts.store import Store
from artifacts.verify import verify_store
from tests.conftest import build_release
from tests.helpers.race_workers import Worker
from tests.helpers.store_helpers import blob_path
from tests.servers.pg_server import both_indexes

OLD_S = 30 * 86400  # far past gc's default 7-day grace and 1-hour minimum age
TAG_TRIES = 21
COMPILE_TRIES = 24


@pytest.fixture
def workers(store: Store, store_dir: Path, index_url: str) -> Iterator[tuple[Worker, Worker]]:
    store.tag(str(store.put_release(build_release(store, seqs=(1,)))), "m:prod")
    gc = Worker("gc", str(store_dir), index_url)
    writer = Worker("writer", str(store_dir), index_url)
    try:
        yield gc, writer
    finally:
        gc.close()
        writer.close()


def old_release(store: Store, store_dir: Path, n: int, with_compilations: bool = False) -> Digest:
    """A release (blobs of its own) that looks a month old and that no tag or run reaches."""
    release = build_release(store, seqs=(1000 + n,), weights=f"weights {n}".encode() * 1000)
    digest = store.put_release(release)
    digests = [str(digest), *(str(ref.digest) for _, ref in release.blob_refs())]
    with write_transaction(store.engine) as conn:
        for graph in release.graphs if with_compilations else ():
            record = {
                "mediaType": COMPILATION_MEDIA_TYPE,
                "hlo_key": graph.hlo_key,
                "status": "ok",
                "compiler": graph.compiler.name,
                "compiler_version": graph.compiler.version,
                "flags": list(graph.compiler.flags),
                "target": release.target,
                "hlo_digest": str(graph.hlo.digest),
                "executable_digest": str(graph.executable.digest),
                "executable_format": graph.format,
                "log_digest": str(graph.log.digest) if graph.log else None,
                "seconds": 1.0,
                "created_at": time.time() - OLD_S,
            }
            put = store.backend.put(io.BytesIO(canonical_json(record)))
            index_compilation(conn, str(put.digest), record)
            digests.append(str(put.digest))
    backdate(store, store_dir, digests)
    return digest


def backdate(store: Store, store_dir: Path, digests: list[str]) -> None:
    old = time.time() - OLD_S
    for digest in digests:
        os.utime(blob_path(store_dir, digest), (old, old))
    ages = {"created_at": old}
    if hasattr(BlobRow, "touched_at"):  # index revision 0004 on
        ages["touched_at"] = old
    with write_transaction(store.engine) as conn:
        conn.execute(update(BlobRow).where(BlobRow.digest.in_(digests)).values(**ages))
        conn.execute(
            update(ManifestRow).where(ManifestRow.digest.in_(digests)).values(indexed_at=old)
        )


def assert_nothing_lost(store: Store) -> None:
    report = verify_store(store, workers=2)
    assert report.ok, report.problems
    with store.engine.connect() as conn:
        tags = conn.execute(select(TagRow.name, TagRow.tag, TagRow.digest)).all()
    for name, tag, digest in tags:
        release = store.load_release(Digest.parse(digest))  # verified read
        for _, ref in release.blob_refs():
            assert len(store.read_bytes(ref.digest)) == ref.size, f"{name}:{tag}"


@both_indexes
def test_gc_against_a_concurrent_tag_move(  # type: ignore[no-untyped-def]
    store: Store, store_dir: Path, workers
) -> None:
    """`kiln tag` of an old untagged release while gc runs: the tag wins and keeps the release,
    or gc freed it first and the tag fails naming it; never a tag on a missing release."""
    gc, writer = workers
    rng = random.Random(9)
    outcomes: dict[str, int] = {}
    for n in range(TAG_TRIES):
        target = old_release(store, store_dir, n)
        order = ("between", "racing-sweep", "free")[n % 3]
        move = {"op": "tag", "source": str(target), "tag": "m:prod"}
        if order == "between":
            assert str(target) in gc.ask({"op": "plan"})["planned"]
            moved = writer.ask(move)
            gc.ask({"op": "sweep"})
        elif order == "racing-sweep":
            assert str(target) in gc.ask({"op": "plan"})["planned"]
            gc.send({"op": "sweep"})
            moved = writer.ask(move)
            gc.receive()
        else:
            gc.send({"op": "plan-sweep", "pause": rng.uniform(0, 0.05)})
            time.sleep(rng.uniform(0, 0.1))
            moved = writer.ask(move)
            gc.receive()
        if "move" in moved:
            assert store.resolve("m:prod").digest == target
            outcomes["tagged"] = outcomes.get("tagged", 0) + 1
        else:
            assert order != "between", moved
            assert moved["type"] in ("InvalidReference", "ReferenceNotFound"), moved
            assert str(target)[7:19] in moved["error"] and not store.has_blob(target)
            outcomes["freed first"] = outcomes.get("freed first", 0) + 1
        assert_nothing_lost(store)
    assert outcomes.get("tagged", 0) >= TAG_TRIES // 3
    print(f"tag race outcomes over {TAG_TRIES} tries: {outcomes}")


@both_indexes
def test_gc_against_a_concurrent_compile_reusing_old_blobs(  # type: ignore[no-untyped-def]
    store: Store, store_dir: Path, workers
) -> None:
    """A compile that re-puts an old release's blobs (or reuses them as direct hits) and
    publishes a new tagged release while gc runs: it always publishes, and nothing it
    references is freed."""
    gc, writer = workers
    rng = random.Random(10)
    freed_first = 0
    for n in range(COMPILE_TRIES):
        hit = n % 2 == 1
        target = old_release(store, store_dir, n, with_compilations=hit)
        reuse = {"op": "reuse", "release": str(target), "hit": hit}
        publish = {"op": "publish", "tag": "m:again"}
        order = ("all-between", "reuse-then-sweep", "reuse-first", "free")[(n // 2) % 4]
        if order == "all-between":
            assert str(target) in gc.ask({"op": "plan"})["planned"]
            answers = [writer.ask(reuse), writer.ask(publish)]
            gc.ask({"op": "sweep"})
        elif order == "reuse-then-sweep":
            assert str(target) in gc.ask({"op": "plan"})["planned"]
            answers = [writer.ask(reuse)]
            gc.ask({"op": "sweep"})
            answers.append(writer.ask(publish))
        elif order == "reuse-first":
            answers = [writer.ask(reuse)]
            gc.ask({"op": "plan"})
            gc.ask({"op": "sweep"})
            answers.append(writer.ask(publish))
        else:
            gc.send({"op": "plan-sweep", "pause": rng.uniform(0, 0.05)})
            time.sleep(rng.uniform(0, 0.1))
            answers = [writer.ask(reuse), writer.ask(publish)]
            gc.receive()
        if "error" in answers[0] and order == "free":
            # gc freed the old release before the compile looked: nothing to reuse, no loss
            assert answers[0]["type"] in ("BlobNotFound", "ReferenceNotFound", "ArtifactError")
            freed_first += 1
        else:
            assert all("error" not in a for a in answers), (order, hit, answers)
            published = Digest.parse(answers[1]["published"])
            assert store.resolve("m:again").digest == published
        assert_nothing_lost(store)
    assert freed_first <= COMPILE_TRIES // 4


def test_a_put_refreshes_an_old_blob_s_age(store: Store, store_dir: Path) -> None:
    """Putting bytes the store already holds makes the blob young again for gc."""
    from artifacts.gc import GcPolicy, plan_gc  # noqa: PLC0415

    put = store.put_bytes(b"old bytes")
    backdate(store, store_dir, [str(put.digest)])
    assert put.digest in {b.digest for b in plan_gc(store, GcPolicy()).delete}
    store.put_bytes(b"old bytes")
    os.utime(blob_path(store_dir, put.digest), (time.time() - OLD_S,) * 2)  # S3 keeps its date
    assert put.digest not in {b.digest for b in plan_gc(store, GcPolicy()).delete}



def test_a_compile_claims_the_old_blobs_it_reuses(store: Store, store_dir: Path) -> None:
    """`kiln compile` refreshes the age of its direct hits and known weights before it
    starts (gc then spares them until the release is published), and recompiles a hit whose
    blob gc took already."""
    from artifacts.gc import GcPolicy, plan_gc  # noqa: PLC0415
    from pipeline.jobs import CompiledGraph, GraphJob, ModelPlan  # noqa: PLC0415
    from pipeline.run import claim_reused  # noqa: PLC0415
    from pipeline.spec import Bucket  # noqa: PLC0415

    old = store.load_release(old_release(store, store_dir, 1, with_compilations=True))
    weights = old.source.weights[0]
    hits = {}
    for i, graph in enumerate(old.graphs):
        bucket = Bucket(1, 32 + i)
        job = GraphJob("m", graph.kind, bucket, "cpu", (), "xla-cpu", "1", "f32", f"d{i}")
        hits[job] = CompiledGraph(
            graph.hlo_key, str(graph.hlo.digest), graph.hlo.size, graph.signature,
            str(graph.executable.digest), graph.executable.size, graph.format, "xla-cpu", "1",
            (), 1.0, None, None,
        )
    plan = ModelPlan(None, "arch", "wkey",  # type: ignore[arg-type]
                     ((str(weights.digest), weights.size, "model.safetensors"),),
                     list(hits), dict(hits))
    doomed = {str(b.digest) for b in plan_gc(store, GcPolicy()).delete}
    assert str(weights.digest) in doomed and str(old.graphs[0].executable.digest) in doomed

    claim_reused(store, [plan])
    doomed = {str(b.digest) for b in plan_gc(store, GcPolicy()).delete}
    assert not doomed & {str(weights.digest), *(h.executable_digest for h in hits.values())}
    assert plan.weights is not None and len(plan.direct_hits) == len(hits)

    store.backend.delete(old.graphs[0].executable.digest)  # as a gc sweep would have
    claim_reused(store, [plan])
    assert len(plan.direct_hits) == len(hits) - 1 and plan.weights is not None


def test_sweep_in_small_batches_frees_everything_planned(  # type: ignore[no-untyped-def]
    store: Store, store_dir: Path, monkeypatch
) -> None:
    from artifacts import gc  # noqa: PLC0415

    monkeypatch.setattr(gc, "SWEEP_BATCH", 2)
    kept = store.put_release(build_release(store, seqs=(1,)))
    store.tag(str(kept), "m:prod")
    doomed = [old_release(store, store_dir, n, with_compilations=True) for n in range(3)]
    plan = gc.plan_gc(store, gc.GcPolicy())
    assert len(plan.delete) > 2 * gc.SWEEP_BATCH and len(plan.compilations) == 3
    report = gc.execute_gc(store, plan)
    assert (report.blobs_deleted, report.manifests_deleted, report.compilations_deleted) == (
        len(plan.delete), 3, 3,
    )
    assert report.spared == 0 and not any(store.has_blob(d) for d in doomed)
    assert_nothing_lost(store)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--grace-days", "-1"), ("--grace-days", "nan"), ("--min-age-hours", "-5")],
)
def test_gc_refuses_a_negative_or_nan_duration(store_dir: Path, option: str, value: str) -> None:
    from click.testing import CliRunner  # noqa: PLC0415

    from kiln.cli import cli  # noqa: PLC0415

    Store.open(str(store_dir)).close()
    result = CliRunner().invoke(cli, ["--store", str(store_dir), "gc", option, value])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {option} {float(value)}: must be a finite number >= 0"
    ]
