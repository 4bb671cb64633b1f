"""A full disk during `kiln compile` (issue 9): one line naming the full filesystem, no
traceback, nothing half-written, the run marked `interrupted`; after space is freed a rerun
finishes. A real store on a real, small tmpfs (mounted here: this needs root)."""

from __future__ import annotations

import errno
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts.diskspace import DiskFull, disk_full_error, is_disk_full
from tests.helpers.disk_helpers import small_tmpfs
from tests.helpers.pipeline_helpers import kiln, micro_model, runs, write_spec

TMPFS_SIZE = 8 << 20
ROOM_LEFT = 600 << 10  # enough to start the run, too little for the micro model's graphs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", TMPFS_SIZE) as mount:
        yield mount


@pytest.mark.slow  # two real compiles: about 30 s on an idle 2-core machine
def test_disk_full_is_one_line_naming_the_device_and_the_run_is_interrupted(
    small_disk: Path, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "micro.yaml", micro_model(), targets=["cpu"])
    store = small_disk / "store"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (TMPFS_SIZE - ROOM_LEFT))

    proc = kiln("compile", spec, "--workers", "1", store=store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln: error: no space left on device while compiling: ")
    assert f"(tmpfs mounted at {small_disk}: " in last and " free of 8.0 MiB)" in last
    assert list((store / "tmp").iterdir()) == []  # no half-written blob left behind

    filler.unlink()  # space is freed: the rerun finishes and the stopped run says so
    again = kiln("compile", spec, "--workers", "1", "--json", store=store)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["failed"] == 0
    first, second = runs(store)
    assert first["status"] == "interrupted" and second["status"] == "ok"
    verified = kiln("verify", "--json", store=store)
    assert verified.returncode == 0, verified.stdout


def test_what_counts_as_a_full_disk(tmp_path: Path) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    # SQLite's vague "disk I/O error" is a full disk only where the disk is nearly full.
    assert not is_disk_full(sqlite3.OperationalError("disk I/O error"), [tmp_path])
    error = disk_full_error(
        OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), [], "testing"
    )
    assert isinstance(error, DiskFull)
    assert str(error).startswith(f"no space left on device while testing: {tmp_path / 'x'} (")
    assert " mounted at " in str(error) and " free of " in str(error)
