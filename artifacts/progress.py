"""A minimal progress line on stderr: redrawn on a terminal, sparse lines otherwise."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """Call with (done, total); prints at most a few times a second."""

    def __init__(self, label: str, enabled: bool = True, stream=None) -> None:  # type: ignore[no-untyped-def]
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._interval = 0.1 if self.tty else 5.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < self._interval:
            return
        self._last = now
        percent = 100.0 * done / total if total else 100.0
        text = f"{self.label}: {done}/{total} ({percent:.0f}%)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done >= total else ""))
        elif done >= total or done == 1 or now - self._last >= 0:
            self.stream.write(text + "\n")
        self.stream.flush()
