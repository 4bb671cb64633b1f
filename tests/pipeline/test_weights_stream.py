"""Weights streamed into the store tensor by tensor: safetensors files with 64-byte aligned
tensors, one tensor held at a time, a cast and a per-tensor transform on the way, several
blobs past a size; and tracing that never reads (or copies) the weights."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.torch import load as st_load_torch
from safetensors.torch import save as st_save

from artifacts.digest import Digest
from artifacts.store import Store
from artifacts.weights_set import WEIGHTS_SET_MEDIA_TYPE
from pipeline.safetensors_stream import SafetensorsStream, TensorEntry, split
from pipeline.weights import (
    plan_entries,
    recorded_weights,
    store_weights,
    tensor_bytes,
    weights_stream,
)

os.environ.setdefault("PJRT_DEVICE", "CPU")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(7, 5, generator=g),
        "model.norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "rope.inv_freq": torch.arange(4, dtype=torch.float64),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _stream_bytes(tensors: dict[str, torch.Tensor], **kwargs: Any) -> bytes:
    stream = weights_stream(tensors, plan_entries(tensors, **kwargs), **kwargs)
    return io.BufferedReader(stream, 1000).read()


def _same_tensors(data: bytes, tensors: dict[str, torch.Tensor]) -> bool:
    back = st_load_torch(data)
    return back.keys() == tensors.keys() and all(
        back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]) for k in tensors
    )


def test_stream_is_safetensors_with_aligned_tensors() -> None:
    """Any safetensors reader reads the stream back; every tensor whose size is a multiple of
    64 bytes starts 64-byte aligned in the file (the odd-sized ones come last), so the
    loader can adopt memory-mapped weights without copying them."""
    tensors = _tensors()
    data = _stream_bytes(tensors)
    assert _same_tensors(data, tensors)
    (length,) = struct.unpack("<Q", data[:8])
    assert (8 + length) % 64 == 0
    header = json.loads(data[8 : 8 + length])
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    seen_odd = False
    for (start, end), name in spans:
        if (end - start) % 64:
            seen_odd = True
        else:
            assert not seen_odd, f"{name}: an aligned tensor after an odd-sized one"
            assert (8 + length + start) % 64 == 0, name
    assert seen_odd  # the fixture has odd-sized tensors (e.g. the 3-byte mask)


def test_stream_of_aligned_tensors_has_safetensors_data_section() -> None:
    """When no tensor needs moving, the tensor bytes are exactly safetensors' own."""
    tensors = {"a": torch.arange(32, dtype=torch.float32), "b": torch.ones(4, 16)}
    data, theirs = _stream_bytes(tensors), st_save(tensors)
    (ours_len,), (theirs_len,) = struct.unpack("<Q", data[:8]), struct.unpack("<Q", theirs[:8])
    assert data[8 + ours_len :] == theirs[8 + theirs_len :]
    assert json.loads(data[8 : 8 + ours_len]) == json.loads(theirs[8 : 8 + theirs_len])


def test_each_tensor_is_produced_only_when_reached(tmp_path: Path) -> None:
    """The stream asks for one tensor, serves it, says it is done, then asks for the next:
    never two tensors' bytes at once, and nothing before the header has been read."""
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(4)}
    events: list[str] = []

    def read(entry: TensorEntry) -> memoryview:
        events.append(f"read {entry.name}")
        return tensor_bytes(tensors[entry.name])

    stream = SafetensorsStream(
        plan_entries(tensors), read, lambda e: events.append(f"done {e.name}")
    )
    stream.read(16)
    assert events == []
    while stream.read(1500):
        pass
    assert events == [f"{what} t{i}" for i in range(4) for what in ("read", "done")]


