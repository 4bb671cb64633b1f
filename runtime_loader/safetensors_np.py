"""Read a safetensors blob into numpy arrays without torch (zero-copy views of the bytes)."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from runtime_loader.errors import LoaderError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _dtype(name: str, where: str) -> np.dtype:
    if name == "BF16":
        try:
            import ml_dtypes  # noqa: PLC0415
        except ImportError:
            raise LoaderError(f"{where}: bfloat16 weights need the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in _DTYPES:
        raise LoaderError(f"{where}: unsupported safetensors dtype {name}")
    return np.dtype(_DTYPES[name])


def read_header(data: Any, where: str = "weights") -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header) of a safetensors file's bytes."""
    if len(data) < 8:
        raise LoaderError(f"{where}: not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise LoaderError(f"{where}: safetensors header length {header_len} exceeds the file")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoaderError(f"{where}: bad safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise LoaderError(f"{where}: bad safetensors header: not an object")
    return 8 + header_len, header


def tensor_spans(data: Any, where: str = "weights") -> dict[str, tuple[int, int]]:
    """Each tensor's [start, end) byte range in the file."""
    base, header = read_header(data, where)
    return {
        name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


def load_safetensors(data: Any, where: str = "weights") -> dict[str, np.ndarray]:
    """Arrays named as in the file. A writable buffer (e.g. a copy-on-write mmap) is viewed
    in place; anything else is copied once (DLPack cannot export read-only arrays)."""
    base, header = read_header(data, where)
    view = memoryview(data)
    buffer = view if not view.readonly else memoryview(bytearray(view))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(buffer) - base:
            raise LoaderError(f"{where}: tensor {name} lies outside the file ({start}-{end})")
        dtype = _dtype(info["dtype"], f"{where}: {name}")
        array = np.frombuffer(buffer[base + start : base + end], dtype=dtype)
        out[name] = array.reshape(info["shape"])
    return out
