"""Eight real processes write one fresh store at once: overlapping blobs, identical and own
releases, and forty moves of the same tag. Nothing may error, and the tag history must be
one unbroken chain."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

from artifacts.store import Store
from tests.helpers.store_helpers import (
    SHARED_SEEDS,
    SHARED_SIZE,
    TAG,
    blob_path,
    kiln,
    seeded_digest,
    worker_command,
)

WORKERS = 8
MOVES = 5


def _start_workers(store: Path, go: Path) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            worker_command("tagger", "--store", str(store), "--worker", str(i),
                           "--moves", str(MOVES), "--go", str(go)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(WORKERS)
    ]
    # Release them together once every interpreter is up, so the store's first open races too.
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    return procs


def test_eight_processes_share_blobs_and_move_one_tag(tmp_path: Path) -> None:
    store = tmp_path / "store"
    procs = _start_workers(store, tmp_path / "go")
    reports = []
    deadline = time.monotonic() + 120
    for p in procs:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert p.returncode == 0, err
        assert "Traceback" not in err and "Error" not in err, err
        reports.append(json.loads(out.strip().splitlines()[-1]))

    # Identical content from eight writers is one blob; the identical release is one manifest.
    for seed in SHARED_SEEDS:
        assert blob_path(store, seeded_digest(seed, SHARED_SIZE)).is_file()
    assert len({r["shared_release"] for r in reports}) == 1
    own = {r["worker"]: r["release"] for r in reports}
    assert len(set(own.values())) == WORKERS

    verify = kiln(store, "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["bad"] == [] and report["unindexed"] == []

    history = kiln(store, "history", TAG, "--json")
    assert history.returncode == 0, history.stderr
    events = json.loads(history.stdout)
    assert len(events) == WORKERS * MOVES

    # Every move a worker saw is in the history, exactly as the worker saw it.
    seen = {(e["reason"], e["digest"], e["previous"], e["at"]) for e in events}
    for r in reports:
        assert len(r["moves"]) == MOVES
        for m in r["moves"]:
            assert (m["reason"], m["digest"], m["previous"], m["at"]) in seen
            assert m["digest"] == own[r["worker"]]

    # Oldest first, each move's previous is the digest the move before it set.
    chain = sorted(events, key=lambda e: e["at"])
    assert [e["at"] for e in chain] == sorted({e["at"] for e in chain}), "two moves at one time"
    assert chain[0]["previous"] is None
    for before, after in itertools.pairwise(chain):
        assert after["previous"] == before["digest"], (before, after)
    assert events[0] == chain[-1]  # `kiln history` lists newest first

    with Store.open(str(store)) as s:
        assert str(s.resolve(TAG).digest) == chain[-1]["digest"]
    shown = json.loads(kiln(store, "show", TAG, "--json").stdout)
    assert shown["digest"] == chain[-1]["digest"]
