"""The index on a real PostgreSQL: gc, concurrent writers from many processes, the CLI, and
errors that hide credentials. (tests/artifacts/test_index.py and
tests/artifacts/test_leases.py run on both engines too.)"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.errors import StoreIndexError
from artifacts.store import Store
from artifacts.verify import verify_store

# The gc tests, collected again here: `store` and `make_release` use PostgreSQL in this module.
from tests.artifacts.test_gc import (  # noqa: F401
    test_dry_run_plan_changes_nothing,
    test_grace_periods,
    test_untagged_release_is_swept_and_tagged_kept,
    test_young_blobs_are_never_swept,
)
from tests.helpers.store_helpers import TAG, worker_command
from tests.servers import pg_server as pg_module
from tests.servers.pg_server import PgFixture, free_port

WORKERS = 6
MOVES = 4


@pytest.fixture
def index_kind() -> str:
    return "postgres"


def test_processes_share_one_postgres_index(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers race the first open (migrations), identical blobs and releases, and one tag."""
    store = tmp_path / "store"
    go = tmp_path / "go"
    monkeypatch.setenv("KILN_INDEX_URL", pg_url)
    procs = [
        subprocess.Popen(
            worker_command(
                "tagger",
                "--store",
                str(store),
                "--worker",
                str(i),
                "--moves",
                str(MOVES),
                "--go",
                str(go),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(WORKERS)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    reports = []
    deadline = time.monotonic() + 120
    for p in procs:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["shared_release"] for r in reports}) == 1

    with Store.open(str(store), pg_url) as s:
        assert verify_store(s).problems == ()
        events = s.history(TAG)
        assert len(events) == WORKERS * MOVES
        chain = sorted(events, key=lambda e: e.at)
        assert chain[0].previous is None
        for before, after in itertools.pairwise(chain):
            assert after.previous == before.digest
        assert str(s.resolve(TAG).digest) == chain[-1].digest
    seen = {(e.reason, e.digest, e.previous, e.at) for e in events}  # floats round-trip exactly
    for r in reports:
        for m in r["moves"]:
            assert (m["reason"], m["digest"], m["previous"], m["at"]) in seen


def test_cli_against_postgres(store, store_dir: Path, index_url: str, make_release) -> None:  # type: ignore[no-untyped-def]
    digest = make_release(tag="m:prod")
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_STORE", "KILN_INDEX_URL")}
    base = [sys.executable, "-m", "kiln", "--store", str(store_dir), "--index", index_url]
    verify = subprocess.run([*base, "verify", "--json"], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["bad"] == []
    shown = subprocess.run(
        [*base, "show", "m:prod", "--json"], capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0 and json.loads(shown.stdout)["digest"] == str(digest)


def test_unreachable_server_is_one_clear_error(tmp_path: Path, pg_server: PgFixture) -> None:
    url = f"postgresql+psycopg://kiln:s3cret@127.0.0.1:{free_port()}/kiln"
    with pytest.raises(StoreIndexError) as caught:
        Store.open(str(tmp_path / "store"), url)
    message = str(caught.value)
    assert "s3cret" not in message and "***@127.0.0.1" in message
    assert "refused" in message.lower() or "connect" in message.lower()


def test_missing_server_fails_rather_than_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_module, "server_bin_dir", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y postgresql"):
        pg_module.require_postgres()
