"""Where graph work runs: a local process pool (spawn: torch and fork do not mix)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0
TERMINATE_GRACE_S = 3.0


class Executor(Protocol):
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future: ...  # type: ignore[type-arg]

    def shutdown(self) -> None: ...

    def terminate(self) -> None:
        """Stop now: cancel queued work and kill running work (an interrupted run)."""
        ...


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the worker exits when `parent_pid` dies, even by SIGKILL.

    A pool worker otherwise blocks on its call queue forever (it holds both ends of the pipe,
    so the parent's death gives it no EOF). Linux: the kernel kills the worker
    (PR_SET_PDEATHSIG; it fires when the thread that spawned the worker exits, which is why
    LocalPool is driven from one long-lived thread). Elsewhere, and as a fallback, a thread
    polls the parent pid. Ctrl-C is left to the parent, which terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # died before the prctl took effect
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="kiln parent watch", daemon=True
    ).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


class LocalPool:
    """A spawn-context process pool; workers keep torch/jaxlib loaded between tasks.

    Workers exit when this process dies (see `die_with_parent`). Submit from the thread that
    will outlive the work (the main thread): on Linux workers are tied to their spawner."""

    def __init__(self, workers: int) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, workers),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )
        self._terminated = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:  # type: ignore[type-arg]
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        if not self._terminated:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def terminate(self) -> None:
        """SIGTERM every worker (SIGKILL after a grace period) and drop queued work."""
        self._terminated = True
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        manager = getattr(self._pool, "_executor_manager_thread", None)
        # Shut down first, while the manager thread still has its wakeup pipe open (CPython
        # 3.11 races on that pipe when the manager closes it after a worker dies).
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        if manager is not None:  # it sees the dead workers and exits
            manager.join(TERMINATE_GRACE_S)


def make_executor(kind: str, workers: int) -> Executor:
    if kind == "local":
        return LocalPool(workers)
    if kind == "ray":  # imported only here: ray is an optional extra
        from pipeline.ray_executor import RayExecutor  # noqa: PLC0415

        return RayExecutor(workers)
    from pipeline.errors import PipelineError  # noqa: PLC0415

    raise PipelineError(f"unknown executor {kind!r}; choose local or ray")
