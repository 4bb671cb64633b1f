"""Verified reads of cached blobs: a corrupt or missing blob is fetched again when online, and
named (with what to do) when offline."""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import TypeVar

from artifacts.digest import Digest
from artifacts.errors import BlobCorrupted, BlobNotFound, SizeMismatch
from runtime_loader.cache import LocalCache
from runtime_loader.errors import CorruptCachedBlob, MissingFromCache

Refetch = Callable[[Digest], None]
T = TypeVar("T")


def read_cached(cache: LocalCache, digest: Digest, refetch: Refetch | None) -> bytes:
    """Verified bytes from the cache; a corrupt or missing blob is fetched again when online."""
    return _cached(cache.read, cache, digest, refetch)


def map_cached(cache: LocalCache, digest: Digest, refetch: Refetch | None) -> mmap.mmap:
    """A verified cached blob, memory-mapped (see LocalCache.map); refetched as read_cached."""
    return _cached(cache.map, cache, digest, refetch)


def _cached(
    get: Callable[[Digest], T], cache: LocalCache, digest: Digest, refetch: Refetch | None
) -> T:
    try:
        return get(digest)
    except (BlobCorrupted, SizeMismatch, BlobNotFound) as exc:
        if refetch is None:
            if isinstance(exc, BlobNotFound):
                raise MissingFromCache(str(digest), [str(digest)]) from None
            raise CorruptCachedBlob(
                f"cached blob {digest} is corrupted ({exc}); offline, so it cannot be fetched"
                " again: go online or run `kiln pull`"
            ) from None
        cache.discard(digest)
        refetch(digest)
        return get(digest)
