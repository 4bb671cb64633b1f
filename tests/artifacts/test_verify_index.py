"""`kiln verify` checks the SQLite index file itself, not only the rows it reads (issue 9,
item 11), and `--workers` must be at least 1. Real stores, real SQLite files garbled on disk."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from artifacts.store import Store
from artifacts.verify import check_index, verify_store
from tests.helpers.store_helpers import kiln, make_release


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with Store.open(str(root)) as store:
        for i in range(3):
            store.tag(str(make_release(store, f"m{i}", [f"weights {i}".encode()])), f"m{i}:v1")
    return root


def _garble_index_page(db: Path, index_name: str) -> None:
    """Overwrite the root page of one SQL index (not a table: plain scans still read fine)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND name = ?", (index_name,)
    ).fetchone()
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes([0x5A]) * page_size)


def test_verify_reports_a_garbled_index_and_points_at_reindex(store_root: Path) -> None:
    db = store_root / "index.db"
    _garble_index_page(db, "sqlite_autoindex_blobs_1")
    proc = kiln(store_root, "verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD index")]
    assert len(bad) == 1, proc.stdout
    assert bad[0].startswith(f"BAD index {db}: ")
    assert bad[0].endswith("; rebuild it from the blobs with `kiln reindex`")
    assert "index damaged" in proc.stdout.splitlines()[-1]
    assert "Traceback" not in proc.stderr

    as_json = kiln(store_root, "verify", "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["index_problems"] and report["bad"] == []

    # The remedy it names works: after a reindex the store verifies clean.
    assert kiln(store_root, "reindex").returncode == 0
    again = kiln(store_root, "verify", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["index_problems"] == []


def test_a_sound_index_passes_the_check(store_root: Path) -> None:
    with Store.open(str(store_root)) as store:
        assert check_index(store) == ()
        report = verify_store(store, workers=2)
    assert report.ok and report.index_problems == () and report.checked > 0


def test_an_unreadable_table_is_an_index_problem_not_a_traceback(store_root: Path) -> None:
    db = store_root / "index.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tags'").fetchone()
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes([0xFF]) * page_size)
    proc = kiln(store_root, "verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(
        line.startswith(f"BAD index {db}: ") and line.endswith("`kiln reindex`")
        for line in proc.stdout.splitlines()
    ), proc.stdout


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_verify_refuses_fewer_than_one_worker(store_root: Path, workers: str) -> None:
    proc = kiln(store_root, "verify", "--workers", workers)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--workers" in proc.stderr and "x>=1" in proc.stderr
