"""A release's weights: one or more cached safetensors blobs, memory-mapped, as one mapping
from tensor name to a numpy array viewing the map (nothing is read into Python bytes)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from runtime_loader.errors import LoaderError
from runtime_loader.executors.base import Executor
from runtime_loader.safetensors_np import load_safetensors, tensor_spans


class MappedWeights(Mapping[str, np.ndarray]):
    """Arrays over copy-on-write maps of the weight blobs. `release(name)` gives back the
    resident pages of a tensor whose bytes have been copied elsewhere (e.g. uploaded to the
    device): the kernel re-reads them from the file if it is read again."""

    def __init__(self, blobs: list[tuple[str, mmap.mmap]]) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._spans: dict[str, tuple[mmap.mmap, int, int]] = {}
        where_of: dict[str, str] = {}
        for where, mapped in blobs:
            arrays = load_safetensors(mapped, where)
            spans = tensor_spans(mapped, where)
            for name, array in arrays.items():
                if name in where_of:
                    raise LoaderError(
                        f"tensor {name} appears in two weight blobs: {where_of[name]} and {where}"
                    )
                where_of[name] = where
                self._arrays[name] = array
                self._spans[name] = (mapped, *spans[name])

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def release(self, name: str) -> None:
        mapped, start, end = self._spans[name]
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass


class BoundWeights:
    """A model's weights as its executor takes them, each bound on first use and then shared
    by every bucket; once the executor holds its own copy of one, the host's pages of it are
    given back."""

    def __init__(self, executor: Executor, weights: Mapping[str, np.ndarray]) -> None:
        self._executor = executor
        self._weights = weights
        self._bound: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        handle = self._bound.get(name)
        if handle is None:
            handle = self._bound[name] = self._executor.bind(self._weights[name])
            if isinstance(self._weights, MappedWeights) and self._executor.owns_copy(handle):
                self._weights.release(name)
        return handle
