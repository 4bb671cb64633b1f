"""Leases on SQLite and PostgreSQL: one holder at a time, expiry takeover, heartbeats, release."""

from __future__ import annotations

import threading
import time

import pytest

from artifacts import leases
from artifacts.digest import canonical_json
from artifacts.index.db import write_transaction
from artifacts.records import COMPILATION_MEDIA_TYPE
from artifacts.reindex import index_compilation
from artifacts.store import Store
from pipeline.jobs import GraphJob
from pipeline.spec import Bucket
from pipeline.tasks import CompileOutcome, TracedJob, compile_graph
from tests.servers.pg_server import both_indexes

KEY = "compile:k1"


@both_indexes
def test_second_owner_is_refused_until_release(store: Store) -> None:
    assert leases.acquire(store, KEY, "a", ttl=30)
    assert not leases.acquire(store, KEY, "b", ttl=30)
    assert leases.acquire(store, KEY, "a", ttl=30)  # the holder renews
    assert leases.acquire(store, "compile:other", "b", ttl=30)  # keys are independent
    held = leases.holder(store, KEY)
    assert held is not None and held.owner == "a" and held.live
    assert not leases.release(store, KEY, "b")  # only the owner releases
    assert leases.release(store, KEY, "a")
    assert leases.holder(store, KEY) is None
    assert leases.acquire(store, KEY, "b", ttl=30)


@both_indexes
def test_expired_lease_is_taken_over(store: Store) -> None:
    assert leases.acquire(store, KEY, "a", ttl=0.3)
    first = leases.holder(store, KEY)
    time.sleep(0.4)
    assert leases.acquire(store, KEY, "b", ttl=30)
    taken = leases.holder(store, KEY)
    assert taken is not None and first is not None
    assert taken.owner == "b" and taken.acquired_at > first.acquired_at
    assert not leases.heartbeat(store, KEY, "a", ttl=30)  # the old holder learns it lost it
    assert not leases.release(store, KEY, "a")  # and cannot drop the new holder's lease
    assert leases.holder(store, KEY).owner == "b"  # type: ignore[union-attr]


@both_indexes
def test_heartbeats_keep_a_short_lease(store: Store) -> None:
    assert leases.acquire(store, KEY, "a", ttl=0.6)
    with leases.keep(store, KEY, "a", ttl=0.6) as kept:
        assert kept.interval == pytest.approx(0.2)
        for _ in range(8):  # 1.6 s: well past the ttl
            time.sleep(0.2)
            assert not leases.acquire(store, KEY, "b", ttl=30)
        held = leases.holder(store, KEY)
        assert held is not None and held.heartbeat_at > held.acquired_at
    assert not kept.lost.is_set()
    assert leases.holder(store, KEY) is None  # released on exit
    assert leases.acquire(store, KEY, "b", ttl=30)


@both_indexes
def test_lost_lease_is_noticed(store: Store) -> None:
    assert leases.acquire(store, KEY, "a", ttl=0.2)
    with leases.keep(store, KEY, "a", ttl=0.2, interval=0.5) as kept:  # beats too rarely
        time.sleep(0.3)
        assert leases.acquire(store, KEY, "b", ttl=30)
        assert kept.lost.wait(2)
    assert leases.holder(store, KEY).owner == "b"  # type: ignore[union-attr]


@both_indexes
def test_one_winner_among_racing_owners(store: Store) -> None:
    results: dict[str, bool] = {}
    go = threading.Barrier(8)

    def race(owner: str) -> None:
        with Store.open(store.backend.url, store.index_url) as own:
            go.wait()
            results[owner] = leases.acquire(own, KEY, owner, ttl=30)

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    assert leases.holder(store, KEY).owner == winners[0]  # type: ignore[union-attr]


@both_indexes
def test_waiter_gets_the_holders_result_or_the_lease(store: Store) -> None:
    assert leases.acquire(store, KEY, "a", ttl=30)
    result: list[str] = []
    timer = threading.Timer(0.5, result.append, args=("made by a",))
    timer.start()
    start = time.monotonic()
    got = leases.acquire_or_wait(store, KEY, "b", 30, lambda: result[0] if result else None, 0.1)
    assert got == "made by a" and time.monotonic() - start >= 0.4
    assert leases.holder(store, KEY).owner == "a"  # type: ignore[union-attr]

    threading.Timer(0.3, leases.release, args=(store, KEY, "a")).start()
    assert leases.acquire_or_wait(store, KEY, "b", 30, lambda: None, 0.1) is None
    assert leases.holder(store, KEY).owner == "b"  # type: ignore[union-attr]


