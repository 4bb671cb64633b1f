"""Killing `kiln compile` (SIGTERM from `timeout`/CI/Kubernetes, or SIGKILL) takes its pool
workers with it (issue 9, item 9), and a SIGTERM'd run is recorded as `interrupted`.

A real `kiln compile --workers 2` of two micro Llamas (real torch-xla tracing, real xla-cpu
compiles), killed while its two spawned workers are busy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.pipeline_helpers import REPO, kiln_env, micro_model, runs, write_spec

GONE_WITHIN_S = 5.0


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None if it no longer exists."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """{child pid: its start time} of every live child of `pid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None and info[1] == pid and info[0] != "Z":
                found[int(entry)] = info[2]
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(children: dict[int, int]) -> list[int]:
    """Those of `children` still running (a zombie has exited; a reused pid is another)."""
    alive = []
    for pid, started in children.items():
        info = _stat(pid)
        if info is not None and info[0] != "Z" and info[2] == started:
            alive.append(pid)
    return alive


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    # Two models: two trace tasks in flight, so both workers of the pool are started.
    return write_spec(
        tmp_path / "two.yaml", micro_model("first", 0), micro_model("second", 1), targets=["cpu"]
    )


@pytest.fixture
def compile_proc(spec: Path, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    env = kiln_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "compile", str(spec), "--store", str(tmp_path / "store"),
         "--workers", "2", "--json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # the test's clean-up can take the whole group
    )  # fmt: skip
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=30)


def _wait_for_workers(proc: subprocess.Popen[str]) -> dict[int, int]:
    """The pool's children once both workers run (plus the resource tracker)."""
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the pool never started two workers"
        children = _children(proc.pid)
        workers = [p for p in children if "spawn_main" in _cmdline(p)]
        if len(workers) >= 2:
            return children
        time.sleep(0.05)


def _assert_all_gone(children: dict[int, int]) -> float:
    start = time.monotonic()
    while _alive(children):
        left = [f"{p}: {_cmdline(p)[:120]}" for p in _alive(children)]
        assert time.monotonic() - start < GONE_WITHIN_S, f"still running: {left}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_sigterm_stops_the_workers_and_marks_the_run_interrupted(
    compile_proc: subprocess.Popen[str], tmp_path: Path
) -> None:
    children = _wait_for_workers(compile_proc)
    compile_proc.send_signal(signal.SIGTERM)
    _assert_all_gone(children)
    _, err = compile_proc.communicate(timeout=30)
    assert compile_proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "kiln: terminated (SIGTERM)"
    assert "Traceback" not in err
    (run,) = runs(tmp_path / "store")
    assert run["status"] == "interrupted" and run["finished_at"] is not None


def test_sigkill_of_the_parent_takes_the_workers_with_it(
    compile_proc: subprocess.Popen[str],
) -> None:
    children = _wait_for_workers(compile_proc)
    compile_proc.kill()
    compile_proc.wait(timeout=30)
    _assert_all_gone(children)


def test_a_worker_killed_like_the_oom_killer_does_fails_its_graphs_with_a_reason(
    compile_proc: subprocess.Popen[str],
) -> None:
    children = _wait_for_workers(compile_proc)
    victim = next(p for p in children if "spawn_main" in _cmdline(p))
    os.kill(victim, signal.SIGKILL)  # what the kernel's OOM killer sends
    out, err = compile_proc.communicate(timeout=120)
    assert compile_proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    report = json.loads(out)
    failed = [i for i in report["items"] if i["status"] == "failed"]
    assert failed and report["failed"] == len(failed) == report["jobs"] - report["compiled"]
    assert all("worker process died" in i["error"] for i in failed), failed
    assert all("out of memory" in i["error"] for i in failed)
    _assert_all_gone(children)
