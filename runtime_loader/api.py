"""`runtime_loader.load`: resolve, pull (or use the cache offline), verify, build the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from artifacts.deploy_store import DeployStore
from artifacts.digest import Digest
from artifacts.manifest import Release
from artifacts.refs import parse_reference
from runtime_loader.cache import LocalCache
from runtime_loader.cache_reads import Refetch, read_cached
from runtime_loader.errors import LoaderError, MissingFromCache, WrongTarget
from runtime_loader.generate import CausalLM
from runtime_loader.model import CompiledModel, EncoderModel
from runtime_loader.pull import PullReport, needed_blobs, pull_release

OFFLINE_ENV = "KILN_OFFLINE"


def offline_default() -> bool:
    return os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")


def model_for(
    release: Release, digest: Digest, cache: LocalCache, refetch: Refetch | None = None
) -> CompiledModel:
    cls = CausalLM if release.source.task == "causal-lm" else EncoderModel
    return cls(release, digest, cache, refetch)


def _open_store(store: Any, index: str | None) -> Any:
    from artifacts.store import Store  # noqa: PLC0415 - SQLAlchemy: only when a store is opened

    if store is not None and not isinstance(store, str | Path):
        return store
    return Store.open(str(store) if store else None, index, create=False)


def _resolve(ref: str, store: Any, index: str | None) -> tuple[Any, Digest]:
    """(the opened store, the manifest digest `ref` names). A tag with a ref object in a
    store given by URL is read through DeployStore, which never imports SQLAlchemy; an open
    Store, an explicit index, or any other reference goes through Store."""
    by_url = store is None or isinstance(store, str | Path)
    if index is None and by_url and parse_reference(ref).tag is not None:
        reader = DeployStore.open(str(store) if store else None)
        digest = reader.resolve_tag(ref)
        if digest is not None:
            return reader, digest
        reader.close()
    opened = _open_store(store, index)
    return opened, opened.resolve(ref).digest


def resolve_and_pull(
    ref: str,
    store: Any = None,
    cache: LocalCache | None = None,
    index: str | None = None,
    workers: int = 8,
    progress: Any = None,
    target: str | None = None,
) -> tuple[Any, Release, PullReport]:
    """Online: resolve `ref` in the store and pull what it needs into the cache (nothing
    but the manifest when `target` is given and the release is for another target)."""
    cache = cache or LocalCache()
    opened, digest = _resolve(ref, store, index)
    release, report = pull_release(opened, cache, ref, digest, workers, progress, target)
    parsed = parse_reference(ref)
    if parsed.tag is not None:
        cache.record_ref(f"{parsed.name}:{parsed.tag}", digest, opened.backend.url)
    return opened, release, report


def _offline_release(ref: str, cache: LocalCache) -> tuple[Digest, Release]:
    parsed = parse_reference(ref)
    digest: Digest | None
    if parsed.digest is not None:
        digest = parsed.digest
    elif parsed.tag is not None:
        digest = cache.lookup_ref(f"{parsed.name}:{parsed.tag}")
        if digest is None:
            raise MissingFromCache(ref, [f"{parsed.name}:{parsed.tag} (never pulled here)"])
    else:
        matches = [
            b.digest for b in cache.blobs() if b.digest.startswith(f"sha256:{parsed.prefix}")
        ]
        if len(matches) != 1:
            raise MissingFromCache(ref, [f"a unique cached digest starting {parsed.prefix}"])
        digest = Digest.parse(matches[0])
    if not cache.has(digest):
        raise MissingFromCache(ref, [f"{digest} (the release manifest)"])
    data = read_cached(cache, digest, None)
    release = Release.from_bytes(data, source=f"manifest {digest}")
    missing = [str(d) for d in needed_blobs(release) if not cache.has(d)]
    if missing:
        raise MissingFromCache(ref, missing)
    return digest, release


def load(
    ref: str,
    store: Any = None,
    cache_dir: str | Path | None = None,
    target: str | None = None,
    offline: bool | None = None,
    index: str | None = None,
    workers: int = 8,
) -> CompiledModel:
    """Load a release for inference.

    `store` is a store URL/path (default: KILN_STORE) or an open Store; `cache_dir` the local
    cache (default: KILN_CACHE_DIR or ~/.cache/kiln/loader); with `offline` (or
    KILN_OFFLINE=1) only the cache is used and anything missing is named.
    """
    cache = LocalCache(cache_dir)
    offline = offline_default() if offline is None else offline
    refetch: Refetch | None = None
    if offline:
        digest, release = _offline_release(ref, cache)
    else:
        # The digest the pull resolved: resolving again could see a tag that moved since.
        opened, release, report = resolve_and_pull(
            ref, store, cache, index, workers, target=target
        )
        digest = Digest.parse(report.digest)
        if opened is not store:
            opened.close()  # its index is not needed again (a refetch reads only blobs)

        def refetch(bad: Digest) -> None:
            with opened.open_blob(bad) as reader:
                cache.backend.put(reader, expected=bad)

    if target is not None and release.target != target:
        raise WrongTarget(
            f"{ref} ({digest.short}) was compiled for target {release.target}, not {target}"
        )
    if not release.graphs:
        raise LoaderError(f"{ref}: the release has no graphs")
    return model_for(release, digest, cache, refetch)
