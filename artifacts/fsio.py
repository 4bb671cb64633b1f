"""Durable local writes and whole reads: the one temp-fsync-rename and the one read loop.

Standard library only: the loader (`runtime_loader`) imports this, and must stay light.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

TEMP_SUFFIX = ".incomplete"
CHUNK_SIZE = 1 << 20


def fsync_dir(path: Path | str) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path | str, target: Path | str) -> None:
    """Rename `source` over `target` (atomic on one filesystem) and fsync the folder, so the
    new name survives a crash. `source`'s bytes must already be on disk."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


class AtomicFile:
    """A temp file that becomes its final path whole, or not at all.

    `with AtomicFile(folder) as f: write to f.file; f.commit(path)` fsyncs the bytes, sets
    `mode`, renames the temp file over `path` and fsyncs `path`'s folder. Leaving the block
    without `commit` (an exception, a refusal) removes the temp file. The final path may be
    chosen only after writing (a blob is named by the hash of what was written). OSErrors
    of these steps (not of the caller's writes) go through `on_error` when it is given.
    With `durable=False` nothing is fsynced: still all or nothing, but a crash may lose the
    file (for hints that are cheap to recompute).
    """

    def __init__(
        self,
        folder: Path | str,
        *,
        prefix: str = "",
        suffix: str = TEMP_SUFFIX,
        mode: int = 0o644,
        on_error: Callable[[OSError], BaseException] | None = None,
        durable: bool = True,
    ) -> None:
        self._folder = Path(folder)
        self._durable = durable
        self._prefix = prefix
        self._suffix = suffix
        self._mode = mode
        self._on_error = on_error
        self._committed = False
        self.file: IO[bytes]
        self.tmp: Path

    def __enter__(self) -> AtomicFile:
        with _translated(self._on_error):
            fd, name = tempfile.mkstemp(dir=self._folder, prefix=self._prefix, suffix=self._suffix)
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb", buffering=0)
        return self

    def commit(self, path: Path | str) -> None:
        """fsync, chmod, rename over `path`, fsync its folder."""
        path = Path(path)
        with _translated(self._on_error):
            if self._durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, self._mode)
            if self._durable:
                replace_durably(self.tmp, path)
            else:
                os.replace(self.tmp, path)
            self._committed = True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._committed:
            return
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@contextmanager
def _translated(on_error: Callable[[OSError], BaseException] | None) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if on_error is None:
            raise
        raise on_error(exc) from None


def write_atomic(
    path: Path | str,
    data: bytes,
    *,
    tmp_dir: Path | str | None = None,
    suffix: str = TEMP_SUFFIX,
    mode: int = 0o644,
    durable: bool = True,
) -> None:
    """Replace `path` with `data`: readers see the old bytes or the new, never a mix; durable
    (fsynced) unless `durable=False`. The temp file is in `tmp_dir` (same filesystem) or
    beside `path` as `.NAME.*`."""
    path = Path(path)
    prefix = "" if tmp_dir is not None else f".{path.name}."
    folder = tmp_dir or path.parent
    with AtomicFile(folder, prefix=prefix, suffix=suffix, mode=mode, durable=durable) as out:
        write_all(out.file, data)
        out.commit(path)


def write_all(out: IO[bytes], data: bytes | bytearray | memoryview) -> None:
    """Write everything to an unbuffered file. Such a write may be short (a disk that is
    nearly full takes what fits and says so only in the count): write the rest, so that a
    full disk raises ENOSPC instead of leaving fewer bytes than were handed over."""
    view = memoryview(data).cast("B")
    while view:
        written = out.write(view)
        view = view[written or 0 :]


def read_full(stream: IO[bytes], view: memoryview) -> int:
    """Fill `view` from the stream unless it ends first; returns the bytes read. Uses
    `readinto` where the stream has it (no copy), else `read`."""
    readinto = getattr(stream, "readinto", None)
    filled = 0
    while filled < len(view):
        if readinto is not None:
            n = readinto(view[filled:]) or 0
        else:
            data = stream.read(len(view) - filled)
            n = len(data)
            view[filled : filled + n] = data
        if not n:
            break
        filled += n
    return filled


def iter_chunks(stream: IO[bytes], size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """The stream's bytes as chunks of up to `size`, read into one reused buffer: each
    chunk is valid only until the next is asked for."""
    view = memoryview(bytearray(size))
    readinto = getattr(stream, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(view) or 0
            chunk = view[:n]
        else:
            chunk = memoryview(stream.read(size))
            n = len(chunk)
        if not n:
            return
        yield chunk


def read_all(stream: IO[bytes], size: int = CHUNK_SIZE) -> bytes:
    """Everything left in the stream, read in chunks of `size` (so that a verifying reader
    sees its end and checks it)."""
    parts = []
    while chunk := stream.read(size):
        parts.append(chunk)
    return b"".join(parts)
