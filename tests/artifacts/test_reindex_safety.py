"""reindex never drops what it cannot read, and loses no tag moved while it runs (issue 9)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from artifacts.gc import GcPolicy, plan_gc
from artifacts.index.models import ManifestRow, TagHistoryRow
from artifacts.store import Store
from tests.conftest import build_release
from tests.helpers.race_workers import Worker
from tests.helpers.store_helpers import KILN, blob_path, flip_byte, kiln
from tests.servers.pg_server import both_indexes

WEIGHTS = b"w" * 300_000


def kiln_at(store_dir: Path, index_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return kiln(store_dir, "--index", index_url, *args)


def tagged_store(store: Store) -> tuple[str, str]:
    """A release tagged m:prod (its weights nothing else holds); (manifest, tag event)."""
    digest = store.put_release(build_release(store, seqs=(32,), weights=WEIGHTS))
    store.tag(str(digest), "m:prod")
    with store.engine.connect() as conn:
        event = conn.execute(select(TagHistoryRow.event_digest)).scalar_one()
    return str(digest), event


@both_indexes
@pytest.mark.parametrize(("what", "offset"), [("manifest", 0), ("tag-event", 40)])
def test_reindex_refuses_to_drop_an_unreadable_document(  # type: ignore[no-untyped-def]
    store: Store, store_dir: Path, index_url: str, what: str, offset: int
) -> None:
    manifest, event = tagged_store(store)
    bad = manifest if what == "manifest" else event
    flip_byte(blob_path(store_dir, bad), offset)  # offset 0: no longer even starts with "{"

    result = kiln_at(store_dir, index_url, "reindex")
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: error")]
    assert len(errors) == 1 and errors[0].startswith("kiln: error: reindex:"), result.stderr
    assert bad in errors[0] and "--drop-unreadable" in errors[0]
    # the old index is untouched: the tag, its history and the release are all still known
    assert store.resolve("m:prod").digest.hex == manifest[7:]
    assert len(store.history("m:prod")) == 1
    plan = plan_gc(store, GcPolicy(min_age_s=0))
    weights = f"sha256:{hashlib.sha256(WEIGHTS).hexdigest()}"
    assert weights not in {str(b.digest) for b in plan.delete} and plan.manifests == ()

    dropped = kiln_at(store_dir, index_url, "reindex", "--drop-unreadable", "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert [s.split(":")[0:2] for s in json.loads(dropped.stdout)["skipped"]] == [
        bad.split(":")
    ]


def test_reindex_of_an_unopenable_index_refuses_too(store: Store, store_dir: Path) -> None:
    """No old index to ask: a damaged document that still looks like JSON is refused, and
    the index file is left as it was."""
    manifest, _ = tagged_store(store)
    store.close()
    flip_byte(blob_path(store_dir, manifest), 40)
    index = store_dir / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"garbage")
    result = kiln(store_dir, "reindex")
    assert result.returncode == 1 and manifest in result.stderr, result
    assert index.read_bytes() == b"garbage"
    assert not list(store_dir.glob("index.db.rebuild-*"))


def many_small_blobs(store_dir: Path, count: int) -> None:
    """`count` small JSON blobs written straight into the store's layout (quick to make, and
    each one reindex must open and read): they make a rebuild take a while."""
    for i in range(count):
        data = json.dumps({"filler": i, "pad": "x" * 200}).encode()
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        path = blob_path(store_dir, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@both_indexes
def test_reindex_racing_tag_moves_loses_nothing(  # type: ignore[no-untyped-def]
    store: Store, store_dir: Path, index_url: str
) -> None:
    """A writer process moves a tag over and over while `kiln reindex` runs (three times):
    every move it made is in the rebuilt index's history, and the tag is where it left it."""
    first = str(store.put_release(build_release(store, seqs=(32,))))
    second = str(store.put_release(build_release(store, seqs=(64,), weights=b"w2")))
    store.tag(first, "minilm:during")
    many_small_blobs(store_dir, 1500)
    writer = Worker("writer", str(store_dir), index_url)
    made = 1
    try:
        for run in range(3):
            stop = store_dir / f"stop-{run}"
            reindex = subprocess.Popen(
                [*KILN, "--store", str(store_dir), "--index", index_url, "reindex", "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.2)  # the writer starts while reindex is starting up and scanning
            writer.send({"op": "tag-until", "stop": str(stop), "tag": "minilm:during",
                         "targets": [second, first]})
            out, err = reindex.communicate(timeout=300)
            stop.touch()
            moves = writer.receive()["moves"]
            assert reindex.returncode == 0, err
            assert moves, "no tag move overlapped the reindex"
            made += len(moves)
            last = [second, first][(len(moves) - 1) % 2]
            with Store.open(str(store_dir), index_url) as fresh:
                history = fresh.history("minilm:during")
                assert len(history) == made, (run, len(history), made)
                assert str(fresh.resolve("minilm:during").digest) == last
                with fresh.engine.connect() as conn:
                    assert conn.execute(select(ManifestRow.digest)).all()
    finally:
        writer.close()
