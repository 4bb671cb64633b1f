"""Run a command so that it cannot outlive the process that started it.

``python process_guard.py PARENT_PID COMMAND...`` is started as the leader of a new process
group (``start_new_session``) and runs COMMAND in that group. When the parent dies (a worker
killed by the OOM killer, ``kill -9``, a pool shut down) the kernel sends the guard SIGTERM
(``PR_SET_PDEATHSIG``), and the guard kills the whole group: the compiler and every helper
it spawned. Without it a neuronx-cc started by a dead worker kept compiling for hours,
holding many GiB, after ``kiln compile`` had ended. The guard exits as COMMAND did (the
same code, or killed by the same signal), so the caller tells a crash (-9 is how the OOM
killer shows) from a failure.

Standard library only, run by path with ``-I``: it must start in well under a second in any
working directory, before and without Kiln's own imports. Linux only (prctl); elsewhere the
command simply runs in its group, as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]

    def kill_group(signum: int, frame: object) -> None:
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)
    signal.signal(signal.SIGINT, kill_group)
    _die_with_parent(parent)
    proc = subprocess.Popen(command)
    while True:
        try:
            returncode = proc.wait()
            break
        except InterruptedError:
            continue
    if returncode < 0:
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):  # these have no handler
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
