"""Loader memory: cached weight blobs are memory-mapped (verified first), several blobs merge
into one set of weights, uploads leave no second host copy, and a pull hashes each blob once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from artifacts.digest import Digest, Hasher
from artifacts.errors import BlobCorrupted
from artifacts.store import Store
from runtime_loader.cache import LocalCache
from runtime_loader.errors import LoaderError
from runtime_loader.pull import pull_blobs
from runtime_loader.weights import MappedWeights

REPO = Path(__file__).resolve().parents[2]


def _cached(cache: LocalCache, tensors: dict[str, np.ndarray]) -> Digest:
    import io

    return cache.backend.put(io.BytesIO(save(tensors))).digest


def test_weights_are_views_of_a_map_not_read_into_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = LocalCache(tmp_path / "cache")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}
    digest = _cached(cache, tensors)

    def refuse(self: LocalCache, d: Digest) -> bytes:
        raise AssertionError("weights were read into bytes")

    monkeypatch.setattr(LocalCache, "read", refuse)
    mapped = cache.map(digest)
    weights = MappedWeights([("w", mapped)])
    assert sorted(weights) == ["a", "b"]
    for name, array in tensors.items():
        np.testing.assert_array_equal(weights[name], array)
        assert weights[name].flags.writeable  # DLPack exports only writable arrays
    base = np.frombuffer(mapped, dtype=np.uint8)
    assert np.shares_memory(weights["a"], base)
    weights["a"][0, 0] = 99.0  # copy-on-write: the cached file is untouched
    monkeypatch.undo()
    assert cache.read(digest) == save(tensors)
    weights.release("a")  # pages given back: read again from the file
    np.testing.assert_array_equal(weights["b"], tensors["b"])


def test_a_corrupted_cached_blob_is_not_mapped(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "cache")
    digest = _cached(cache, {"a": np.zeros(100, np.float32)})
    path = cache.backend.path_of(digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BlobCorrupted):
        cache.map(digest)


def test_a_tensor_in_two_blobs_is_an_error(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "cache")
    one = _cached(cache, {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    two = _cached(cache, {"b": np.ones(2, np.float32), "c": np.ones(2, np.float32)})
    with pytest.raises(LoaderError, match=f"tensor b appears in two weight blobs: {one} and {two}"):
        MappedWeights([(str(one), cache.map(one)), (str(two), cache.map(two))])
    three = _cached(cache, {"c": np.ones(3, np.int8)})
    merged = MappedWeights([(str(one), cache.map(one)), (str(three), cache.map(three))])
    assert sorted(merged) == ["a", "b", "c"]


_UPLOAD_PEAK = """
import json, resource, sys
from artifacts.digest import Digest
from runtime_loader.cache import LocalCache
from runtime_loader.executors.xla_cpu import XlaCpuExecutor
from runtime_loader.weights import BoundWeights, MappedWeights

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

cache = LocalCache(sys.argv[1])
executor = XlaCpuExecutor()
executor.bind(__import__("numpy").zeros(4, "float32"))  # the client, started
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = MappedWeights([("w", cache.map(Digest.parse(sys.argv[2])))])
bound = BoundWeights(executor, weights)
for name in weights:
    bound[name]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before": before, "peak": peak, "now": rss_kb()}))
sys.stdout.flush()
# Known issue: with weights uploaded from mapped pages this process can hang in jaxlib's
# teardown at interpreter exit (seen intermittently); the measurement is done, so leave now.
import os
os._exit(0)
"""


def test_loading_and_uploading_weights_holds_them_about_once(tmp_path: Path) -> None:
    """Read into bytes, copied to be writable and uploaded, weights were held three times;
    mapped and given back after upload, the device copy is the only one left."""
    cache = LocalCache(tmp_path / "cache")
    rng = np.random.default_rng(0)
    tensors = {f"layer{i}": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(48)}
    digest = _cached(cache, tensors)
    nbytes_kb = sum(t.nbytes for t in tensors.values()) // 1024  # 192 MiB
    del tensors
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _UPLOAD_PEAK, str(tmp_path / "cache"), str(digest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peak"] - got["before"] < 1.15 * nbytes_kb, (got, nbytes_kb)


def _count_hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    hashed = [0]
    update = Hasher.update

    def counting(self: Hasher, chunk: bytes) -> None:
        hashed[0] += len(chunk)
        update(self, chunk)

    monkeypatch.setattr(Hasher, "update", counting)
    return hashed


def test_pull_hashes_each_blob_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(str(tmp_path / "store"))
    data = os.urandom(3 << 20)
    digest = store.put_bytes(data, kind="weights").digest
    hashed = _count_hashed(monkeypatch)
    cache = LocalCache(tmp_path / "cache")
    assert pull_blobs(store, cache, {digest: len(data)}) == (1, len(data))
    assert hashed[0] == len(data)
    monkeypatch.undo()
    assert cache.read(digest) == data


def test_pull_of_corrupted_store_blob_leaves_nothing_cached(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    digest = store.put_bytes(os.urandom(1 << 20), kind="weights").digest
    path = store.backend.path_of(digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    cache = LocalCache(tmp_path / "cache")
    with pytest.raises(BlobCorrupted):
        pull_blobs(store, cache, {digest: len(data)})
    assert not cache.has(digest)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_pulled_blob_is_not_hashed_again_by_its_first_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(str(tmp_path / "store"))
    data = save({"w": np.ones(1 << 18, np.float32)})
    digest = store.put_bytes(data, kind="weights").digest
    cache = LocalCache(tmp_path / "cache")
    hashed = _count_hashed(monkeypatch)
    pull_blobs(store, cache, {digest: len(data)})
    cache.map(digest).close()
    cache.map(digest).close()
    assert hashed[0] == len(data)  # the pull's one pass; the loads trust its record


def test_a_changed_cached_file_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verification record names the very file that was hashed (inode, size, mtime,
    ctime): a file written in place, even with its mtime put back, is hashed again."""
    cache = LocalCache(tmp_path / "cache")
    digest = _cached(cache, {"a": np.zeros(1000, np.float32)})
    size = cache.backend.path_of(digest).stat().st_size
    hashed = _count_hashed(monkeypatch)
    cache.map(digest).close()
    assert hashed[0] == size  # no record yet: one verifying pass
    cache.map(digest).close()
    assert hashed[0] == size  # recorded: no second pass
    path = cache.backend.path_of(digest)
    before = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(BlobCorrupted):
        cache.map(digest)


