"""Waits that used to be silent say who they wait for and for how long (issue 9, item 10).

A real `kiln tag` against a real SQLite write lock held by another process, and real leases
on a real SQLite index, held by an owner whose process is gone (a killed compile)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import leases
from artifacts.index.lockwait import IndexLocked, write_lock_holder
from artifacts.store import Store
from tests.helpers.store_helpers import kiln, make_release

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin
conn.execute("ROLLBACK")
"""


def _hold_write_lock(db: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture
def tagged_store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with Store.open(str(root)) as store:
        store.tag(str(make_release(store, "m", [b"weights"])), "m:v1")
    return root


def _kiln_tag(root: Path, timeout_s: float) -> subprocess.Popen[str]:
    env = {**os.environ, "KILN_STORE": str(root), "KILN_INDEX_LOCK_TIMEOUT": str(timeout_s)}
    env.pop("KILN_INDEX_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "tag", "m:v1", "m:v2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_tag_against_a_held_write_lock_names_the_holder_then_gives_up(
    tagged_store: Path,
) -> None:
    holder = _hold_write_lock(tagged_store / "index.db")
    try:
        start = time.monotonic()
        proc = _kiln_tag(tagged_store, 3)
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        _release(holder)
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("kiln: waiting for the write lock on index ")
    assert f"held by pid {holder.pid} " in lines[0] and "giving up in " in lines[0]
    assert lines[-1].startswith(f"kiln: error: index {tagged_store / 'index.db'}: the write lock")
    assert f"held by pid {holder.pid} " in lines[-1] and "after 3s" in lines[-1]
    assert "KILN_INDEX_LOCK_TIMEOUT" in lines[-1] and "Traceback" not in err
    assert waited < 30
    assert kiln(tagged_store, "show", "m:v2").returncode != 0  # nothing was tagged


def test_tag_waits_out_loud_then_succeeds_when_the_lock_is_released(tagged_store: Path) -> None:
    holder = _hold_write_lock(tagged_store / "index.db")
    try:
        proc = _kiln_tag(tagged_store, 60)
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed while the lock is still held
        assert first.startswith("kiln: waiting for the write lock on index "), first
        assert f"held by pid {holder.pid} " in first
    finally:
        _release(holder)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("m:v2 -> sha256:")


def test_write_lock_holder_is_found_in_proc_locks(tmp_path: Path) -> None:
    if not Path("/proc/locks").exists():
        pytest.skip("no /proc/locks on this platform")
    with Store.open(str(tmp_path / "store")):
        pass
    db = tmp_path / "store" / "index.db"
    assert write_lock_holder(db) is None
    holder = _hold_write_lock(db)
    try:
        found = write_lock_holder(db)
    finally:
        _release(holder)
    assert found is not None and found.pid == holder.pid
    assert found.command.startswith(f"{sys.executable} -c import sqlite3")


def test_in_process_write_waits_raise_index_locked(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KILN_INDEX_LOCK_TIMEOUT", "0.5")
    with Store.open(str(tmp_path / "store")) as store:
        holder = _hold_write_lock(tmp_path / "store" / "index.db")
        try:
            with pytest.raises(IndexLocked, match="write lock is still held by pid"):
                store.put_bytes(b"x")
        finally:
            _release(holder)
        store.put_bytes(b"x")  # the busy timeout was restored, the connection still works


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_wait_names_owner_age_and_expiry_then_takes_over(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A holder that is alive but stopped heartbeating (e.g. frozen, or on another host)."""
    with Store.open(str(tmp_path / "store")) as store:
        frozen = f"{socket.gethostname()}:{os.getpid()}:frozen"
        assert leases.acquire(store, "compile:k", frozen, ttl=2.5)
        start = time.monotonic()
        got = leases.acquire_or_wait(
            store, "compile:k", leases.new_owner(), 60, lambda: None, poll=0.1, notify_every=1
        )
        waited = time.monotonic() - start
    assert got is None and 1.5 < waited < 10  # taken over once the lease expired
    lines = [x for x in capfd.readouterr().err.splitlines() if "waiting for lease" in x]
    assert 2 <= len(lines) <= 5  # once at the start, then about every second
    first = lines[0]
    assert first.startswith("kiln: waiting for lease compile:k, held by ")
    assert f"pid {os.getpid()} on {socket.gethostname()} for " in first
    assert re.search(r"last heartbeat \d+s ago; it expires in [0-3]s unless renewed$", first)
    assert "no longer running" not in first


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """What a rerun after a killed `kiln compile` meets: its worker's lease, far from expiry."""
    pid = _dead_pid()
    stale = f"{socket.gethostname()}:{pid}:deadbeef"
    with Store.open(str(tmp_path / "store")) as store:
        assert leases.acquire(store, "compile:k", stale, ttl=600)
        info = leases.holder(store, "compile:k")
        assert info is not None and info.live
        line = leases.describe_wait("compile:k", info)
        assert f"held by pid {pid} on {socket.gethostname()} (pid {pid} is no longer" in line
        seen: list[str] = []
        start = time.monotonic()
        got = leases.acquire_or_wait(
            store, "compile:k", leases.new_owner(), 60, lambda: None, notify=seen.append
        )
        assert got is None and time.monotonic() - start < 5 and seen == []
        taken = leases.holder(store, "compile:k")
        assert taken is not None and taken.owner != stale


def test_lease_wait_of_a_live_holder_does_not_call_it_stale(tmp_path: Path) -> None:
    seen: list[str] = []
    with Store.open(str(tmp_path / "store")) as store:
        assert leases.acquire(store, "compile:k", leases.new_owner(), ttl=60)
        done = leases.acquire_or_wait(
            store, "compile:k", "other:1:x", 60, lambda: "done", poll=0.05, notify=seen.append
        )
        assert done == "done" and seen == []  # ready at once: nothing to say
        calls = iter([None, None, "done"])
        leases.acquire_or_wait(
            store, "compile:k", "other:1:x", 60, lambda: next(calls), poll=0.05,
            notify=seen.append,
        )  # fmt: skip
    assert len(seen) == 1 and f"pid {os.getpid()} on " in seen[0]
    assert "no longer running" not in seen[0]
    assert re.search(r"expires in (59|60)s unless renewed$", seen[0])
