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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from artifacts.backends import open_backend
from artifacts.config import resolve_index_url, resolve_store_url, user_cache_dir
from artifacts.digest import Digest, canonical_json
from artifacts.fsio import write_atomic
from artifacts.tagrefs import read_tag_ref
from pipeline.tracers.versions import kiln_version

NOOP_DIR_ENV = "KILN_NOOP_DIR"
RECORD_VERSION = 1
DIRECT_HIT = "direct-hit"  # artifacts.records.ItemStatus.HIT_DIRECT, without its imports


@dataclass(frozen=True)
class NoopItem:
    model: str
    graph_kind: str
    batch: int
    seq: int
    target: str
    direct_key: str
    hlo_key: str

    @property
    def bucket(self) -> str:
        return f"b{self.batch}xs{self.seq}"

    def report_json(self) -> dict[str, Any]:
        """The item as a run report lists a direct hit (pipeline.run.ItemResult.to_json)."""
        hit = {"status": DIRECT_HIT, "hit_kind": DIRECT_HIT}
        nothing_run = {"trace_seconds": 0.0, "compile_seconds": 0.0, "log_digest": None}
        where = {"model": self.model, "graph_kind": self.graph_kind, "bucket": self.bucket}
        keys = {"direct_key": self.direct_key, "hlo_key": self.hlo_key}
        return {**where, "target": self.target, **hit, **keys, **nothing_run, "error": None}


@dataclass(frozen=True)
class NoopRelease:
    ref: str
    digest: str
    model: str
    target: str
    blobs: tuple[str, ...]  # the manifest's blobs: executables, weights, side files


@dataclass(frozen=True)
class NoopRecord:
    key: str
    run_id: str  # the run whose outcome this is
    items: tuple[NoopItem, ...]
    releases: tuple[NoopRelease, ...]

    def report_json(self, seconds: float) -> dict[str, Any]:
        """What `kiln compile --json` prints: the full path's report of the same outcome,
        with no run of its own (`run_id` null) and the run it repeats."""
        return {
            "run_id": None,
            "noop": {"same_as_run": self.run_id},
            "jobs": len(self.items),
            "compiled": 0,
            "direct_hits": len(self.items),
            "hlo_hits": 0,
            "failed": 0,
            "seconds": round(seconds, 3),
            "releases": [
                {"ref": r.ref, "digest": r.digest, "target": r.target, "unchanged": True}
                for r in self.releases
            ],
            "not_released": [],
            "weights_stored": 0,
            "items": [i.report_json() for i in self.items],
        }

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "version": RECORD_VERSION,
                "key": self.key,
                "run_id": self.run_id,
                "items": [asdict(i) for i in self.items],
                "releases": [asdict(r) for r in self.releases],
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
            items=tuple(NoopItem(**i) for i in value["items"]),  # type: ignore[arg-type]
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
    where = {"spec": spec_digest, "store": store_url, "index": index_url}
    options = {"backend": backend, "flags": flags, "tag": tag, "kiln": version}
    value = {**where, **options, "models": [asdict(m) for m in models]}
    return str(Digest.of_bytes(canonical_json(value)))


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
    """Best effort, atomic: a host that cannot write its cache just never takes the shortcut
    (a hint, so not fsynced: a record lost in a crash only costs one full run)."""
    path = _path(record.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, record.to_bytes(), suffix=".tmp", durable=False)
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


def model_keys(plans: Iterable[Any]) -> list[ModelKeys]:
    """The key's share of each pipeline.planning.ModelPlan."""
    return [
        ModelKeys(p.model.name, p.weights_key, tuple(j.direct_key for j in p.jobs)) for p in plans
    ]


def find_noop(key: str, backend: Any) -> NoopRecord | None:
    """The record of `key` if it still describes the store behind `backend` (ref objects and
    blobs only: no index). None sends the run down the full path."""
    record = load_record(key)
    if record is None:
        return None

    def read_tag(name: str, tag: str) -> str | None:
        ref = read_tag_ref(backend, name, tag)
        return None if ref is None else str(ref.digest)

    try:
        current = still_current(record, read_tag, backend.has)
    except Exception:  # noqa: BLE001 - an unreadable ref or store: the full path reports it
        return None
    return record if current else None


def record_of(key: str, report: Any, store: Any) -> NoopRecord | None:
    """The record of a finished full run (a pipeline.run.RunReport), or None when the run
    is not one a rerun may repeat (a failed graph, an unpublished release)."""
    if not report.ok or report.not_released or not report.releases:
        return None
    items = tuple(
        NoopItem(
            i.job.model,
            i.job.graph_kind,
            i.job.bucket.batch,
            i.job.bucket.seq,
            i.job.target,
            i.job.direct_key,
            i.hlo_key or "",
        )
        for i in report.items
    )
    releases = []
    for p in report.releases:
        release = store.load_release(Digest.parse(p.digest))
        blobs = tuple(dict.fromkeys(str(ref.digest) for _, ref in release.blob_refs()))
        releases.append(NoopRelease(p.ref, p.digest, p.model, p.target, blobs))
    return NoopRecord(key, report.run_id, items, tuple(releases))


@dataclass
class Shortcut:
    """A compile's plans (keys only, nothing looked up) and, for a no-op rerun, its record."""

    key: str
    plans: list[Any]  # pipeline.planning.ModelPlan
    record: NoopRecord | None


def check_shortcut(
    spec: Any,
    backend: str,
    flags: tuple[str, ...] | None,
    tag: str | None,
    store_flag: str | None,
    index_flag: str | None,
    look: bool = True,
) -> Shortcut:
    """Plan `spec` (a pipeline.spec.Spec) and, when `look`, find its no-op record; store and
    index resolve as Store.open resolves them."""
    from pipeline.planning import plan_jobs  # noqa: PLC0415 - the build side, not for kiln --help

    store_url = resolve_store_url(store_flag)
    plans = [plan_jobs(m, backend, flags) for m in spec.models]
    key = noop_key(
        spec_digest=str(spec.digest),
        store_url=store_url,
        index_url=resolve_index_url(store_url, index_flag),
        backend=backend,
        flags=flags,
        tag=tag,
        version=kiln_version(),
        models=model_keys(plans),
    )
    if not look:
        return Shortcut(key, plans, None)
    try:
        store_backend = open_backend(store_url, create=False)
    except Exception:  # noqa: BLE001 - no store yet, or unreachable: the full path says which
        return Shortcut(key, plans, None)
    return Shortcut(key, plans, find_noop(key, store_backend))
