"""The SQL index: migrations, schema checks, reindex from blobs alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from artifacts.errors import StoreIndexError
from artifacts.index.models import Base
from artifacts.reindex import reindex
from artifacts.store import Store


def test_migrations_match_models(store_dir: Path) -> None:
    Store.open(str(store_dir)).close()
    engine = create_engine(f"sqlite:///{store_dir / 'index.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_newer_schema_is_refused(store_dir: Path) -> None:
    Store.open(str(store_dir)).close()
    with sqlite3.connect(store_dir / "index.db") as db:
        db.execute("UPDATE alembic_version SET version_num='9999'")
    with pytest.raises(StoreIndexError, match="revision 9999, newer than this Kiln"):
        Store.open(str(store_dir))


def test_corrupt_index_is_named(store_dir: Path) -> None:
    Store.open(str(store_dir)).close()
    index = store_dir / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreIndexError, match=rf"{index}.*corrupt.*kiln reindex"):
        Store.open(str(store_dir))


def test_reindex_rebuilds_everything_from_blobs(store, store_dir: Path, make_release) -> None:  # type: ignore[no-untyped-def]
    first = make_release(tag="m:prod", seqs=(32,))
    second = make_release(tag="m:prod", seqs=(32, 64), flags=("-O2",))
    store.tag(str(first), "m:prod", reason="rollback")
    store.tag(str(second), "m:canary")
    before = store.history("m:prod")
    store.close()
    index = store_dir / "index.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"garbage")  # a corrupt index is replaced whole
    report = reindex(str(store_dir))
    assert (report.releases, report.tags, report.tag_events) == (2, 2, 4)
    with Store.open(str(store_dir)) as rebuilt:
        assert rebuilt.resolve("m:prod").digest == first
        assert rebuilt.resolve("m:canary").digest == second
        after = rebuilt.history("m:prod")
        assert [(m.digest, m.previous, m.reason) for m in after] == [
            (m.digest, m.previous, m.reason) for m in before
        ]