def test_ttl_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(leases.TTL_ENV, raising=False)
    assert leases.lease_ttl() == leases.DEFAULT_TTL_S
    monkeypatch.setenv(leases.TTL_ENV, "2.5")
    assert leases.lease_ttl() == 2.5
    monkeypatch.setenv(leases.TTL_ENV, "soon")
    with pytest.raises(ValueError, match="KILN_LEASE_TTL"):
        leases.lease_ttl()


# -- compile_graph and the lease (no compiler runs: another "worker" records the result) ------
HLO_KEY = "hlo-key-1"


def _traced(store: Store) -> TracedJob:
    hlo = store.put_bytes(b"HloModule m", kind="hlo")
    job = GraphJob(
        "m", "encode", Bucket(1, 16), "cpu", (), "xla-cpu", "jaxlib-test", "float32", "direct-1"
    )
    return TracedJob(job, str(hlo.digest), hlo.size, HLO_KEY, {"parameters": []}, 0.0)


def _record(store: Store, traced: TracedJob, ok: bool) -> str | None:
    """What another worker's compile leaves: blobs, then the indexed compile record."""
    exe = store.put_bytes(b"executable", kind="executable") if ok else None
    log = store.put_bytes(b"compile log", kind="log")
    record = {
        "mediaType": COMPILATION_MEDIA_TYPE,
        "hlo_key": traced.hlo_key,
        "status": "ok" if ok else "failed",
        "compiler": "xla-cpu",
        "compiler_version": "jaxlib-test",
        "flags": [],
        "target": "cpu",
        "hlo_digest": traced.hlo_digest,
        "executable_digest": str(exe.digest) if exe else None,
        "executable_format": "xla-cpu" if ok else None,
        "log_digest": str(log.digest),
        "seconds": 1.0,
        "error": None if ok else "unsupported operator",
        "created_at": time.time(),
    }
    put = store.put_bytes(canonical_json(record), kind="compilation")
    with write_transaction(store.engine) as conn:
        index_compilation(conn, str(put.digest), record)
    return str(exe.digest) if exe else None


def _compile_while_held(
    store: Store, traced: TracedJob, ok: bool
) -> tuple[CompileOutcome, str | None]:
    """compile_graph while "other" holds the lease; "other" then records its result."""
    assert leases.acquire(store, f"compile:{HLO_KEY}", "other", ttl=30)
    outcome: list[CompileOutcome] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            compile_graph(store.backend.url, store.index_url, traced, 60.0)
        )
    )
    worker.start()
    time.sleep(0.8)
    assert worker.is_alive() and not outcome  # waiting on the lease, not compiling
    exe = _record(store, traced, ok)
    worker.join(10)
    assert outcome
    return outcome[0], exe


@both_indexes
def test_compile_waits_for_the_holders_success(store: Store) -> None:
    traced = _traced(store)
    outcome, exe = _compile_while_held(store, traced, ok=True)
    assert outcome.hit and outcome.compiled is not None and outcome.error is None
    assert outcome.compiled.executable_digest == exe
    assert leases.holder(store, f"compile:{HLO_KEY}").owner == "other"  # type: ignore[union-attr]


@both_indexes
def test_compile_shares_the_holders_failure(store: Store) -> None:
    traced = _traced(store)
    _record(store, traced, ok=False)  # an older failure is retried, not shared...
    outcome, _ = _compile_while_held(store, traced, ok=False)  # ...a concurrent one is
    assert not outcome.hit and outcome.compiled is None
    assert outcome.error is not None and "another worker" in outcome.error
    assert "unsupported operator" in outcome.error


@both_indexes
def test_compile_rechecks_after_acquiring(store: Store) -> None:
    traced = _traced(store)
    exe = _record(store, traced, ok=True)  # done after the runner looked, before the lease
    outcome = compile_graph(store.backend.url, store.index_url, traced, 60.0)
    assert outcome.hit and outcome.compiled is not None
    assert outcome.compiled.executable_digest == exe
    assert leases.holder(store, f"compile:{HLO_KEY}") is None  # released
