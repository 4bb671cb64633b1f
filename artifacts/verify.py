"""`kiln verify`: rehash every blob and check the index against the blobs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import DatabaseError

from artifacts.backends import BlobInfo
from artifacts.digest import CHUNK_SIZE, Digest
from artifacts.errors import ArtifactError
from artifacts.index.models import BlobRow, ManifestBlobRow, ManifestRow, TagRow
from artifacts.neff import neff_blob_check
from artifacts.store import Store

MAX_INDEX_PROBLEMS = 20
Progress = Callable[[int, int], None]
BlobCheck = Callable[[Store, Digest, str | None], str | None]


@dataclass(frozen=True)
class Problem:
    digest: str
    problem: str

    def to_json(self) -> dict[str, str]:
        return {"digest": self.digest, "problem": self.problem}


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    bytes: int
    problems: tuple[Problem, ...]
    unindexed: tuple[str, ...] = field(default=())
    index_problems: tuple[str, ...] = field(default=())  # the index file itself is damaged

    @property
    def bad(self) -> list[str]:
        return sorted({p.digest for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems and not self.index_problems

    def to_json(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "bytes": self.bytes,
            "bad": self.bad,
            "problems": [p.to_json() for p in self.problems],
            "unindexed": list(self.unindexed),
            "index_problems": list(self.index_problems),
        }


_extra_checks: list[BlobCheck] = []


def register_blob_check(check: BlobCheck) -> None:
    """Add a per-blob content check (e.g. NEFF headers); it returns a problem text or None."""
    _extra_checks.append(check)


def _rehash(store: Store, info: BlobInfo) -> str | None:
    try:
        with store.backend.open(info.digest) as reader:
            while reader.read(CHUNK_SIZE):
                pass
    except ArtifactError as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None


def check_index(store: Store) -> tuple[str, ...]:
    """SQLite's own integrity check of the index file (pages, b-trees, index entries): the
    problems it lists, or () when it says ok. Other databases check themselves."""
    if store.engine.dialect.name != "sqlite":
        return ()
    try:
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql(f"PRAGMA integrity_check({MAX_INDEX_PROBLEMS})").all()
    except DatabaseError as exc:
        return (_short(exc),)
    return tuple(str(r[0]) for r in rows if str(r[0]) != "ok")


def verify_store(store: Store, workers: int = 4, progress: Progress | None = None) -> VerifyReport:
    """Check the index file, rehash every blob, then cross-check index rows, release
    references and tags (skipped when the index cannot be read)."""
    problems: list[Problem] = []
    index_problems = check_index(store)
    blobs = list(store.backend.iter_blobs())
    total_bytes = sum(b.size for b in blobs)
    try:
        indexed, refs, manifests, tags = _read_index(store)
    except DatabaseError as exc:
        index_problems = (*index_problems, _short(exc))
        indexed, refs, manifests, tags = {}, [], set(), []

    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for info, error in zip(blobs, pool.map(lambda b: _rehash(store, b), blobs), strict=True):
            if error is None:
                kind = indexed.get(str(info.digest), (None, None))[1]
                error = _extra(store, info.digest, kind)
            if error is not None:
                problems.append(Problem(str(info.digest), error))
            done += 1
            if progress:
                progress(done, len(blobs))

    if index_problems:  # rows of a damaged index prove nothing either way
        return VerifyReport(len(blobs), total_bytes, tuple(_dedupe(problems)), (), index_problems)
    present = {str(b.digest): b.size for b in blobs}
    for digest, (size, _kind) in sorted(indexed.items()):
        if digest not in present:
            problems.append(Problem(digest, "in the index but missing from the store"))
        elif present[digest] != size:
            problems.append(
                Problem(digest, f"index says {size} bytes, store has {present[digest]}")
            )
    for blob, name, manifest in refs:
        if blob not in present:
            short = Digest.parse(manifest).short
            problems.append(Problem(blob, f"referenced by release {name}@{short} but missing"))
    for name, tag, digest in tags:
        if digest not in manifests:
            problems.append(Problem(digest, f"tag {name}:{tag} points at a missing release"))
    unindexed = tuple(sorted(d for d in present if d not in indexed))
    return VerifyReport(len(blobs), total_bytes, tuple(_dedupe(problems)), unindexed)


def _read_index(store: Store) -> tuple[dict[str, tuple[int, str | None]], list, set[str], list]:  # type: ignore[type-arg]
    with store.engine.connect() as conn:
        indexed = {
            d: (s, k)
            for d, s, k in conn.execute(select(BlobRow.digest, BlobRow.size, BlobRow.kind))
        }
        refs = conn.execute(
            select(ManifestBlobRow.blob_digest, ManifestRow.name, ManifestRow.digest).join(
                ManifestRow, ManifestRow.digest == ManifestBlobRow.manifest_digest
            )
        ).all()
        manifests = {d for (d,) in conn.execute(select(ManifestRow.digest))}
        tags = conn.execute(select(TagRow.name, TagRow.tag, TagRow.digest)).all()
    return indexed, list(refs), manifests, list(tags)


def _short(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def _extra(store: Store, digest: Digest, kind: str | None) -> str | None:
    for check in _extra_checks:
        problem = check(store, digest, kind)
        if problem:
            return problem
    return None


def _dedupe(problems: Iterable[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


register_blob_check(neff_blob_check)