def test_aligned_weights_are_adopted_and_unaligned_ones_copied_at_once(tmp_path: Path) -> None:
    """A tensor of a stream-written blob (64-byte aligned) becomes a device buffer over the
    mapped pages themselves; an unaligned one is copied when uploaded (not on first use, when
    its mapped pages would already have been given back)."""
    import io

    from pipeline.safetensors_stream import SafetensorsStream, TensorEntry
    from runtime_loader.executors.xla_cpu import DeviceBuffers

    values = {"w": np.arange(4096, dtype=np.float32), "b": np.arange(3, dtype=np.float32)}
    entries = [TensorEntry(n, "F32", v.shape) for n, v in values.items()]
    stream = SafetensorsStream(entries, lambda e: memoryview(values[e.name].tobytes()))
    cache = LocalCache(tmp_path / "cache")
    digest = cache.backend.put(io.BufferedReader(stream)).digest
    weights = MappedWeights([("w", cache.map(digest))])
    buffers = DeviceBuffers()
    adopted = buffers.upload(weights["w"])
    assert adopted.aliases_host
    assert adopted.numpy().ctypes.data == weights["w"].ctypes.data
    unaligned = np.frombuffer(bytearray(4 * 4097), np.float32)[1:].copy()
    view = np.frombuffer(memoryview(bytearray(8 + unaligned.nbytes))[8:], np.float32)
    view[:] = unaligned
    if view.ctypes.data % 64 == 0:  # the allocator happened to align it: shift once more
        view = np.frombuffer(memoryview(bytearray(12 + unaligned.nbytes))[12:], np.float32)
        view[:] = unaligned
    copied = buffers.upload(view)
    assert not copied.aliases_host
    view[:] = -1  # the device buffer is its own copy already
    assert np.array_equal(copied.numpy(), unaligned)
    assert np.array_equal(buffers.upload(weights["b"]).numpy(), values["b"])


def test_bfloat16_weights_are_adopted_like_float32(tmp_path: Path) -> None:
    """numpy cannot export bfloat16 through DLPack; Kiln's own capsule (dlpack_bf16.py) lets
    the CPU client adopt the mapped pages anyway, with the bits unchanged, and the capsule's
    bookkeeping is dropped when the device lets go of the memory."""
    import gc
    import io

    import ml_dtypes

    from pipeline.safetensors_stream import SafetensorsStream, TensorEntry
    from runtime_loader.executors import dlpack_bf16
    from runtime_loader.executors.xla_cpu import DeviceBuffers

    values = np.linspace(-3, 3, 4096, dtype=np.float32).astype(ml_dtypes.bfloat16)
    entries = [TensorEntry("w", "BF16", values.shape)]
    stream = SafetensorsStream(entries, lambda e: memoryview(values.view(np.uint16).tobytes()))
    cache = LocalCache(tmp_path / "cache")
    digest = cache.backend.put(io.BufferedReader(stream)).digest
    weights = MappedWeights([("w", cache.map(digest))])
    live = len(dlpack_bf16._LIVE)
    buffer = DeviceBuffers().upload(weights["w"])
    assert buffer.aliases_host and buffer.dtype.name == "bfloat16"
    assert len(dlpack_bf16._LIVE) == live + 1
    del buffer
    gc.collect()
    assert len(dlpack_bf16._LIVE) == live
    back = DeviceBuffers().upload(weights["w"]).numpy()
    assert back.dtype.name == "bfloat16"
    assert np.array_equal(back.view(np.uint16), values.view(np.uint16))
    with pytest.raises(ValueError, match="C-contiguous bfloat16"):
        dlpack_bf16.bfloat16_capsule(np.zeros(4, np.float32))
