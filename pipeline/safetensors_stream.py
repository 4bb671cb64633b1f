"""Write safetensors files as streams, one tensor at a time (no torch, no whole-file bytes).

The header (names, dtypes, shapes, offsets) is computed first from what each tensor will be;
then each tensor's bytes are produced only when the reader reaches them, so a store put
hashes and writes a multi-GB file while holding one tensor.

The layout is safetensors' own (tensors by dtype, widest first, then by name; a compact JSON
header padded with spaces) with one difference: the header is padded to 64 bytes, not 8, and
tensors whose size is not a multiple of 64 bytes come last. So every other tensor starts
64-byte aligned, and a memory-mapped blob can be handed to XLA's CPU client without a copy
(runtime_loader/executors/xla_cpu.py). Any safetensors reader reads the file.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# safetensors' Dtype enum order; files list tensors by it, descending.
DTYPE_ORDER = (
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
)
ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as it will be written: safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_BYTES[self.dtype]


ALIGNMENT = 64


def ordered(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """Entries in file order: safetensors' order, tensors of unaligned size moved last."""
    return sorted(
        entries,
        key=lambda e: (e.nbytes % ALIGNMENT != 0, -DTYPE_ORDER.index(e.dtype), e.name),
    )


def header_bytes(entries: Sequence[TensorEntry]) -> bytes:
    """The 8-byte length and the padded JSON header for `entries` (already `ordered`)."""
    header: dict[str, object] = {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # the data starts aligned
    return struct.pack("<Q", len(text)) + text


def file_size(entries: Sequence[TensorEntry]) -> int:
    return len(header_bytes(ordered(entries))) + sum(e.nbytes for e in entries)


def split(entries: Sequence[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive groups (by name) of at most `max_bytes` of data each; a bigger tensor
    gets a group of its own. One group when everything fits."""
    groups: list[list[TensorEntry]] = []
    size = 0
    for e in sorted(entries, key=lambda e: e.name):
        if not groups or (size + e.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return groups


ReadTensor = Callable[[TensorEntry], memoryview]
Done = Callable[[TensorEntry], None]


class SafetensorsStream(io.RawIOBase):
    """A readable stream of one safetensors file; `read_tensor(entry)` is called once per
    tensor, in file order, when the reader reaches it, and must return exactly
    `entry.nbytes` bytes (little-endian, C order); `done(entry)`, when given, once those
    bytes have been read."""

    def __init__(
        self, entries: Sequence[TensorEntry], read_tensor: ReadTensor, done: Done | None = None
    ) -> None:
        self.entries = ordered(entries)
        self._read_tensor = read_tensor
        self._done = done
        self._current = memoryview(header_bytes(self.entries))
        self._pos = 0
        self._next = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        while self._pos >= len(self._current):
            if self._next >= len(self.entries):
                return 0
            entry = self.entries[self._next]
            self._next += 1
            data = memoryview(self._read_tensor(entry)).cast("B")
            if len(data) != entry.nbytes:
                raise ValueError(
                    f"tensor {entry.name}: {len(data)} bytes for {entry.dtype}"
                    f"{list(entry.shape)}, expected {entry.nbytes}"
                )
            self._current, self._pos = data, 0
        n = min(len(out), len(self._current) - self._pos)
        out[:n] = self._current[self._pos : self._pos + n]
        self._pos += n
        if self._pos >= len(self._current):
            self._current, self._pos = memoryview(b""), 0
            if self._done is not None and 0 < self._next <= len(self.entries):
                self._done(self.entries[self._next - 1])
        return n
