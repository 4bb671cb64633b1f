"""Promote a release from one store to another (`kiln copy`): local <-> S3, S3 -> S3, ...

Order, as everywhere in the store: the blobs the destination lacks (each streamed through the
source's verifying reader and hashed again as the destination writes it), then the manifest
(`put_release` checks every blob is there), then the tag, last. An interruption leaves at
most some unreferenced blobs, which a rerun reuses and `kiln gc` collects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from artifacts.config import resolve_index_url, resolve_store_url
from artifacts.digest import Digest
from artifacts.errors import InvalidManifest, ReferenceNotFound, SizeMismatch, StoreConfigError
from artifacts.manifest import Release
from artifacts.redact import redact_url
from artifacts.refs import TagName, parse_tag_name
from artifacts.store import Store

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CopyReport:
    """What `copy_release` did. Counts and bytes include the manifest."""

    digest: Digest
    name: str
    source: str
    destination: str
    tag: str | None
    copied: int
    present: int
    bytes_copied: int
    seconds: float

    @property
    def summary_str(self) -> str:
        tag = f", tagged {self.tag}" if self.tag else ""
        return (
            f"copied {self.name}@{self.digest.short} {self.source} -> {self.destination}:"
            f" {self.copied} blobs copied ({self.bytes_copied} bytes), {self.present} already"
            f" present{tag}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": str(self.digest),
            "name": self.name,
            "source": self.source,
            "destination": self.destination,
            "tag": self.tag,
            "copied": self.copied,
            "present": self.present,
            "bytes_copied": self.bytes_copied,
            "seconds": round(self.seconds, 3),
        }


def open_stores(
    from_url: str | None, to_url: str, from_index: str | None = None, to_index: str | None = None
) -> tuple[Store, Store]:
    """Open source and destination, refusing a pair that would share one store or index."""
    source_url = resolve_store_url(from_url)
    source_index = resolve_index_url(source_url, from_index)
    target_index = resolve_index_url(to_url, to_index)
    if source_url.rstrip("/") == to_url.rstrip("/"):
        raise StoreConfigError(
            f"kiln copy: --from and --to are the same store ({redact_url(to_url)})"
        )
    if source_index == target_index:
        raise StoreConfigError(
            f"kiln copy: both stores would use the index {redact_url(source_index)}; give each"
            " its own"
            " with --from-index / --to-index"
        )
    source = Store.open(source_url, source_index, create=False)
    try:
        target = Store.open(to_url, target_index)
    except BaseException:
        source.close()
        raise
    return source, target


def copy_release(
    source: Store,
    destination: Store,
    ref: str,
    tag: str | None = None,
    workers: int = 4,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy the release `ref` names, and the blobs it references that `destination` lacks.

    The tag moved is `tag` (`NAME:TAG`) if given, else the tag `ref` named, else none.
    """
    start = time.monotonic()
    resolved = source.resolve(ref)
    digest = resolved.digest
    release = Release.from_bytes(source.read_bytes(digest), source=f"manifest {digest}")
    if Digest.of_bytes(release.to_bytes()) != digest:
        raise InvalidManifest(
            f"release {release.name}@{digest}: the manifest is not in canonical form, so the"
            " destination would store it under another digest; re-create it with kiln"
        )
    destination_tag: TagName | None = None
    if tag is not None:
        destination_tag = parse_tag_name(tag)
    elif resolved.tag is not None and resolved.name is not None:
        destination_tag = TagName(resolved.name, resolved.tag)

    wanted: dict[Digest, tuple[str, int]] = {}
    for role, blob in release.blob_refs():
        wanted.setdefault(blob.digest, (role, blob.size))
    missing: list[tuple[Digest, str, int]] = []
    for blob_digest, (role, size) in wanted.items():
        info = destination.backend.stat(blob_digest)
        if info is None:
            missing.append((blob_digest, role, size))
        elif info.size != size:
            raise SizeMismatch(
                f"blob {blob_digest} at {destination.backend.location(blob_digest)} is"
                f" {info.size} bytes, release {release.name} says {size}: run `kiln verify`"
                " on the destination and delete the damaged blob"
            )

    def copy_one(item: tuple[Digest, str, int]) -> tuple[bool, int]:
        blob_digest, role, size = item
        with source.open_blob(blob_digest) as reader:
            result = destination.put_stream(reader, expected=blob_digest, kind=role)
        if result.size != size:
            raise SizeMismatch(
                f"blob {blob_digest} is {result.size} bytes, release {release.name} says {size}"
            )
        return result.created, result.size

    copied = written = 0
    total = len(missing) + 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (created, size) in enumerate(pool.map(copy_one, missing), 1):
            copied += created
            written += size if created else 0
            if progress:
                progress(done, total)

    manifest_new = not destination.has_blob(digest)
    if destination.put_release(release) != digest:  # checked canonical above; belt and braces
        raise InvalidManifest(f"release {release.name}@{digest} changed digest in transit")
    if manifest_new:
        copied += 1
        written += len(release.to_bytes())
    if progress:
        progress(total, total)

    if destination_tag is not None and _tag_target(destination, destination_tag) != digest:
        destination.move_tag(destination_tag, digest, reason=f"kiln copy from {source.backend.url}")
    return CopyReport(
        digest=digest,
        name=release.name,
        source=source.backend.url,
        destination=destination.backend.url,
        tag=str(destination_tag) if destination_tag else None,
        copied=copied,
        present=len(wanted) + 1 - copied,
        bytes_copied=written,
        seconds=time.monotonic() - start,
    )


def _tag_target(store: Store, name: TagName) -> Digest | None:
    try:
        return store.resolve(str(name)).digest
    except ReferenceNotFound:
        return None
