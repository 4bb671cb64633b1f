"""Small Kiln JSON documents stored as blobs so the index can be rebuilt from blobs alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from artifacts.digest import canonical_json
from artifacts.manifest import RELEASE_MEDIA_TYPE
from artifacts.refs import NAME_RULE, TAG_RULE, is_valid_name, is_valid_tag
from artifacts.validate import Reader

TAG_EVENT_MEDIA_TYPE = "application/vnd.kiln.tag-event.v1+json"
COMPILATION_MEDIA_TYPE = "application/vnd.kiln.compilation.v1+json"
RUN_MEDIA_TYPE = "application/vnd.kiln.run.v1+json"

KIND_BY_MEDIA_TYPE = {
    RELEASE_MEDIA_TYPE: "release",
    TAG_EVENT_MEDIA_TYPE: "tag-event",
    COMPILATION_MEDIA_TYPE: "compilation",
    RUN_MEDIA_TYPE: "run",
}
SNIFF_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class TagEvent:
    """One move of a tag: the truth behind tag history (the index row is its copy).

    `previous` is the manifest the tag pointed at before; `previous_event` the digest of the
    event that set it, so the events of one tag form a chain that history walks from the
    tag's ref object (artifacts/tagrefs.py) without the index. Events written before the
    chain existed have no `previous_event`: a walk stops there.
    """

    name: str
    tag: str
    digest: str
    previous: str | None
    at: float
    user: str
    host: str
    reason: str
    previous_event: str | None = None

    def to_bytes(self) -> bytes:
        return canonical_json({"mediaType": TAG_EVENT_MEDIA_TYPE, **asdict(self)})

    @classmethod
    def from_json(cls, value: Any, source: str) -> TagEvent:
        r = Reader(value, "", source)
        name, tag = r.text("name"), r.text("tag")
        if not is_valid_name(name):
            r.fail("name", f"must be {NAME_RULE}, got {name!r}")
        if not is_valid_tag(tag):
            r.fail("tag", f"must be {TAG_RULE}, got {tag!r}")
        return cls(
            name=name,
            tag=tag,
            digest=r.text("digest"),
            previous=r.get("previous", str, required=False),
            at=r.number("at"),
            user=r.get("user", str, required=False) or "",
            host=r.get("host", str, required=False) or "",
            reason=r.get("reason", str, required=False) or "",
            previous_event=r.get("previous_event", str, required=False),
        )


    def to_move_json(self) -> dict[str, Any]:
        """The move as `kiln tag --json` and `kiln history --json` print it (no chain link)."""
        return {k: v for k, v in asdict(self).items() if k != "previous_event"}


class RunStatus(StrEnum):
    """A run's status, as its record, its row and `kiln compile --json` hold it."""

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # it stopped before the end


class ItemStatus(StrEnum):
    """How one graph of a run ended."""

    HIT_DIRECT = "direct-hit"
    HIT_HLO = "hlo-hit"
    COMPILED = "compiled"
    FAILED = "failed"


@dataclass(frozen=True)
class CompilationRecord:
    """One compile attempt (success or failure) or one imported Neuron cache entry: the truth
    behind its `compilations` row. `recipe` ({direct_key, signature}) is what Kiln's own
    compiles prove about a direct key; `triage` explains a failed neuronx-cc compile. Both
    are left out of the document when absent, as are they in older records."""

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
    reason: str | None
    created_at: float
    provenance: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    triage: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.OK

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {"mediaType": COMPILATION_MEDIA_TYPE, **self.__dict__}
        value["flags"] = list(self.flags)
        for optional in ("recipe", "triage"):
            if value[optional] is None:
                del value[optional]
        return value

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, value: Any, source: str) -> CompilationRecord:
        r = Reader(value, "", source)
        return cls(
            hlo_key=r.text("hlo_key"),
            status=r.text("status"),
            compiler=r.get("compiler", str),
            compiler_version=r.get("compiler_version", str),
            flags=r.strings("flags", required=False),
            target=r.get("target", str),
            hlo_digest=r.text("hlo_digest"),
            executable_digest=r.get("executable_digest", str, required=False),
            executable_format=r.get("executable_format", str, required=False),
            log_digest=r.get("log_digest", str, required=False),
            seconds=r.number("seconds"),
            error=r.get("error", str, required=False),
            reason=r.get("reason", str, required=False),
            created_at=r.number("created_at"),
            provenance=r.get("provenance", dict, required=False),
            recipe=r.get("recipe", dict, required=False),
            triage=r.get("triage", dict, required=False),
        )


@dataclass(frozen=True)
class RunRecord:
    """One `kiln compile` run, written at its end (or when it is interrupted): the truth
    behind its `runs` row and `run_items` rows. `items` are ItemResult.to_json() values."""

    id: str
    started_at: float
    finished_at: float | None
    status: str
    spec_digest: str | None
    host: str
    user: str
    summary: dict[str, Any]
    items: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": RUN_MEDIA_TYPE, **self.__dict__, "items": list(self.items)}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, value: Any, source: str) -> RunRecord:
        r = Reader(value, "", source)
        items = r.get("items", list, required=False) or []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                r.fail(f"items[{i}]", f"must be an object, got {type(item).__name__}")
        return cls(
            id=r.text("id"),
            started_at=r.number("started_at"),
            finished_at=r.number("finished_at", required=False),
            status=r.text("status"),
            spec_digest=r.get("spec_digest", str, required=False),
            host=r.get("host", str, required=False) or "",
            user=r.get("user", str, required=False) or "",
            summary=r.get("summary", dict, required=False) or {},
            items=tuple(items),
        )


def sniff_document(data: bytes) -> tuple[str, dict[str, Any]] | None:
    """(kind, parsed JSON) when the bytes are a Kiln document, else None."""
    if not data.startswith(b"{") or b'"mediaType"' not in data:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    kind = KIND_BY_MEDIA_TYPE.get(value.get("mediaType"))  # type: ignore[arg-type]
    return (kind, value) if kind else None