def test_cast_and_transform_are_applied_on_the_way(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b.ids": torch.arange(3)}
    seen: list[str] = []

    def transpose(name: str, t: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return t.t().contiguous() if name.endswith(".weight") else t

    data = _stream_bytes(tensors, dtype=torch.float16, transform=transpose)
    got = st_load(data)
    np.testing.assert_array_equal(got["a.weight"], tensors["a.weight"].half().t().numpy())
    np.testing.assert_array_equal(got["b.ids"], tensors["b.ids"].numpy())  # ints not cast
    assert seen.count("a.weight") == 2  # once on the meta device, once on the data


def test_transform_that_depends_on_values_fails_clearly(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))

    def odd(name: str, t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "meta" else t[:1]

    with pytest.raises(ValueError, match="tensor w: transform gave F32\\[1\\]"):
        store_weights(store, "sha256:" + "0" * 64, {"w": torch.ones(3)}, transform=odd)


def test_big_weights_become_several_blobs(tmp_path: Path) -> None:
    tensors = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    store = Store.open(str(tmp_path / "store"))
    key = "sha256:" + "1" * 64
    blobs = store_weights(store, key, tensors, blob_bytes=2100)
    assert [name for _, _, name in blobs] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    merged: dict[str, np.ndarray] = {}
    for digest, size, _ in blobs:
        data = store.read_bytes(Digest.parse(digest))
        assert len(data) == size
        part = st_load(data)
        assert not set(part) & set(merged)
        merged.update(part)
    assert sorted(merged) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(merged[name], t.numpy())
    from sqlalchemy import select

    from artifacts.index.models import BlobRow, WeightsRow

    with store.engine.connect() as conn:
        digest, size = conn.execute(select(WeightsRow.digest, WeightsRow.size)).one()
    record = json.loads(store.read_bytes(Digest.parse(digest)))
    assert record["mediaType"] == WEIGHTS_SET_MEDIA_TYPE
    assert recorded_weights(store, digest, size) == blobs
    from artifacts.index.db import write_transaction

    with write_transaction(store.engine) as conn:  # an index that lost blob kinds
        conn.execute(BlobRow.__table__.update().values(kind=None))
    assert recorded_weights(store, digest, size) == blobs
    assert recorded_weights(store, blobs[0][0], blobs[0][1]) == (
        (blobs[0][0], blobs[0][1], "model.safetensors"),
    )
    store.backend.delete(Digest.parse(blobs[1][0]))  # a member gone: the set is unusable
    assert recorded_weights(store, digest, size) is None


def test_one_blob_when_everything_fits(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    tensors = _tensors()
    ((digest, size, name),) = store_weights(store, "sha256:" + "2" * 64, tensors)
    assert name == "model.safetensors"
    assert _same_tensors(store.read_bytes(Digest.parse(digest)), tensors)
    assert recorded_weights(store, digest, size) == ((digest, size, name),)


def test_split_keeps_a_big_tensor_alone() -> None:
    entries = [TensorEntry(n, "F32", (s,)) for n, s in (("a", 10), ("b", 1000), ("c", 10))]
    assert [[e.name for e in g] for g in split(entries, 100)] == [["a"], ["b"], ["c"]]
    assert [[e.name for e in g] for g in split(entries, 10**6)] == [["a", "b", "c"]]


def test_tracing_reads_no_weight_values() -> None:
    """A model whose weights live on the meta device (no data at all) traces to the same HLO
    as the same model with real weights: the weights are HLO parameters, never read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.graphs.causal_lm import build_causal_lm_graphs
    from pipeline.trace import hlo_digest_bytes, trace_graph

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    real = LlamaForCausalLM(config).eval()
    with torch.device("meta"):
        empty = LlamaForCausalLM(config).eval()
    digests = []
    for model in (real, empty):
        module, inputs, outputs = build_causal_lm_graphs(model, 1, 8)["context_encoding"]
        graph = trace_graph(module, inputs, outputs)
        digests.append((hlo_digest_bytes(graph.hlo_proto), graph.signature.to_json()))
    assert digests[0] == digests[1]


class _BranchOnWeights(torch.nn.Module):
    """Control flow on a value computed from the weights, which tracing never has."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        y = self.lin(x)
        return (y,) if y.sum().item() > 0 else (-y,)


class _ReadsAWeight(_BranchOnWeights):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * float(self.lin.weight.cpu()[0, 0]),)


@pytest.mark.parametrize("module_type", [_BranchOnWeights, _ReadsAWeight])
def test_reading_weights_mid_trace_is_a_trace_error(module_type: type[torch.nn.Module]) -> None:
    """With weights as data-less placeholders, a forward that needs their values fails with
    the usual TraceError (not a crash), and the process traces on afterwards."""
    from pipeline.errors import TraceError
    from pipeline.trace import trace_graph

    with pytest.raises(TraceError, match="executed a graph or copied device data"):
        trace_graph(module_type(), {"x": torch.ones(2, 4)}, ["y"])
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = lin

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.body(x),)

    assert trace_graph(Plain(), {"x": torch.ones(2, 4)}, ["y"]).signature.weight_names


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_file_mapped_pages_are_given_back_and_anonymous_memory_is_not(tmp_path: Path) -> None:
    import ctypes
    import mmap

    from pipeline.mapped_pages import MappedPages

    path = tmp_path / "blob"  # no .safetensors suffix, as in the Hugging Face cache
    path.write_bytes(os.urandom(1 << 20) * 48)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = np.frombuffer(mapped, dtype=np.uint8)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    total = int(view[:: mmap.PAGESIZE].astype(np.int64).sum())  # touch every page
    before = _rss_file_kb()
    assert MappedPages().release(address, len(mapped))
    assert before - _rss_file_kb() > 40 * 1024
    assert int(view[:: mmap.PAGESIZE].astype(np.int64).sum()) == total  # re-read from file

    anon = np.ones(1 << 22, dtype=np.uint8)
    assert not MappedPages().release(anon.ctypes.data, anon.nbytes)
    assert int(anon.sum()) == 1 << 22
