"""The SQL index: migrations, schema checks, reindex from blobs alone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, select, text

from artifacts.errors import StoreIndexError
from artifacts.index import db
from artifacts.index.db import HEAD_REVISION, current_revision, make_engine, write_transaction
from artifacts.index.models import Base, BlobRow
from artifacts.reindex import reindex
from artifacts.store import Store
from tests.servers.pg_server import both_indexes


@both_indexes
def test_migrations_match_models(store_dir: Path, index_url: str) -> None:
    Store.open(str(store_dir), index_url).close()
    engine = create_engine(index_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert current_revision(conn) == HEAD_REVISION
    engine.dispose()
    assert diff == []


def index_at_first_revision(index_url: str):  # type: ignore[no-untyped-def]
    """An engine on an index that the first Kiln made (revision 0001)."""
    engine = make_engine(index_url)
    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent.parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    return engine


@both_indexes
def test_upgrade_from_first_revision_keeps_rows(store_dir: Path, index_url: str) -> None:
    """An index made by the first Kiln (revision 0001) upgrades in place to head."""
    engine = index_at_first_revision(index_url)
    with engine.begin() as conn:
        conn.execute(
            BlobRow.__table__.insert(),  # type: ignore[attr-defined]
            {"digest": "sha256:" + "a" * 64, "size": 3, "kind": None, "created_at": time.time()},
        )
    engine.dispose()
    with Store.open(str(store_dir), index_url) as store, store.engine.connect() as conn:
        assert current_revision(conn) == HEAD_REVISION
        assert conn.execute(select(BlobRow.size)).scalars().all() == [3]
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


@both_indexes
def test_concurrent_opens_upgrade_an_old_index_once(store_dir: Path, index_url: str) -> None:
    """Processes that all find revision 0001 run the remaining migrations exactly once."""
    index_at_first_revision(index_url).dispose()
    code = (
        "import sys; from artifacts.store import Store; sys.stdin.readline();"
        f" Store.open({str(store_dir)!r}, {index_url!r}).close()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    time.sleep(1.0)  # all imported and waiting: release them together
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Store.open(str(store_dir), index_url) as store, store.engine.connect() as conn:
        assert current_revision(conn) == HEAD_REVISION


@both_indexes
def test_newer_schema_is_refused(store_dir: Path, index_url: str) -> None:
    with Store.open(str(store_dir), index_url) as store, write_transaction(store.engine) as conn:
        conn.execute(text("UPDATE alembic_version SET version_num='9999'"))
    with pytest.raises(StoreIndexError, match="revision 9999, newer than this Kiln"):
        Store.open(str(store_dir), index_url)


def test_corrupt_index_is_named(store_dir: Path) -> None:
    Store.open(str(store_dir)).close()
    index = store_dir / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreIndexError, match=rf"{index}.*corrupt.*kiln reindex"):
        Store.open(str(store_dir))


@both_indexes
def test_reindex_rebuilds_everything_from_blobs(  # type: ignore[no-untyped-def]
    store, store_dir: Path, index_url: str, index_kind: str, make_release
) -> None:
    first = make_release(tag="m:prod", seqs=(32,))
    second = make_release(tag="m:prod", seqs=(32, 64), flags=("-O2",))
    store.tag(str(first), "m:prod", reason="rollback")
    store.tag(str(second), "m:canary")
    before = store.history("m:prod")
    store.close()
    if index_kind == "sqlite":
        index = store_dir / "index.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        index.write_bytes(b"garbage")  # a corrupt index is replaced whole
    else:
        report = reindex(str(store_dir), index_url)  # a full index is cleared and refilled
        assert (report.releases, report.tags, report.tag_events) == (2, 2, 4)
        engine = create_engine(index_url)  # then a lost one is created from nothing
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    report = reindex(str(store_dir), index_url)
    assert (report.releases, report.tags, report.tag_events) == (2, 2, 4)
    with Store.open(str(store_dir), index_url) as rebuilt:
        assert rebuilt.resolve("m:prod").digest == first
        assert rebuilt.resolve("m:canary").digest == second
        after = rebuilt.history("m:prod")
        assert [(m.digest, m.previous, m.reason) for m in after] == [
            (m.digest, m.previous, m.reason) for m in before
        ]
