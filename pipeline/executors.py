"""Where graph work runs: a local process pool (spawn: torch and fork do not mix)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol


class Executor(Protocol):
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future: ...  # type: ignore[type-arg]

    def shutdown(self) -> None: ...


class LocalPool:
    """A spawn-context process pool; workers keep torch/jaxlib loaded between tasks."""

    def __init__(self, workers: int) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn")
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:  # type: ignore[type-arg]
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(kind: str, workers: int) -> Executor:
    if kind == "local":
        return LocalPool(workers)
    if kind == "ray":  # imported only here: ray is an optional extra
        from pipeline.ray_executor import RayExecutor  # noqa: PLC0415

        return RayExecutor(workers)
    from pipeline.errors import PipelineError  # noqa: PLC0415

    raise PipelineError(f"unknown executor {kind!r}; choose local or ray")
