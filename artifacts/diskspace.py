"""Telling a full disk apart from other I/O errors, and naming the device that is full."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from artifacts.errors import DiskFull
from artifacts.table import human_size

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20  # SQLite's "disk I/O error" counts as a full disk below this


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's wrapped driver error
        if isinstance(orig, BaseException):
            yield orig
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, paths: Iterable[str | Path] = ()) -> bool:
    """True for ENOSPC/EDQUOT and SQLite's "database or disk is full"; SQLite's vaguer
    "disk I/O error" only when one of `paths` is on a filesystem with under 1 MiB free."""
    vague = False
    for error in _chain(exc):
        if isinstance(error, DiskFull):
            return True
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return True
        text = str(error).lower()
        if "database or disk is full" in text:
            return True
        vague = vague or "disk i/o error" in text
    return vague and any(
        (free := free_bytes(p)) is not None and free < NEARLY_FULL_BYTES for p in paths
    )


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on `path`'s filesystem."""
    try:
        st = os.statvfs(_existing(Path(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: str | Path) -> tuple[str, str]:
    """(device, mount point) of the filesystem `path` is on, from /proc/mounts if present."""
    target = _existing(Path(path)).resolve()
    mount = target
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[1] == str(mount):
                    device = fields[0]  # the last mount of a point is the visible one
    except OSError:
        pass
    return device, str(mount)


def describe(path: str | Path) -> str:
    """`PATH (DEVICE mounted at MOUNT: FREE free of SIZE)`."""
    device, mount = mount_of(path)
    try:
        st = os.statvfs(_existing(Path(path)))
        space = (
            f": {human_size(st.f_bavail * st.f_frsize)} free of"
            f" {human_size(st.f_blocks * st.f_frsize)}"
        )
    except OSError:
        space = ""
    return f"{path} ({device} mounted at {mount}{space})"


def disk_full_error(exc: BaseException, paths: Iterable[str | Path], doing: str) -> DiskFull:
    """A one-line DiskFull for `exc`: the file it names, else the fullest of `paths`."""
    if type(exc) is DiskFull:
        return exc
    named = next(
        (e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None
    )
    candidates = [Path(p) for p in paths]
    if named is not None:
        where = Path(os.fsdecode(named))
    elif candidates:
        where = min(candidates, key=lambda p: free_bytes(p) or 0)
    else:
        return DiskFull(f"no space left on device while {doing}; free some space and retry")
    return DiskFull(
        f"no space left on device while {doing}: {describe(where)}; free space there"
        " (or move the store) and retry"
    )
