"""Executors by executable format: the one place that maps a graph's ``format`` to the code
that runs it. Each module imports only numpy, ctypes and the standard library at import time
(jaxlib is imported when an xla-cpu executable is first used)."""

from __future__ import annotations

from collections.abc import Callable

from runtime_loader.errors import LoaderError
from runtime_loader.executors.base import Executable, Executor
from runtime_loader.executors.neff import NeffExecutor
from runtime_loader.executors.xla_cpu import XlaCpuExecutor

__all__ = ["EXECUTORS", "Executable", "Executor", "open_executor"]

EXECUTORS: dict[str, Callable[[], Executor]] = {
    XlaCpuExecutor.format: XlaCpuExecutor,
    NeffExecutor.format: NeffExecutor.open,
}


def open_executor(fmt: str) -> Executor:
    """The executor for `fmt`; LoaderError for a format nothing here runs, or one whose
    runtime is missing on this host."""
    opener = EXECUTORS.get(fmt)
    if opener is None:
        raise LoaderError(f"unknown executable format {fmt!r}")
    return opener()
