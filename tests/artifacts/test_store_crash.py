"""SIGKILL a writer in the middle of a large put, many times, at moments spread over the whole
put: the store must never show a partial blob, and `kiln verify` must stay clean."""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.store_helpers import (
    MiB,
    blob_files,
    blob_path,
    digest_of_path,
    file_sha256,
    kiln,
    seeded_digest,
    worker_command,
)

BLOB_SIZE = 64 * MiB  # ~0.5 s per put here; the 26 trials take ~35 s in all
KILL_TRIALS = 24
SEED = 20250101


@dataclass(frozen=True)
class Trial:
    seed: int
    completed: bool  # the writer reported success before it was killed (or it was not killed)
    put_seconds: float | None


def _run_writer(store: Path, seed: int, kill_after: float | None) -> Trial:
    """Start a writer; once it says `ready` (store open, put about to start), wait `kill_after`
    seconds and SIGKILL it, or let it finish when `kill_after` is None."""
    proc = subprocess.Popen(
        worker_command("write", "--store", str(store), "--seed", str(seed),
                       "--size", str(BLOB_SIZE)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    if kill_after is not None:
        time.sleep(kill_after)
        proc.kill()
    out, err = proc.communicate(timeout=60)
    lines = out.strip().splitlines()
    if kill_after is None:
        assert proc.returncode == 0, err
    if not lines:
        return Trial(seed, False, None)
    done = json.loads(lines[-1])
    assert done["digest"] == str(seeded_digest(seed, BLOB_SIZE))
    assert done["size"] == BLOB_SIZE
    return Trial(seed, True, done["seconds"])


def _check_store(store: Path, checked: set[str], trial: Trial) -> None:
    """No file under blobs/ is partial (each hashes to its name) and verify reports nothing."""
    for path in blob_files(store):
        name = digest_of_path(path)
        if name in checked:  # blobs are immutable once in place; rehash only new ones
            continue
        assert file_sha256(path) == name, f"partial or foreign file in blobs/: {path}"
        checked.add(name)
    verify = kiln(store, "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["bad"] == [] and report["problems"] == []
    expected = str(seeded_digest(trial.seed, BLOB_SIZE))
    if trial.completed:
        assert blob_path(store, expected).is_file()
        assert expected in checked
        assert expected not in report["unindexed"]  # the index row came before success


def test_sigkill_during_put_never_leaves_a_partial_blob(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rng = random.Random(SEED)
    checked: set[str] = set()

    first = _run_writer(store, seed=0, kill_after=None)
    assert first.completed and first.put_seconds is not None
    _check_store(store, checked, first)

    # One kill moment per slice of [0, 1.15 x put time], in shuffled order: the whole put
    # (stream, fsync, rename, index row) and a little past its end are all covered.
    span = 1.15 * first.put_seconds
    width = span / KILL_TRIALS
    delays = [rng.uniform(i * width, (i + 1) * width) for i in range(KILL_TRIALS)]
    rng.shuffle(delays)
    outcomes = []
    for i, delay in enumerate(delays, start=1):
        trial = _run_writer(store, seed=i, kill_after=delay)
        _check_store(store, checked, trial)
        outcomes.append((delay, trial))

    killed_early = [t for d, t in outcomes
                    if not t.completed and not blob_path(store, seeded_digest(t.seed, BLOB_SIZE))
                    .exists()]
    assert len(killed_early) >= KILL_TRIALS // 2, outcomes
    # Killed writers leave their temp file behind; only in tmp/, never under blobs/.
    assert list((store / "tmp").glob("*.incomplete"))

    # The store is still writable: redo a put that was killed, and it lands whole.
    again = _run_writer(store, seed=killed_early[0].seed, kill_after=None)
    assert again.completed
    _check_store(store, checked, again)
    assert file_sha256(blob_path(store, seeded_digest(again.seed, BLOB_SIZE))) == str(
        seeded_digest(again.seed, BLOB_SIZE)
    )
