"""Store a model's weights as safetensors blobs, streamed tensor by tensor.

Tensors may be views of memory-mapped checkpoint files (as `from_pretrained` loads them):
the pages of each are given back once its bytes are written (pipeline.mapped_pages), so
host memory holds about one tensor, not the model.

Each tensor passes through an optional dtype cast and a per-tensor `transform(name, tensor)`
(a per-tensor rewrite) on its way into the store; neither the state dict nor a file's bytes
is ever held whole. Weights bigger than `max_blob_bytes` become several blobs
(model-0000N-of-0000M.safetensors), so pulls fetch and resume them independently.

The index maps a weights key to one blob: the safetensors file itself, or, for several, a
small "weights set" record listing them (artifacts.weights_set; told apart by its first
bytes: a safetensors file starts with an 8-byte header length, never with '{').
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from artifacts.digest import Digest
from artifacts.store import Store
from artifacts.weights_set import WEIGHTS_SET_PREFIX, WeightBlobs, weights_set_document
from pipeline.mapped_pages import MappedPages
from pipeline.safetensors_stream import SafetensorsStream, TensorEntry, split

if TYPE_CHECKING:
    import torch

MAX_BLOB_ENV = "KILN_WEIGHTS_BLOB_BYTES"
DEFAULT_MAX_BLOB_BYTES = 2 << 30
SINGLE_NAME = "model.safetensors"

Transform = Callable[[str, "torch.Tensor"], "torch.Tensor"]

_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def max_blob_bytes() -> int:
    return int(os.environ.get(MAX_BLOB_ENV) or DEFAULT_MAX_BLOB_BYTES)


def _prepare(
    name: str, tensor: torch.Tensor, dtype: torch.dtype | None, transform: Transform | None
) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return transform(name, tensor) if transform is not None else tensor


def _entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored as safetensors")
    return TensorEntry(name, _ST_DTYPES[dtype], tuple(int(d) for d in tensor.shape))


def plan_entries(
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    transform: Transform | None = None,
) -> list[TensorEntry]:
    """What each tensor will be once cast and transformed, found on the meta device (no
    data is touched)."""
    import torch  # noqa: PLC0415

    out = []
    for name, tensor in tensors.items():
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        out.append(_entry(name, _prepare(name, meta, dtype, transform)))
    return out


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (C order) through one host copy at most."""
    import torch  # noqa: PLC0415

    host = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(host.view(torch.uint8).numpy())  # type: ignore[arg-type]


def weights_stream(
    tensors: Mapping[str, torch.Tensor],
    entries: list[TensorEntry],
    dtype: torch.dtype | None = None,
    transform: Transform | None = None,
) -> SafetensorsStream:
    """A safetensors stream of `entries` (from plan_entries), each tensor cast, transformed
    and copied to the host only when the reader reaches it. Pages of file-mapped tensors are
    given back once their bytes are read."""
    pages = MappedPages()

    def read(entry: TensorEntry) -> memoryview:
        prepared = _prepare(entry.name, tensors[entry.name], dtype, transform)
        got = _entry(entry.name, prepared)
        if got != entry:
            raise ValueError(
                f"tensor {entry.name}: transform gave {got.dtype}{list(got.shape)} on real data"
                f" but {entry.dtype}{list(entry.shape)} on the meta device"
            )
        return tensor_bytes(prepared)

    def done(entry: TensorEntry) -> None:
        source = tensors[entry.name]
        # A contiguous tensor covers exactly its own bytes from data_ptr() on.
        if source.device.type == "cpu" and source.is_contiguous():
            pages.release(source.data_ptr(), source.numel() * source.element_size())

    return SafetensorsStream(entries, read, done)


def store_weights(
    store: Store,
    key: str,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    transform: Transform | None = None,
    blob_bytes: int | None = None,
) -> WeightBlobs:
    """Stream `tensors` (on any device) into the store as one or more safetensors blobs and
    record them under weights key `key`."""
    entries = plan_entries(tensors, dtype, transform)
    groups = split(entries, blob_bytes or max_blob_bytes())
    blobs = []
    for i, group in enumerate(groups):
        stream = weights_stream(tensors, group, dtype, transform)
        put = store.put_stream(stream, kind="weights")
        name = SINGLE_NAME if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}"
        name += "" if len(groups) == 1 else ".safetensors"
        blobs.append((str(put.digest), put.size, name))
    if len(blobs) == 1:
        digest, size = blobs[0][0], blobs[0][1]
    else:
        put = store.put_bytes(weights_set_document(blobs), kind="weights-set")
        digest, size = str(put.digest), put.size
    store.record_weights(key, digest, size)
    return tuple(blobs)


def recorded_weights(store: Store, digest: str, size: int) -> WeightBlobs | None:
    """The blobs a weights row points at, or None when any of them is gone."""
    parsed = Digest.parse(digest)
    if store.backend.stat(parsed) is None:
        return None
    if store.blob_kind(digest) == "weights":
        return ((digest, size, SINGLE_NAME),)
    with store.open_blob(parsed) as reader:  # kind unknown (e.g. an older index): look
        head = reader.read(len(WEIGHTS_SET_PREFIX))
        if head != WEIGHTS_SET_PREFIX:
            return ((digest, size, SINGLE_NAME),)
        data = head + reader.read()
    record: dict[str, Any] = json.loads(data)
    blobs = tuple((w["digest"], int(w["size"]), w["name"]) for w in record["weights"])
    if any(store.backend.stat(Digest.parse(d)) is None for d, _, _ in blobs):
        return None
    return blobs
