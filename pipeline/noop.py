"""The no-op shortcut of `kiln compile`: a rerun that would change nothing ends before the index.

A compile whose every graph was a hit or compiled and whose every release was published
leaves a record on this host (`~/.cache/kiln/compile-noop/<key>.json`). Its key hashes
everything the run's outcome depends on: the spec file's bytes, the store and index URLs,
the CLI's backend, flags and tag, Kiln's version, and per model the weights key (source
file digests, through pipeline.file_digests) and every graph's direct key (architecture,
bucket, dtype, tracer and compiler versions, flags, target). A later run that computes the
same key, while every recorded tag's ref object still points at the recorded release and
that release's blobs are all in the store, is the same run with the same outcome: it
reports the same graphs and releases and stops, without opening the SQL index (whose import
alone costs more than the rest of such a run) and without recording a run.

Anything else (a changed byte in the spec or a weight file, a new compiler, a moved tag, a
collected blob, a missing or torn record) takes the full path, which looks every graph up
in the index, records the run and writes a new record. `kiln compile --recheck` always
takes it. One difference is accepted: a newer compile of an HLO key the release already has
(e.g. from `kiln import-neuron-cache`) is picked up by the full path only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.config import user_cache_dir
from artifacts.digest import Digest, canonical_json

NOOP_DIR_ENV = "KILN_NOOP_DIR"
RECORD_VERSION = 1


@dataclass(frozen=True)
class NoopItem:
    model: str
    graph_kind: str
    bucket: str
    target: str
    direct_key: str

    def to_json(self) -> dict[str, str]:
        return {
            "model": self.model,
            "graph_kind": self.graph_kind,
            "bucket": self.bucket,
            "target": self.target,
            "direct_key": self.direct_key,
        }


@dataclass(frozen=True)
class NoopRelease:
    ref: str
    digest: str
    model: str
    target: str
    blobs: tuple[str, ...]  # the manifest's blobs: executables, weights, side files

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "model": self.model,
            "target": self.target,
            "blobs": list(self.blobs),
        }


@dataclass(frozen=True)
class NoopRecord:
    key: str
    run_id: str  # the run whose outcome this is
    items: tuple[NoopItem, ...]
    releases: tuple[NoopRelease, ...]

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "version": RECORD_VERSION,
                "key": self.key,
                "run_id": self.run_id,
                "items": [i.to_json() for i in self.items],
                "releases": [r.to_json() for r in self.releases],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> NoopRecord:
        value = json.loads(data)
        if value.get("version") != RECORD_VERSION:
            raise ValueError("another record version")
        return cls(
            key=str(value["key"]),
            run_id=str(value["run_id"]),
            items=tuple(NoopItem(**i) for i in value["items"]),
            releases=tuple(
                NoopRelease(**{**r, "blobs": tuple(r["blobs"])}) for r in value["releases"]
            ),
        )


@dataclass(frozen=True)
class ModelKeys:
    """What one model of the spec contributes to the key."""

    name: str
    weights_key: str
    direct_keys: tuple[str, ...]


def noop_key(
    *,
    spec_digest: str,
    store_url: str,
    index_url: str,
    backend: str,
    flags: tuple[str, ...] | None,
    tag: str | None,
    version: str,
    models: Iterable[ModelKeys],
) -> str:
    value = {
        "spec": spec_digest,
        "store": store_url,
        "index": index_url,
        "backend": backend,
        "flags": None if flags is None else list(flags),
        "tag": tag,
        "kiln": version,
        "models": [
            {"name": m.name, "weights_key": m.weights_key, "direct_keys": list(m.direct_keys)}
            for m in models
        ],
    }
    return str(Digest.of(canonical_json(value)))


def records_dir() -> Path:
    return Path(os.environ.get(NOOP_DIR_ENV) or user_cache_dir() / "compile-noop")


def _path(key: str) -> Path:
    return records_dir() / f"{Digest.parse(key).hex}.json"


def load_record(key: str) -> NoopRecord | None:
    """The record for `key`, or None (none, unreadable, torn or for another key)."""
    try:
        record = NoopRecord.from_bytes(_path(key).read_bytes())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if record.key == key else None


def save_record(record: NoopRecord) -> None:
    """Best effort, atomic: a host that cannot write its cache just never takes the shortcut."""
    path = _path(record.key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(record.to_bytes())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def forget(key: str) -> None:
    try:
        _path(key).unlink(missing_ok=True)
    except OSError:
        pass


def still_current(
    record: NoopRecord,
    read_tag: Callable[[str, str], str | None],
    has_blob: Callable[[Digest], bool],
) -> bool:
    """Every recorded tag still names its recorded release, and all its blobs exist."""
    for release in record.releases:
        name, _, tag = release.ref.partition(":")
        if read_tag(name, tag) != release.digest:
            return False
        for digest in (release.digest, *release.blobs):
            if not has_blob(Digest.parse(digest)):
                return False
    return True
