"""A real, small tmpfs to fill up: the set-up shared by the disk-full tests. Mounting needs
root; without it (or where mounting is refused) the test is skipped, saying why."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextmanager
def small_tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """`folder` (created) as a tmpfs of `size` bytes, lazily unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    proc = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize_tmpfs(folder: Path, size: int) -> None:
    """Give a mounted tmpfs a new size (more room, as after freeing space)."""
    proc = _mount("-o", f"remount,size={size}", str(folder))
    assert proc.returncode == 0, proc.stderr
