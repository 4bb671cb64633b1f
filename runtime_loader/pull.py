"""Pull what one release needs for its target into the local cache: parallel, verified,
atomic per blob, resumable (finished blobs are never fetched again)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from artifacts.backends.local import LocalBlobBackend
from artifacts.digest import Digest
from artifacts.diskspace import is_disk_full
from artifacts.errors import BlobCorrupted, SizeMismatch
from artifacts.manifest import Release
from artifacts.table import human_size
from runtime_loader.cache import LocalCache
from runtime_loader.errors import CacheFull, WrongTarget

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


def cache_full(cache: LocalCache, what: str, size: int | None) -> CacheFull:
    try:
        free = f"{human_size(shutil.disk_usage(cache.root).free)} free"
    except OSError:
        free = "free space unknown"
    needs = f" ({human_size(size)})" if size is not None else ""
    return CacheFull(
        f"the cache {cache.root} ran out of space writing {what}{needs}, {free}: make room"
        " (kiln cache prune --max-size SIZE) or use a larger disk (--cache-dir or"
        " KILN_CACHE_DIR); blobs already pulled are kept, and pulling again fetches the rest"
    )


def store_in_cache(store: Any, cache: LocalCache, digest: Digest, size: int | None = None) -> int:
    """Copy one blob from the store into the cache (verified, atomic); its size. From a
    local store on the cache's filesystem the blob is hard-linked, not copied."""
    try:
        if isinstance(getattr(store, "backend", None), LocalBlobBackend):
            linked = cache.backend.link_from(store.backend.path_of(digest), digest)
            if linked is not None:
                cache.mark_verified(digest)
                return linked.size
        with store.open_blob(digest) as reader:
            size = cache.backend.put(reader, expected=digest).size
        cache.mark_verified(digest)
        return size
    except Exception as exc:
        if is_disk_full(exc):
            raise cache_full(cache, f"blob {digest}", size) from None
        raise


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
        return store_in_cache(store, cache, digest, digests[digest])

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
        store_in_cache(store, cache, digest)

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
