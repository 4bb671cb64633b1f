"""Give back the resident pages of file-mapped tensors once their bytes have been used.

`from_pretrained` maps safetensors files into memory; the tensors are views of those maps,
and every page read stays resident (and counts in RSS) until the whole map goes away. After
a tensor's bytes are written to the store, `release()` drops its fully covered pages with
madvise(MADV_DONTNEED): for a private file mapping the kernel simply re-reads them from
the file if they are touched again. Memory that is not a file mapping (anonymous, heap) is
never touched. Linux only; elsewhere, and on any failure, it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from bisect import bisect_right

_MADV_DONTNEED = 4


class MappedPages:
    """The process's private, file-backed mappings, read once from /proc/self/maps (any file:
    a checkpoint in the Hugging Face cache is a blob without the .safetensors suffix)."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._libc = None
        try:
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[1][3] != "p" or not parts[5].startswith("/"):
                continue
            if parts[5].strip().endswith(" (deleted)"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            self._ranges.append((start, end))
        self._ranges.sort()
        self._starts = [r[0] for r in self._ranges]

    def _mapped(self, start: int, end: int) -> bool:
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ranges[i][0] <= start and end <= self._ranges[i][1]

    def release(self, address: int, nbytes: int) -> bool:
        """Drop the whole pages inside [address, address + nbytes) if they lie in one
        private file mapping; True when pages were dropped."""
        if self._libc is None or nbytes <= 0 or not self._mapped(address, address + nbytes):
            return False
        page = mmap.PAGESIZE
        lo = -(-address // page) * page
        hi = (address + nbytes) // page * page
        if hi <= lo:
            return False
        return self._libc.madvise(ctypes.c_void_p(lo), hi - lo, _MADV_DONTNEED) == 0


def supported() -> bool:
    return os.path.exists("/proc/self/maps")
