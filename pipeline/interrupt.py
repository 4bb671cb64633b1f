"""SIGTERM (what `timeout`, CI runners and Kubernetes send) as an interruption, like Ctrl-C,
so that a run can stop its workers and mark its record `interrupted` before it exits."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM; raised in the main thread. `exit_code` is 143."""

    exit_code = SIGTERM_EXIT

    def __init__(self) -> None:
        super().__init__("terminated (SIGTERM)")


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills outright
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
