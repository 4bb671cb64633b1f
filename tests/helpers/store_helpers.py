"""Helpers for the store's crash, corruption and concurrency tests, and their worker processes.

Run as a script (`python tests/helpers/store_helpers.py write|tagger ...`) it is the writer that the
crash test kills and the worker that the concurrency test starts eight of: real processes,
so SIGKILL and SQLite locking behave as they do in production.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from artifacts.digest import Digest
from artifacts.manifest import BlobRef, CompilerInfo, Graph, Provenance, Release, Source
from artifacts.store import Store

SCRIPT = Path(__file__).resolve()
KILN = [sys.executable, "-m", "kiln"]
MiB = 1024 * 1024
CHUNK = 1 * MiB

# The concurrency workload: every worker puts the shared blobs (so identical contents race)
# and a few of its own, builds the identical "m-shared" release and its own "m" release.
SHARED_SEEDS = (1001, 1002, 1003, 1004)
SHARED_SIZE = 1 * MiB
UNIQUE_PER_WORKER = 2
UNIQUE_SIZE = 256 * 1024
TAG = "m:prod"
FIXED_CREATED = "2025-01-01T00:00:00+00:00"


# -- deterministic content ----------------------------------------------------------------------
def seeded_chunks(seed: int, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """`size` pseudo-random bytes from `seed`, in chunks; the same seed gives the same bytes."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def seeded_bytes(seed: int, size: int) -> bytes:
    return b"".join(seeded_chunks(seed, size))


@functools.cache
def seeded_digest(seed: int, size: int) -> Digest:
    """The digest `seeded_chunks(seed, size)` must be stored under, computed independently."""
    h = hashlib.sha256()
    for c in seeded_chunks(seed, size):
        h.update(c)
    return Digest("sha256", h.hexdigest())


class ChunkStream(io.RawIOBase):
    """A readable stream over an iterator of chunks, so a put never holds the whole blob."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        while not self._pending:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._pending = memoryview(nxt)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


# -- releases -----------------------------------------------------------------------------------
def _put(store: Store, data: bytes) -> BlobRef:
    result = store.put_stream(io.BytesIO(data))
    return BlobRef(result.digest, result.size)


def make_release(
    store: Store,
    name: str,
    payloads: Sequence[bytes],
    created: str | None = None,
    annotations: dict[str, str] | None = None,
) -> Digest:
    """Store a release whose weights are `payloads[0]` and whose graphs' executables are the
    rest (one small graph of its own if there is no rest); returns the manifest digest."""
    if not payloads:
        raise ValueError("make_release needs at least one payload (the weights)")
    weights = _put(store, payloads[0])
    executables = list(payloads[1:]) or [f"exe {name}".encode()]
    graphs = tuple(
        Graph(
            kind="token_generation",
            bucket={"batch": 1, "seq": 64 * (i + 1)},
            signature={"inputs": [], "outputs": []},
            hlo=_put(store, f"HloModule {name}_{i}".encode()),
            executable=_put(store, exe),
            format="xla-cpu",
            compiler=CompilerInfo("neuronx-cc", "2.15.0", ("-O2",)),
            hlo_key=f"hlo-{name}-{i}",
            compile_seconds=1.0,
        )
        for i, exe in enumerate(executables)
    )
    release = Release(
        name=name,
        target="cpu",
        source=Source("causal-lm", "arch-test", {"layers": 2}, (weights,)),
        graphs=graphs,
        provenance=Provenance(
            "0.1.0", created or dt.datetime.now(dt.UTC).isoformat(), "host", "user"
        ),
        annotations=annotations or {},
    )
    return store.put_release(release)


# -- looking at a store on disk -----------------------------------------------------------------
def blob_files(store_root: Path) -> list[Path]:
    """Every file under `<store>/blobs` (whatever its name: a stray partial file counts too)."""
    return sorted(p for p in (store_root / "blobs").rglob("*") if p.is_file())


def digest_of_path(path: Path) -> str:
    """`sha256:<hex>` from a blob's sharded path `blobs/sha256/ab/<rest>`."""
    return f"{path.parent.parent.name}:{path.parent.name}{path.name}"


def blob_path(store_root: Path, digest: Digest | str) -> Path:
    d = Digest.parse(str(digest))
    return store_root / "blobs" / d.algorithm / d.hex[:2] / d.hex[2:]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte in place (blob files are 0444, so make it writable for the edit)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    os.chmod(path, 0o444)


def kiln(store_root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `kiln` entry point against `store_root` as a fresh process."""
    env = {**os.environ, "KILN_STORE": str(store_root)}
    env.pop("KILN_INDEX_URL", None)
    return subprocess.run(
        [*KILN, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def worker_command(*args: str) -> list[str]:
    """The argv that runs this module as a worker process."""
    return [sys.executable, str(SCRIPT), *args]


# -- worker processes ---------------------------------------------------------------------------
def _write(store_url: str, seed: int, size: int) -> None:
    """Put one large blob streamed from a generator; says `ready` just before the put starts."""
    with Store.open(store_url) as store:
        print("ready", flush=True)
        start = time.perf_counter()
        result = store.put_stream(ChunkStream(seeded_chunks(seed, size)), kind="weights")
        seconds = time.perf_counter() - start
    print(json.dumps({"digest": str(result.digest), "size": result.size, "seconds": seconds}),
          flush=True)


def _tagger(store_url: str, worker: int, moves: int, go: Path) -> None:
    """Wait for the go file, then put shared and own blobs, build releases and move the tag."""
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    rng = random.Random(worker)
    with Store.open(store_url) as store:
        order = list(SHARED_SEEDS)
        rng.shuffle(order)
        for seed in order:
            store.put_stream(ChunkStream(seeded_chunks(seed, SHARED_SIZE)), kind="weights")
        own = [seeded_bytes(10_000 + worker * 100 + k, UNIQUE_SIZE)
               for k in range(UNIQUE_PER_WORKER)]
        shared = [seeded_bytes(seed, SHARED_SIZE) for seed in SHARED_SEEDS]
        shared_release = make_release(store, "m-shared", shared, created=FIXED_CREATED)
        release = make_release(store, "m", [shared[0], *own],
                               annotations={"worker": str(worker)})
        done = []
        for j in range(moves):
            move = store.tag(str(release), TAG, reason=f"worker {worker} move {j}")
            done.append({"digest": move.digest, "previous": move.previous, "at": move.at,
                         "reason": move.reason})
            time.sleep(rng.uniform(0, 0.02))
    print(json.dumps({"worker": worker, "release": str(release),
                      "shared_release": str(shared_release), "moves": done}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--store", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--size", type=int, required=True)
    t = sub.add_parser("tagger")
    t.add_argument("--store", required=True)
    t.add_argument("--worker", type=int, required=True)
    t.add_argument("--moves", type=int, default=5)
    t.add_argument("--go", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "write":
        _write(args.store, args.seed, args.size)
    else:
        _tagger(args.store, args.worker, args.moves, args.go)


if __name__ == "__main__":
    main()
