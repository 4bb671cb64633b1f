"""A compile farm in miniature: four `kiln compile` processes on one spec, against one S3 store
(SeaweedFS) and one PostgreSQL index. Leases make every graph compile exactly once; a worker
killed mid-compile leaves a lease that expires, and the others finish its work.

Real tracing (torch-xla) and real compiles (xla-cpu) of a tiny BERT (4 graphs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import ProgrammingError

from artifacts.index.models import CompilationRow, LeaseRow
from tests.helpers.model_helpers import TINY_BERT
from tests.helpers.pipeline_helpers import REPO, kiln_env, write_spec
from tests.servers.s3_server import S3Fixture

pytestmark = pytest.mark.slow

PROCESSES = 4
GRAPHS = 4


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    model = {
        "name": "tiny-bert",
        "task": "encoder",
        "source": {"seed": 0, "config": TINY_BERT},
        "buckets": {"batch": [1, 2], "seq": [16, 32]},  # 4 graphs
    }
    return write_spec(tmp_path / "farm.yaml", model, targets=["cpu"])


@pytest.fixture
def farm(s3_server: S3Fixture, pg_url: str) -> Iterator[tuple[str, str]]:
    """(store URL, index URL): a fresh S3 prefix and a fresh PostgreSQL database."""
    yield s3_server.new_url("farm"), pg_url


def _env(index_url: str, ttl: float | None = None) -> dict[str, str]:
    env = kiln_env()  # keeps the AWS_* variables that point at SeaweedFS
    env["KILN_INDEX_URL"] = index_url
    env["OMP_NUM_THREADS"] = "1"  # four processes share a small machine
    if ttl is not None:
        env["KILN_LEASE_TTL"] = str(ttl)
    return env


def _start(spec: Path, store_url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`kiln compile --json` in its own process group (so a kill takes its pool workers too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "compile", str(spec), "--store", store_url,
         "--workers", "1", "--json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["failed"] == 0 and report["jobs"] == GRAPHS, report
    return report


def _ok_compilations(index_url: str) -> dict[str, int]:
    engine = create_engine(index_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(CompilationRow.hlo_key, func.count())
                .where(CompilationRow.status == "ok")
                .group_by(CompilationRow.hlo_key)
            ).all()
    finally:
        engine.dispose()
    return {key: count for key, count in rows}


def _leases(index_url: str) -> list[tuple[str, str]]:
    engine = create_engine(index_url)
    try:
        with engine.connect() as conn:
            return [(r.key, r.owner) for r in conn.execute(select(LeaseRow.key, LeaseRow.owner))]
    except ProgrammingError:  # no schema yet: the first `kiln` has not opened the index
        return []
    finally:
        engine.dispose()


def _verify(store_url: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "verify", "--store", store_url, "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["bad"] == [] and report["unindexed"] == []


def _in_group(owner: str, pgid: int) -> bool:
    """Whether a lease owner (host:pid:random) is a process of group `pgid`."""
    try:
        return os.getpgid(int(owner.split(":")[-2])) == pgid
    except (ProcessLookupError, ValueError, IndexError):
        return False


def test_four_processes_compile_every_graph_once(spec: Path, farm: tuple[str, str]) -> None:
    store_url, index_url = farm
    env = _env(index_url)
    procs = [_start(spec, store_url, env) for _ in range(PROCESSES)]
    reports = [_finish(p) for p in procs]

    keys = {i["hlo_key"] for r in reports for i in r["items"]}
    assert len(keys) == GRAPHS
    assert _ok_compilations(index_url) == dict.fromkeys(keys, 1)
    assert sum(r["compiled"] for r in reports) == GRAPHS
    for r in reports:  # what a process did not compile, another one did: an HLO hit
        assert r["compiled"] + r["hlo_hits"] + r["direct_hits"] == GRAPHS
    assert _leases(index_url) == []
    _verify(store_url, env)


def test_killed_worker_lease_expires_and_others_finish(spec: Path, farm: tuple[str, str]) -> None:
    store_url, index_url = farm
    victim = _start(spec, store_url, _env(index_url, ttl=3))
    try:
        # Freeze the victim while it holds a compile lease and has recorded nothing for it.
        deadline = time.monotonic() + 180
        held: str | None = None
        while held is None:
            assert victim.poll() is None, "the victim finished before it could be stopped"
            assert time.monotonic() < deadline, "the victim never started compiling"
            mine = [k for k, o in _leases(index_url) if _in_group(o, victim.pid)]
            if mine:
                os.killpg(victim.pid, signal.SIGSTOP)
                still = [k for k, o in _leases(index_url) if _in_group(o, victim.pid)]
                done = _ok_compilations(index_url)
                held = next((k for k in still if k.removeprefix("compile:") not in done), None)
                if held is None:
                    os.killpg(victim.pid, signal.SIGCONT)
            time.sleep(0.02)
        compiled_before = sum(_ok_compilations(index_url).values())
        survivors = [_start(spec, store_url, _env(index_url)) for _ in range(PROCESSES - 1)]
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    reports = [_finish(p) for p in survivors]

    keys = {i["hlo_key"] for r in reports for i in r["items"]}
    assert len(keys) == GRAPHS and held.removeprefix("compile:") in keys
    assert _ok_compilations(index_url) == dict.fromkeys(keys, 1)  # still exactly once
    assert sum(r["compiled"] for r in reports) == GRAPHS - compiled_before
    assert _leases(index_url) == []  # the expired lease was taken over, then released
    _verify(store_url, _env(index_url))
