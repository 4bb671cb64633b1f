"""Every read of the index tables the build side and the CLIs need, as values, not rows.

The Store exposes each (artifacts/store.py); callers outside artifacts/ never see a
connection or a row model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from artifacts.index.models import (
    BlobRow,
    CompilationRow,
    ManifestRow,
    RecipeRow,
    RunRow,
    TagHistoryRow,
    WeightsRow,
)
from artifacts.records import RunStatus


@dataclass(frozen=True)
class Compilation:
    """A `compilations` row: one compile attempt of an HLO key (see CompilationRecord)."""

    id: int
    hlo_key: str
    status: str
    compiler: str
    compiler_version: str
    flags: tuple[str, ...]
    target: str
    hlo_digest: str
    executable_digest: str | None
    executable_format: str | None
    log_digest: str | None
    seconds: float
    error: str | None
    created_at: float
    record_digest: str
    provenance: str | None  # the record's provenance as JSON text

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.OK

    @property
    def provenance_json(self) -> dict[str, Any]:
        """The provenance object; {} when there is none or it is not an object."""
        try:
            value = json.loads(self.provenance) if self.provenance else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Recipe:
    """A `recipes` row: direct key -> the HLO it traced to, with the graph's signature."""

    direct_key: str
    hlo_key: str
    hlo_digest: str
    signature: dict[str, Any]


@dataclass(frozen=True)
class WeightsEntry:
    """A `weights` row: weights key -> the blob (safetensors or weights set) holding them."""

    digest: str
    size: int


def _compilation(row: Any) -> Compilation:
    """A row of the whole `compilations` table (its columns are Compilation's fields)."""
    return Compilation(**{**row._mapping, "flags": tuple(json.loads(row.flags))})


def compilations(
    conn: Connection,
    *,
    hlo_key: str | None = None,
    record_digest: str | None = None,
    log_digest: str | None = None,
    ok_only: bool = False,
) -> list[Compilation]:
    """The compilations of an HLO key, a record digest or a log digest, newest first."""
    table = CompilationRow.__table__
    query = select(table).order_by(CompilationRow.created_at.desc())  # type: ignore[arg-type]
    if hlo_key is not None:
        query = query.where(CompilationRow.hlo_key == hlo_key)
    if record_digest is not None:
        query = query.where(CompilationRow.record_digest == record_digest)
    if log_digest is not None:
        query = query.where(CompilationRow.log_digest == log_digest)
    if ok_only:
        query = query.where(CompilationRow.status == RunStatus.OK.value)
    return [_compilation(r) for r in conn.execute(query)]


def last_compilation_id(conn: Connection, hlo_key: str) -> int:
    last = conn.execute(
        select(func.max(CompilationRow.id)).where(CompilationRow.hlo_key == hlo_key)
    ).scalar_one()
    return int(last or 0)


def failure_since(conn: Connection, hlo_key: str, after_id: int) -> Compilation | None:
    """The latest failed compile of `hlo_key` recorded after row `after_id`."""
    row = conn.execute(
        select(CompilationRow.__table__)  # type: ignore[arg-type]
        .where(
            CompilationRow.hlo_key == hlo_key,
            CompilationRow.status != RunStatus.OK.value,
            CompilationRow.id > after_id,
        )
        .order_by(CompilationRow.id.desc())
    ).first()
    return None if row is None else _compilation(row)


def recorded_provenance(
    conn: Connection, compiler: str, target: str, containing: str
) -> list[str | None]:
    """The provenance JSON of the successful compiles on `compiler` and `target` whose
    provenance contains `containing` (a prefilter; callers parse and check)."""
    return list(
        conn.execute(
            select(CompilationRow.provenance).where(
                CompilationRow.status == RunStatus.OK.value,
                CompilationRow.compiler == compiler,
                CompilationRow.target == target,
                CompilationRow.provenance.like(f"%{containing}%"),
            )
        ).scalars()
    )


def recipes(conn: Connection, direct_keys: Iterable[str]) -> dict[str, Recipe]:
    rows = conn.execute(
        select(RecipeRow.__table__).where(RecipeRow.direct_key.in_(list(direct_keys)))  # type: ignore[arg-type]
    )
    return {
        r.direct_key: Recipe(r.direct_key, r.hlo_key, r.hlo_digest, json.loads(r.signature))
        for r in rows
    }


def weights(conn: Connection, weights_key: str) -> WeightsEntry | None:
    row = conn.execute(
        select(WeightsRow.digest, WeightsRow.size).where(WeightsRow.weights_key == weights_key)
    ).first()
    return None if row is None else WeightsEntry(row[0], row[1])


def blob_sizes(conn: Connection, digests: Iterable[str]) -> dict[str, int]:
    """digest -> indexed size, for those of `digests` the index knows."""
    return dict(
        conn.execute(  # type: ignore[arg-type]
            select(BlobRow.digest, BlobRow.size).where(BlobRow.digest.in_(list(digests)))
        ).all()
    )


def blob_kind(conn: Connection, digest: str) -> str | None:
    return conn.execute(select(BlobRow.kind).where(BlobRow.digest == digest)).scalar()


def known_kinds(conn: Connection) -> dict[str, str | None]:
    """Each blob's kind as the index knows it, its documents by what names them."""
    known: dict[str, str | None] = dict(conn.execute(select(BlobRow.digest, BlobRow.kind)).all())  # type: ignore[arg-type]
    known.update((d, "release") for (d,) in conn.execute(select(ManifestRow.digest)))
    known.update(
        (d, "tag-event") for (d,) in conn.execute(select(TagHistoryRow.event_digest))
    )
    known.update(
        (d, "compilation") for (d,) in conn.execute(select(CompilationRow.record_digest))
    )
    known.update(
        (d, "run") for (d,) in conn.execute(select(RunRow.record_digest)) if d is not None
    )
    return known
