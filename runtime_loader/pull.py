"""Pull what one release needs for its target into the local cache: parallel, verified,
atomic per blob, resumable (finished blobs are never fetched again)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from artifacts.digest import Digest
from artifacts.errors import BlobCorrupted, SizeMismatch
from artifacts.manifest import Release
from runtime_loader.cache import LocalCache
from runtime_loader.errors import WrongTarget

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PullReport:
    ref: str
    digest: str
    target: str
    blobs: int
    fetched: int
    cached: int
    bytes_fetched: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def needed_blobs(release: Release) -> dict[Digest, int]:
    """Weights, side files and executables; HLO and compile logs stay in the store."""
    out: dict[Digest, int] = {}
    for ref in (*release.source.weights, *release.source.files):
        out[ref.digest] = ref.size
    for graph in release.graphs:
        out[graph.executable.digest] = graph.executable.size
    return out


def pull_blobs(
    store: Any,
    cache: LocalCache,
    digests: dict[Digest, int],
    workers: int = 8,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Copy the missing blobs from the store; returns (fetched, bytes fetched)."""
    missing = [d for d in digests if not cache.has(d)]
    done = 0

    def fetch(digest: Digest) -> int:
        with store.open_blob(digest) as reader:
            return cache.backend.put(reader, expected=digest).size

    fetched_bytes = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for size in pool.map(fetch, missing):
            fetched_bytes += size
            done += 1
            if progress:
                progress(done, len(missing))
    return len(missing), fetched_bytes


def pull_release(
    store: Any,
    cache: LocalCache,
    ref: str,
    digest: Digest,
    workers: int = 8,
    progress: Progress | None = None,
    target: str | None = None,
) -> tuple[Release, PullReport]:
    """Manifest first (verified), then the blobs it needs, then remember the ref. With
    `target`, a release for another target fails before any of its blobs is fetched."""
    start = time.monotonic()

    def fetch_manifest() -> None:
        with store.open_blob(digest) as reader:
            cache.backend.put(reader, expected=digest)

    if not cache.has(digest):
        fetch_manifest()
    try:
        data = cache.read(digest)
    except (BlobCorrupted, SizeMismatch):  # a corrupted cached copy: fetch it again
        cache.discard(digest)
        fetch_manifest()
        data = cache.read(digest)
    release = Release.from_bytes(data, source=f"manifest {digest}")
    if target is not None and release.target != target:
        raise WrongTarget(
            f"{ref} ({digest.short}) was compiled for target {release.target}, not {target}"
        )
    needed = needed_blobs(release)
    fetched, nbytes = pull_blobs(store, cache, needed, workers, progress)
    report = PullReport(
        ref,
        str(digest),
        release.target,
        len(needed) + 1,
        fetched,
        len(needed) - fetched,
        nbytes,
        time.monotonic() - start,
    )
    return release, report
