"""Read a safetensors blob into numpy arrays without torch (zero-copy views of the bytes)."""

from __future__ import annotations

import json
import struct

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


def load_safetensors(data: bytes, where: str = "weights") -> dict[str, np.ndarray]:
    """Arrays named as in the file, sharing one writable copy of the bytes."""
    if len(data) < 8:
        raise LoaderError(f"{where}: not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise LoaderError(f"{where}: safetensors header length {header_len} exceeds the file")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoaderError(f"{where}: bad safetensors header: {exc}") from None
    base = 8 + header_len
    buffer = memoryview(bytearray(data))  # writable: DLPack cannot export read-only arrays
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _dtype(info["dtype"], f"{where}: {name}")
        array = np.frombuffer(buffer[base + start : base + end], dtype=dtype)
        out[name] = array.reshape(info["shape"])
    return out
