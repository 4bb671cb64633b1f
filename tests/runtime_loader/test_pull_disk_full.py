"""`kiln pull` into a cache whose disk fills up (ENOSPC): one line naming the cache, the blob
and the free space; no partial blob left behind; pulling again once there is room fetches only
the rest. The cache is a real 1 MiB tmpfs (tiny-llama needs about 1.6 MiB), which needs root
to mount: without it the test is skipped, saying so."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import runtime_loader
from runtime_loader.api import resolve_and_pull
from runtime_loader.cache import LocalCache
from runtime_loader.errors import CacheFull
from tests.helpers.disk_helpers import resize_tmpfs, small_tmpfs
from tests.helpers.loader_helpers import (
    LLAMA_REF,
    cached_digests,
    kiln,
    kiln_ok,
    needed_digests,
    release_of,
    verify_cache,
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards."""
    with small_tmpfs(tmp_path / "disk", 1 << 20) as folder:
        yield folder


def leftovers(cache: Path) -> list[str]:
    """Temp files of interrupted writes (blobs and refs)."""
    return [str(p) for p in cache.rglob("*") if p.name.endswith((".incomplete", ".tmp"))]


def test_pull_into_a_full_disk_is_one_line_and_resumes(llama_store: Path, small_disk: Path) -> None:
    cache = small_disk / "cache"
    digest, release = release_of(llama_store, LLAMA_REF)
    proc = kiln("pull", LLAMA_REF, "--store", llama_store, "--cache-dir", cache, "--json")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert line.startswith(f"kiln: error: the cache {cache} ran out of space writing blob sha256:")
    assert "free" in line and "kiln cache prune" in line
    failed = line.split("writing blob ", 1)[1].split()[0]
    assert failed in needed_digests(release)
    assert proc.stdout == ""
    assert leftovers(cache) == []
    kept = cached_digests(cache)
    assert failed not in kept and str(digest) in kept
    assert verify_cache(cache) == len(kept)  # what is there is whole

    resize_tmpfs(small_disk, 8 << 20)
    report = json.loads(
        kiln_ok("pull", LLAMA_REF, "--store", llama_store, "--cache-dir", cache, "--json").stdout
    )
    assert report["cached"] == len(kept) - 1  # everything kept but the manifest counts
    assert report["fetched"] == len(needed_digests(release)) - report["cached"]
    assert cached_digests(cache) == needed_digests(release) | {str(digest)}
    assert verify_cache(cache) == len(needed_digests(release)) + 1


def test_the_library_raises_cache_full(llama_store: Path, small_disk: Path) -> None:
    cache = LocalCache(small_disk / "cache")
    with pytest.raises(CacheFull, match=f"the cache {cache.root} ran out of space"):
        resolve_and_pull(LLAMA_REF, llama_store, cache)
    with pytest.raises(CacheFull):
        runtime_loader.load(LLAMA_REF, store=llama_store, cache_dir=cache.root)
    assert leftovers(cache.root) == []
